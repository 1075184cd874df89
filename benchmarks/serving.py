#!/usr/bin/env python
"""Online serving benchmark of a kvarn-ray app over its OpenAI HTTP API.

    # CPU, embedded SmolLM2: deploys deployments/kvarn.yaml's app twice (KVarN payloads,
    # then fp16 payloads) on a local Ray and measures both with the same request trace
    python benchmarks/serving.py --out benchmarks/results/serving_cpu.json

    # a GPU cluster: same command, its config, Ray's address
    python benchmarks/serving.py --address auto --config deployments/kvarn-gpu.yaml \\
        --rate 8 --duration 120 --max-requests 2000 --mix 1024:128:0.5,4096:256:0.3,16384:64:0.2 \\
        --out benchmarks/results/serving_gpu.json

    # an app that is already running (one transfer dtype: whatever it was deployed with)
    python benchmarks/serving.py --url http://127.0.0.1:8000 --out /tmp/serving.json

Load: requests arrive as a Poisson process at ``--rate`` per second for ``--duration``
seconds, at most ``--max-requests``; each draws a (prompt tokens, output tokens) pair
from ``--mix`` (``P:O:weight,...``). Prompts are token-id prompts cut from real
English text (the Python Language Reference inside CPython's ``pydoc_data``, as in
accuracy.py), distinct per request so nothing is shared between them; outputs run
to exactly O tokens (``ignore_eos``), greedy. The trace (arrival times, lengths, text
offsets) comes from ``--seed``, so every transfer dtype sees the same one. Requests
still running ``--drain-timeout`` seconds after the last arrival are cancelled and
counted as failed. Only loopback URLs are accepted.

Per request, from the SSE stream (``stream_options.include_usage``) and the response's
``kvarn`` metadata: TTFT (send -> first token), ITL (gaps between token-carrying
chunks), TPOT ((e2e - TTFT) / (tokens - 1)), e2e latency, payload bytes, transfer
time (decode replica: prefill call + import), prefill time. Reported: p50/p90/p99
and means, request and output-token throughput over the makespan, and, across
transfer dtypes, the payload-size and transfer-time ratios.

The results JSON records the machine, package versions, git commit, the command and
the app config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------------- workload


def parse_mix(spec: str) -> list[tuple[int, int, float]]:
    mix = []
    for part in spec.split(","):
        p, o, w = part.split(":")
        mix.append((int(p), int(o), float(w)))
    if not mix or any(p < 1 or o < 1 or w <= 0 for p, o, w in mix):
        raise ValueError(f"bad --mix {spec!r}: want P:O:weight,... with positive values")
    return mix


def corpus_token_ids(tokenizer) -> list[int]:
    """Real English text as token ids (CPython's Language Reference, see the docstring)."""
    from pydoc_data.topics import topics

    first = ["objects", "execmodel", "import", "types", "comparisons"]
    keys = [k for k in first if k in topics] + sorted(k for k in topics if k not in first)
    text = "\n\n".join(topics[k] for k in keys)
    tokenizer.model_max_length = 1 << 40  # a corpus, not a model input: no length warning
    return tokenizer(text, add_special_tokens=False).input_ids


def make_trace(args, corpus_len: int) -> list[dict]:
    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    weights = [w for _, _, w in mix]
    trace, t = [], 0.0
    while len(trace) < args.max_requests:
        t += rng.expovariate(args.rate)
        if t > args.duration:
            break
        p, o, _ = rng.choices(mix, weights)[0]
        if p > corpus_len:
            raise ValueError(f"prompt of {p} tokens is longer than the corpus ({corpus_len})")
        trace.append({"i": len(trace), "arrival_s": t, "prompt_tokens": p, "max_tokens": o,
                      "offset": rng.randrange(0, corpus_len - p + 1)})
    return trace


# --------------------------------------------------------------------------- client


async def one_request(http, url: str, model: str, req: dict, corpus: list[int]) -> dict:
    ids = corpus[req["offset"]:req["offset"] + req["prompt_tokens"]]
    body = {"model": model, "prompt": ids, "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    rec = {"i": req["i"], "prompt_tokens": req["prompt_tokens"], "max_tokens": req["max_tokens"],
           "ok": False}
    t0 = time.perf_counter()
    token_times: list[float] = []
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"] = chunk["error"].get("message")
                    return rec
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    token_times.append(now)
                if chunk.get("kvarn"):
                    rec["kvarn"] = chunk["kvarn"]
                if chunk.get("usage"):
                    rec["completion_tokens"] = chunk["usage"]["completion_tokens"]
                    rec["prompt_tokens_server"] = chunk["usage"]["prompt_tokens"]
    except asyncio.CancelledError:
        rec["error"] = "cancelled at the drain timeout"
        return rec
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    end = time.perf_counter()
    if not token_times:
        rec["error"] = "no tokens"
        return rec
    n = rec.get("completion_tokens", len(token_times))
    rec.update(ok=True, ttft_s=token_times[0] - t0, e2e_s=end - t0,
               itl_s=[b - a for a, b in zip(token_times, token_times[1:])],
               tpot_s=(end - token_times[0]) / (n - 1) if n > 1 else None)
    k = rec.get("kvarn") or {}
    rec["payload_bytes"] = k.get("payload_bytes")
    rec["fp16_equivalent_bytes"] = k.get("fp16_equivalent_bytes")
    rec["transfer_s"] = k.get("transfer_s")
    rec["prefill_s"] = k.get("prefill_s")
    rec["import_s"] = k.get("import_s")
    return rec


async def run_trace(url: str, model: str, trace: list[dict], corpus: list[int],
                    drain_timeout_s: float) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for req in trace:
            delay = start + req["arrival_s"] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(http, url, model, req, corpus)))
        done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for t in pending:
            t.cancel()
        results = [await t for t in tasks]
        makespan = time.perf_counter() - start
    return results, makespan


# --------------------------------------------------------------------------- statistics


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def dist(xs: list[float], scale: float = 1.0) -> dict:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": sum(xs) / len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90),
            "p99": pct(xs, 99), "max": max(xs)}


def summarize(results: list[dict], makespan_s: float) -> dict:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r.get("completion_tokens", 0) for r in ok)
    return {
        "num_requests": len(results), "num_ok": len(ok), "num_failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:10],
        "makespan_s": makespan_s,
        "request_throughput_per_s": len(ok) / makespan_s if makespan_s else None,
        "output_token_throughput_per_s": out_tokens / makespan_s if makespan_s else None,
        "total_token_throughput_per_s": (out_tokens + sum(r["prompt_tokens"] for r in ok))
        / makespan_s if makespan_s else None,
        "ttft_ms": dist([r["ttft_s"] for r in ok], 1e3),
        "tpot_ms": dist([r["tpot_s"] for r in ok], 1e3),
        "itl_ms": dist([x for r in ok for x in r["itl_s"]], 1e3),
        "e2e_latency_ms": dist([r["e2e_s"] for r in ok], 1e3),
        "payload_bytes": dist([r["payload_bytes"] for r in ok]),
        "payload_bytes_per_prompt_token": dist(
            [r["payload_bytes"] / r["prompt_tokens"] for r in ok if r["payload_bytes"]]),
        "compression_vs_fp16": dist([r["fp16_equivalent_bytes"] / r["payload_bytes"] for r in ok
                                     if r["payload_bytes"]]),
        "transfer_ms": dist([r["transfer_s"] for r in ok], 1e3),
        "prefill_ms": dist([r["prefill_s"] for r in ok], 1e3),
        "import_ms": dist([r["import_s"] for r in ok], 1e3),
        "transfer_minus_prefill_ms": dist([r["transfer_s"] - r["prefill_s"] for r in ok
                                           if r["transfer_s"] is not None
                                           and r["prefill_s"] is not None], 1e3),
    }


# --------------------------------------------------------------------------- environment


def environment() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10
                                  ).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    cpu = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    versions = {"python": platform.python_version()}
    for mod in ("ray", "torch", "transformers", "triton", "numpy", "httpx", "fastapi"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    gpus = None
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        pass
    status = run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "memory_bytes": mem, "gpus": gpus, "hostname": socket.gethostname(),
                    "load_average_at_start": os.getloadavg()},
        "versions": versions,
        "commit": run("git", "rev-parse", "HEAD"),
        "commit_dirty": bool(status),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


# --------------------------------------------------------------------------- deploy


def load_app_config(path: Path, app_name: str) -> tuple[dict, dict]:
    import yaml

    raw = yaml.safe_load(open(path))
    (app,) = [a for a in raw["applications"] if a["name"] == app_name]
    return raw, app


def deploy(raw: dict, app: dict, transfer_dtype: str | None, port: int):
    """serve.run the config's app with its args (transfer_dtype overridden); returns its URL."""
    from ray import serve

    from kvarn_ray.app import build_app

    args = dict(app["args"])
    if transfer_dtype is not None:
        args["transfer_dtype"] = transfer_dtype
    serve.run(build_app(args), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    return f"http://127.0.0.1:{port}{prefix}", args


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "deployments" / "kvarn.yaml")
    ap.add_argument("--app-name", default="kvarn")
    ap.add_argument("--url", help="benchmark an app already running here instead of deploying")
    ap.add_argument("--address", default=None, help="Ray address (auto: a running cluster); "
                    "default: start a local Ray")
    ap.add_argument("--num-cpus", type=float, default=None, help="local Ray only")
    ap.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: the "
                    "config's, else 8000)")
    ap.add_argument("--transfer-dtypes", default="config,auto",
                    help="comma list; 'config' = the config's transfer_dtype (default: "
                         "config,auto = KVarN vs fp16 payloads)")
    ap.add_argument("--rate", type=float, default=0.05, help="requests per second (Poisson)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals")
    ap.add_argument("--max-requests", type=int, default=16)
    ap.add_argument("--mix", default="128:16:0.5,512:16:0.3,1024:16:0.2",
                    help="prompt_tokens:output_tokens:weight,...")
    ap.add_argument("--drain-timeout", type=float, default=600.0,
                    help="seconds after the last arrival before unfinished requests are cancelled")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent (and dropped) first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="the served model name (default: the config's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep-requests", action="store_true", help="store every request record")
    args = ap.parse_args(argv)

    raw, app = load_app_config(args.config, args.app_name)
    app_args = app["args"]
    model = args.model or app_args.get("served_model_name") or app_args["model"]
    if isinstance(model, list):
        model = model[0]

    from transformers import AutoTokenizer

    from kvarn.models import resolve

    tok_src = app_args.get("tokenizer") or app_args["model"]
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(tok_src)))
    corpus = corpus_token_ids(tokenizer)
    trace = make_trace(args, len(corpus))
    warm = [{"i": -1 - k, "arrival_s": 0.0, "prompt_tokens": 64, "max_tokens": 4,
             "offset": 7 * k} for k in range(args.warmup)]
    report = {**environment(), "config_file": str(args.config), "app_args": app_args,
              "workload": {"rate_per_s": args.rate, "duration_s": args.duration,
                           "max_requests": args.max_requests, "mix": args.mix,
                           "seed": args.seed, "num_requests": len(trace),
                           "prompt_source": "pydoc_data.topics (CPython Language Reference)",
                           "greedy": True, "ignore_eos": True},
              "runs": []}
    print(f"{len(trace)} requests over {args.duration:.0f} s at {args.rate}/s; mix {args.mix}",
          flush=True)

    def bench(url: str, label: str, deployed_args: dict | None):
        host = urlparse(url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"refusing non-loopback URL {url!r}: this benchmark sends load to "
                             f"loopback only")
        asyncio.run(run_trace(url, model, warm, corpus, 300))
        t0 = time.perf_counter()
        results, makespan = asyncio.run(run_trace(url, model, trace, corpus, args.drain_timeout))
        s = summarize(results, makespan)
        run = {"transfer_dtype": label, "url": url, "summary": s,
               "wall_s": time.perf_counter() - t0}
        if args.keep_requests:
            run["requests"] = results
        report["runs"].append(run)
        print(json.dumps({"transfer_dtype": label, **{k: s[k] for k in (
            "num_ok", "num_failed", "request_throughput_per_s", "output_token_throughput_per_s")},
            "ttft_p50_ms": s["ttft_ms"].get("p50"), "tpot_p50_ms": s["tpot_ms"].get("p50"),
            "payload_bytes_mean": s["payload_bytes"].get("mean"),
            "transfer_ms_p50": s["transfer_ms"].get("p50")}), flush=True)

    if args.url:
        bench(args.url.rstrip("/"), "as deployed", None)
    else:
        import ray
        from ray import serve

        port = args.port or raw.get("http_options", {}).get("port", 8000)
        init = {"include_dashboard": False}
        if args.address:
            init["address"] = args.address
        elif args.num_cpus:
            init["num_cpus"] = args.num_cpus
        ray.init(**init, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": False})
        try:
            for td in args.transfer_dtypes.split(","):
                td = None if td == "config" else td
                t0 = time.perf_counter()
                url, deployed = deploy(raw, app, td, port)
                label = deployed.get("transfer_dtype") or deployed.get("kv_cache_dtype")
                print(f"deployed transfer_dtype={label} in {time.perf_counter() - t0:.0f} s",
                      flush=True)
                bench(url, label, deployed)
                serve.delete(app["name"])
        finally:
            serve.shutdown()
            ray.shutdown()

    report["machine"]["load_average_at_end"] = os.getloadavg()
    runs = report["runs"]
    if len(runs) >= 2:
        base = next((r for r in runs if r["transfer_dtype"] == "auto"), runs[-1])
        report["comparison"] = {}
        for r in runs:
            if r is base:
                continue
            a, b = r["summary"], base["summary"]

            def ratio(key, stat="mean"):
                x, y = a[key].get(stat), b[key].get(stat)
                return y / x if x and y else None

            report["comparison"][f"{base['transfer_dtype']}_over_{r['transfer_dtype']}"] = {
                "payload_bytes_mean": ratio("payload_bytes"),
                "transfer_ms_p50": ratio("transfer_ms", "p50"),
                "transfer_minus_prefill_ms_p50": ratio("transfer_minus_prefill_ms", "p50"),
                "import_ms_p50": ratio("import_ms", "p50"),
                "ttft_ms_p50": ratio("ttft_ms", "p50"),
                "tpot_ms_p50": ratio("tpot_ms", "p50"),
            }
        print(json.dumps(report["comparison"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["summary"]["num_failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
