"""Serving metrics, exported through Ray's Prometheus endpoint (``ray.serve.metrics``).

Every metric carries Serve's ``deployment``/``replica``/``application`` tags (added
by ``ray.serve.metrics``), so "KV cache usage per decode replica" is the gauge
``kvarn_kv_cache_usage`` grouped by ``replica``. Names get Ray's ``ray_`` prefix in
Prometheus (``ray_kvarn_ttft_seconds_bucket`` ...).

    ingress:  kvarn_requests_total{route, status}, kvarn_request_latency_seconds
    decode:   kvarn_prompt_tokens_total, kvarn_generation_tokens_total,
              kvarn_ttft_seconds, kvarn_tpot_seconds, kvarn_kv_cache_usage,
              kvarn_num_free_blocks, kvarn_num_running, kvarn_num_waiting,
              kvarn_payload_bytes{transfer_dtype}, kvarn_transfer_seconds,
              kvarn_compression_ratio{transfer_dtype}, kvarn_reprefills_total,
              kvarn_rejected_total{reason}
    prefill:  kvarn_prefill_seconds, kvarn_prefill_tokens_total

Metrics are created lazily, once per process (a replica), on first use.
"""

from __future__ import annotations

import functools

__all__ = ["ingress_metrics", "decode_metrics", "prefill_metrics"]

_LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                         120.0]
_TOKEN_TIME_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                            1.28, 2.56]
_BYTES_BOUNDARIES = [2.0**k for k in range(12, 34, 2)]  # 4 KiB .. 8 GiB
_RATIO_BOUNDARIES = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0]


class _Metrics:
    pass


@functools.cache
def ingress_metrics() -> _Metrics:
    from ray.serve.metrics import Counter, Histogram

    m = _Metrics()
    m.requests = Counter("kvarn_requests_total", "OpenAI API requests by route and HTTP status.",
                         tag_keys=("route", "status"))
    m.latency = Histogram("kvarn_request_latency_seconds",
                          "End-to-end request latency seen by the ingress.",
                          boundaries=_LATENCY_BOUNDARIES_S, tag_keys=("route",))
    return m


@functools.cache
def decode_metrics() -> _Metrics:
    from ray.serve.metrics import Counter, Gauge, Histogram

    m = _Metrics()
    m.prompt_tokens = Counter("kvarn_prompt_tokens_total", "Prompt tokens admitted.")
    m.generation_tokens = Counter("kvarn_generation_tokens_total", "Tokens generated.")
    m.ttft = Histogram("kvarn_ttft_seconds",
                       "Time from arrival at the decode replica to the first token.",
                       boundaries=_LATENCY_BOUNDARIES_S)
    m.tpot = Histogram("kvarn_tpot_seconds", "Time per output token after the first.",
                       boundaries=_TOKEN_TIME_BOUNDARIES_S)
    m.kv_cache_usage = Gauge("kvarn_kv_cache_usage",
                             "Fraction of this decode replica's KV blocks in use.")
    m.num_free_blocks = Gauge("kvarn_num_free_blocks", "Free KV blocks on this decode replica.")
    m.num_running = Gauge("kvarn_num_running", "Requests decoding on this replica.")
    m.num_waiting = Gauge("kvarn_num_waiting", "Requests waiting for admission on this replica.")
    m.payload_bytes = Histogram("kvarn_payload_bytes", "KV payload bytes moved prefill -> decode.",
                                boundaries=_BYTES_BOUNDARIES, tag_keys=("transfer_dtype",))
    m.transfer_time = Histogram(
        "kvarn_transfer_seconds",
        "Prefill call start to payload imported into the paged cache (prefill compute included).",
        boundaries=_LATENCY_BOUNDARIES_S)
    m.compression_ratio = Histogram("kvarn_compression_ratio",
                                    "fp16-equivalent bytes / payload bytes, per request.",
                                    boundaries=_RATIO_BOUNDARIES, tag_keys=("transfer_dtype",))
    m.reprefills = Counter("kvarn_reprefills_total",
                           "Payloads rejected by validation and prefilled again.")
    m.rejected = Counter("kvarn_rejected_total", "Requests refused by the decode replica.",
                         tag_keys=("reason",))
    return m


@functools.cache
def prefill_metrics() -> _Metrics:
    from ray.serve.metrics import Counter, Histogram

    m = _Metrics()
    m.prefill_time = Histogram("kvarn_prefill_seconds",
                               "Prompt arrival at the prefill replica to payload ready.",
                               boundaries=_LATENCY_BOUNDARIES_S)
    m.prefill_tokens = Counter("kvarn_prefill_tokens_total", "Prompt tokens prefilled.")
    return m
