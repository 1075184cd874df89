"""Overload end to end: a decode replica with a tiny KV cache and a one-slot admission queue.

A separate app ("kvarn-overload", route /overload) on the session's Ray cluster, built by
``build_app`` from the YAML's args with a cache of 4 fp16 + 2 record blocks (12.5 MiB at
max_model_len 256) and ``max_waiting: 1``. Every request of the burst needs 2 fp16
blocks (98 prompt tokens + 40 new ones), so the replica admits two, lets one wait for
blocks, and answers the rest 503 + Retry-After with an OpenAI error body (its own
admission queue is full; the Serve-level queues are not reached: 8 requests against
``max_ongoing_requests`` 5 + ``max_queued_requests`` 10). Each admitted request must
produce the same greedy text as the same request alone, and every block must be free
again afterwards.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve_stats import decode_stats, wait_for_baseline

APP = "kvarn-overload"
ROUTE = "/overload"
MODEL = "smollm2-135m"
# 98 tokens: with max_tokens 40, 138 tokens = 2 fp16 blocks of 128, no record.
PROMPT = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(12))
MAX_TOKENS = 40
BURST = 8
# plan_pools(kvarn_k4v2_g128, L=30, Hkv=3, D=64, max_model_len 256, chunk 128):
# 4 fp16 blocks (2 transient for a prefill chunk + 2 per whole sequence) + 2 record blocks.
KV_BYTES = 4 * 2_949_120 + 2 * 656_640


@pytest.fixture(scope="module")
def overload_app(ray_cluster, deploy_app, kvarn_args):
    from ray import serve

    args = {**kvarn_args, "max_model_len": 256, "max_num_batched_tokens": 128,
            "max_num_seqs": 4, "max_waiting": 1, "admission_timeout_s": 120,
            "kv_cache_memory_bytes": KV_BYTES, "prefill_kv_cache_memory_bytes": 64 * 2**20}
    deploy_app(args, name=APP, route_prefix=ROUTE)
    yield {"base_url": f"{ray_cluster}{ROUTE}", "args": args}
    serve.delete(APP)


def _stats() -> dict:
    return decode_stats(APP)


def _wait_idle(timeout_s: float = 60.0) -> dict:
    return wait_for_baseline(timeout_s, APP)


def _text(r: httpx.Response, stream: bool) -> tuple[str, str | None]:
    if not stream:
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    lines = [ln[len("data: "):] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all("error" not in c for c in chunks), chunks
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    return "".join(c["text"] for c in choices), choices[-1]["finish_reason"]


def test_overload_is_503_and_the_rest_completes(overload_app):
    base = overload_app["base_url"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    start = _wait_idle()
    assert start["num_total_blocks"] == 6 and start["num_free_blocks"] == 6
    alone = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]
    assert alone.json()["usage"]["completion_tokens"] == MAX_TOKENS
    _wait_idle()

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            return await asyncio.gather(*[
                http.post("/v1/completions", json={**body, "stream": i % 2 == 1})
                for i in range(BURST)])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, f"nothing was refused: {statuses}"
    assert statuses.count(200) >= 2, f"the replica has blocks for two: {statuses}"
    for i, r in enumerate(responses):
        if r.status_code == 503:
            assert r.headers["content-type"].startswith("application/json")
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["type"] == "service_unavailable" and err["code"] == "overloaded", err
            assert err["message"]
            assert int(r.headers["Retry-After"]) >= 1
        else:
            text, finish = _text(r, stream=i % 2 == 1)
            assert text == expected, (i, text, expected)
            assert finish == "length"

    end = _wait_idle()
    assert end["num_free_blocks"] == start["num_free_blocks"]
    assert end["num_live_payloads"] == 0
