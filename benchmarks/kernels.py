#!/usr/bin/env python
"""Kernel benchmark: KVarN fused decode vs our fp16 paged decode vs torch SDPA, and the store.

    # on the GPU machine (torch + triton, no ray needed)
    PYTHONPATH=. python3 benchmarks/kernels.py --check --out $OUT/kernels.json
    # here: the plot of a results file
    python benchmarks/kernels.py --plot benchmarks/results/kernels_h100.json

Decode shapes: 32 q / 8 KV heads, D=128, fp16, (batch, context) in (1,4K) (1,32K)
(1,128K) (16,16K) (64,4K) (64,16K) (128,8K); plus D=64 (9/3 heads) and D=256 (16/4).
Per shape and implementation: median ms (triton.testing.do_bench, which flushes the
L2 with a 256 MB write before every timed call, so repeated calls cannot hit in
cache), the bytes the kernel must read (KV or records + sink/tail fp16 blocks, q,
block table), achieved TB/s, and that over the device-to-device copy bandwidth
measured in the same run (bytes read + written / time, as METHOD.md counts it).

    kvarn   paged_decode_attention, kvarn_k4v2_g128 records (fp16 sink + tail blocks)
    fp16    paged_decode_attention, cfg=None (same kernel, fp16 paged cache)
    sdpa    torch.nn.functional.scaled_dot_product_attention on contiguous [B, Hkv, N, D]
            K/V, enable_gqa=True, inside sdpa_kernel(FLASH_ATTENTION) (the JSON records
            the backend that ran)

Store: store_tiles on a 16K-token prompt of a Llama-3-8B-shaped model (32 layers x 8
KV heads, D=128: 127 full non-sink blocks per layer), GB/s of fp16 input; flip counts
against the torch reference quantizer run on the same GPU.

--check verifies every timed shape on the GPU first (the kernels against an fp32
dequantize-then-attend reference for a few sequences of the batch).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (label, batch, context, Hq, Hkv, D)
    ("B1_N4K", 1, 4096, 32, 8, 128),
    ("B1_N32K", 1, 32768, 32, 8, 128),
    ("B1_N128K", 1, 131072, 32, 8, 128),
    ("B16_N16K", 16, 16384, 32, 8, 128),
    ("B64_N4K", 64, 4096, 32, 8, 128),
    ("B64_N16K", 64, 16384, 32, 8, 128),
    ("B128_N8K", 128, 8192, 32, 8, 128),
    ("D64_B64_N16K", 64, 16384, 9, 3, 64),
    ("D64_B1_N32K", 1, 32768, 9, 3, 64),
    ("D256_B16_N16K", 16, 16384, 16, 4, 256),
    ("D256_B64_N4K", 64, 4096, 16, 4, 256),
]
PRESET = "kvarn_k4v2_g128"


def git_commit() -> str:
    """HEAD (+dirty if the kernels differ from it); KVARN_GIT_COMMIT when the tree was
    copied without .git (the device machine)."""
    if os.environ.get("KVARN_GIT_COMMIT"):
        return os.environ["KVARN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "kvarn/kernels", "benchmarks/kernels.py"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def source_sha256() -> str:
    """Hash of the kernel sources and this script: identifies an uncommitted tree."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for rel in ("kvarn/kernels/store.py", "kvarn/kernels/decode_attention.py", "kvarn/kernels/decode_gluon.py",
                "kvarn/kernels/extend_attention.py", "benchmarks/kernels.py"):
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def gluon_settings() -> dict:
    """The Gluon path's switches in this run: the head dims kernel="auto" sends to it
    (KVARN_GLUON_DIMS), whether the fp16 blocks go in chunks (KVARN_GLUON_FP16_CHUNKS)
    and on a second stream (KVARN_GLUON_SIDE_STREAM), and whether the record loop takes
    two records per iteration (KVARN_GLUON_PAIR); and whether decode kernels launch with
    programmatic dependent launch (KVARN_PDL, every decode path)."""
    from kvarn.kernels import decode_attention as da
    return {"auto_dims": list(da.GLUON_AUTO_DIMS), "fp16_chunks": da.GLUON_FP16_CHUNKS,
            "side_stream": da.GLUON_SIDE_STREAM, "pair": da.GLUON_PAIR, "pdl": da.PDL}


def run_header() -> dict:
    """What every results file starts with: the command, the code, the device and the
    versions."""
    import triton
    props = torch.cuda.get_device_properties(0)
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": git_commit(),
        "source_sha256": source_sha256(),
        "device": {"name": props.name, "sms": props.multi_processor_count,
                   "memory_GiB": props.total_memory / 2**30},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "gluon": gluon_settings(),
        "env": kvarn_env(),
    }


def kvarn_env() -> dict:
    """The KVARN_* environment the run saw (the kernels' opt-in and default switches)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVARN_") and k != "KVARN_GIT_COMMIT"}


def wall_ms(fn, calls: int) -> float:
    """Wall time per call of ``calls`` back-to-back calls of fn, by CUDA events (launch
    gaps and host time included)."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(calls):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / calls


def bench(fn, warmup=25, rep=200) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth(nbytes=2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=300)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def kvarn_paged_cache(batch, n_rec, n_fp, hkv, d, cfg, rand_kv, max_distinct=2048):
    """A paged KVarN cache on the GPU: (kv_fp16 [2, batch * n_fp, Hkv, G, D], records
    [batch * n_rec, Hkv, RB], block table [batch, n_fp + n_rec]). Row b: its sink block,
    records 1 .. n_rec, then its other fp16 blocks; physical ids shuffled. Records are
    real (store_tiles of random fp16 tiles: a pool of up to max_distinct distinct
    records copied round-robin). rand_kv(*shape) draws the fp16 values."""
    from kvarn.kernels.store import store_tiles
    g = cfg.group_size
    kv = rand_kv(2, batch * n_fp, hkv, g, d)
    n_distinct = min(batch * n_rec, max_distinct)
    records = torch.empty(max(batch * n_rec, 1), hkv, cfg.record_bytes, dtype=torch.uint8, device="cuda")
    if n_rec:
        src = rand_kv(1, 2, n_distinct, hkv, g, d)
        distinct = torch.empty(1, n_distinct, hkv, cfg.record_bytes, dtype=torch.uint8, device="cuda")
        ids = torch.arange(n_distinct, dtype=torch.int32, device="cuda")
        store_tiles(src, ids, distinct, ids, cfg)
        reps = math.ceil(batch * n_rec / n_distinct)
        records.copy_(distinct[0].repeat(reps, 1, 1)[:batch * n_rec])
    bt = torch.zeros(batch, n_fp + n_rec, dtype=torch.int32)
    rec_perm = torch.randperm(batch * n_rec)
    fp_perm = torch.randperm(batch * n_fp)
    for b in range(batch):
        fp = fp_perm[b * n_fp:(b + 1) * n_fp]
        bt[b, 0] = fp[0]
        bt[b, 1:1 + n_rec] = rec_perm[b * n_rec:(b + 1) * n_rec]
        bt[b, 1 + n_rec:] = fp[1:]
    return kv, records, bt.cuda()


class PagedCase:
    """One decode shape: a KVarN cache, an fp16 paged cache and contiguous K/V for SDPA.

    The KVarN cache is ``kvarn_paged_cache``'s (real records, shuffled block ids).
    """

    def __init__(self, batch, ctx, hq, hkv, d, cfg, want=("kvarn", "fp16", "sdpa"), seed=0):
        from kvarn.kernels.reference import num_record_blocks
        g = cfg.group_size
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.ctx, self.hq, self.hkv, self.d, self.cfg = batch, ctx, hq, hkv, d, cfg
        self.q = torch.randn(batch, hq, d, device="cuda", generator=gen).half()
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        nb = math.ceil(ctx / g)
        self.n_rec = num_record_blocks(ctx - 1, g)
        self.n_fp = nb - self.n_rec                        # sink + tail blocks per sequence
        chan = torch.randn(d, device="cuda", generator=gen)

        def rand_kv(*shape):
            return (torch.randn(*shape, device="cuda", generator=gen) + chan).half()

        self.kv = self.records = self.bt = self.kv_full = self.bt_full = None
        if "kvarn" in want:
            self.kv, self.records, self.bt = kvarn_paged_cache(batch, self.n_rec, self.n_fp, hkv, d, cfg, rand_kv)
        if "fp16" in want:
            self.kv_full = rand_kv(2, batch * nb, hkv, g, d)
            self.bt_full = torch.randperm(batch * nb, dtype=torch.int32).reshape(batch, nb).cuda()
        if "sdpa" in want:
            self.k_sdpa = rand_kv(batch, hkv, ctx, d)
            self.v_sdpa = rand_kv(batch, hkv, ctx, d)

    # bytes each implementation must read (and write)
    def bytes_kvarn(self):
        rec = self.batch * self.n_rec * self.hkv * self.cfg.record_bytes
        fp_tokens = self.ctx - self.n_rec * self.cfg.group_size      # sink + tail, K and V
        return rec + self.batch * self.hkv * fp_tokens * self.d * 2 * 2 + self.io_bytes()

    def bytes_fp16(self):
        return self.batch * self.hkv * self.ctx * self.d * 2 * 2 + self.io_bytes()

    def io_bytes(self):
        return 2 * self.q.numel() * 2 + self.batch * (4 * math.ceil(self.ctx / self.cfg.group_size) + 4)

    def run_kvarn(self, **kw):
        from kvarn.kernels.decode_attention import paged_decode_attention
        return paged_decode_attention(self.q, self.kv, self.records, self.bt, self.lens, self.cfg, **kw)

    def run_fp16(self, **kw):
        from kvarn.kernels.decode_attention import paged_decode_attention
        return paged_decode_attention(self.q, self.kv_full, None, self.bt_full, self.lens, None, **kw)

    def run_sdpa(self):
        import torch.nn.functional as F
        q = self.q[:, :, None, :]
        return F.scaled_dot_product_attention(q, self.k_sdpa, self.v_sdpa, enable_gqa=True)[:, :, 0]

    def check(self, which, n_seq=2):
        """Max relative error (Frobenius) of the kernel vs fp32 dequantize-then-attend, first n_seq rows."""
        from kvarn.kernels.reference import gather_context
        from kvarn.quant.attention import dense_attention
        out = self.run_kvarn() if which == "kvarn" else self.run_fp16()
        worst = 0.0
        for b in range(min(n_seq, self.batch)):
            if which == "kvarn":
                k, v = gather_context(self.kv, self.records, self.bt[b], self.ctx, 1, self.cfg)
            else:
                k, v = gather_context(self.kv_full, None, self.bt_full[b], self.ctx, 1, None)
            ref = dense_attention(self.q[b:b + 1].float(), k, v, 1.0 / math.sqrt(self.d))[0]
            worst = max(worst, float((out[b].float() - ref).norm() / ref.norm()))
        return worst


def sdpa_backend_name(case: PagedCase) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            case.run_sdpa()
        torch.cuda.synchronize()
        return "flash"
    except RuntimeError:
        return "default"


def time_sdpa(case: PagedCase, backend: str) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend == "flash":
        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                case.run_sdpa()
    else:
        fn = case.run_sdpa
    return bench(fn)


def case_for(label: str, copies: int = 1, want=("kvarn", "fp16", "sdpa")):
    """(PagedCase, cfg, batch) for a SHAPES label: ``copies`` x its batch of sequences,
    the KVarN preset at its head_dim."""
    from kvarn.format import KVarNConfig
    _, b, n, hq, hkv, d = next(s for s in SHAPES if s[0] == label)
    cfg = KVarNConfig.from_name(PRESET, d)
    return PagedCase(b * copies, n, hq, hkv, d, cfg, want=want), cfg, b


def decode_row(label, args, copy_bw) -> dict:
    """One decode shape: check (optional), time the three implementations, sweep variants."""
    case, cfg, b = case_for(label)
    n, hq, hkv, d = case.ctx, case.hq, case.hkv, case.d
    row = {"shape": label, "batch": b, "context": n, "q_heads": hq, "kv_heads": hkv, "head_dim": d}
    if args.check:
        row["check_rel_err"] = {"kvarn": case.check("kvarn"), "fp16": case.check("fp16")}
    backend = sdpa_backend_name(case)
    impls = {
        "kvarn": (lambda: case.run_kvarn(), case.bytes_kvarn()),
        "fp16": (lambda: case.run_fp16(), case.bytes_fp16()),
        "sdpa": (None, case.bytes_fp16()),
    }
    from kvarn.kernels.decode_attention import GLUON_AUTO_DIMS, gluon_supported
    # where "kvarn" (kernel="auto") runs the Gluon kernel, time the Triton one too
    if gluon_supported(case.q, cfg, hq // hkv) and d in GLUON_AUTO_DIMS:
        impls["kvarn_triton"] = (lambda: case.run_kvarn(kernel="triton"), case.bytes_kvarn())
    for name, (fn, nbytes) in impls.items():
        ms = time_sdpa(case, backend) if name == "sdpa" else bench(fn)
        row[name] = {"ms": ms, "bytes": nbytes, "TBps": nbytes / (ms * 1e-3) / 1e12,
                     "frac_copy_bw": nbytes / (ms * 1e-3) / copy_bw}
    row["sdpa"]["backend"] = backend
    row["speedup_kvarn_vs_sdpa"] = row["sdpa"]["ms"] / row["kvarn"]["ms"]
    row["speedup_fp16_vs_sdpa"] = row["sdpa"]["ms"] / row["fp16"]["ms"]
    if args.variants and label in args.variants:
        row["variants"] = decode_variants(case)
    torch.cuda.synchronize()
    return row


def kernel_times(prof, calls: int) -> dict:
    """Per CUDA kernel name, the device time per call (ms) of a torch.profiler run of
    ``calls`` calls."""
    per = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per[e.name] = per.get(e.name, 0.0) + e.device_time_total / 1e3 / calls
    return per


def graph_latency(label, copies: int = 16, replays: int = 50, profile_names=(), variants=None,
                  only=None) -> dict:
    """Small-batch latency without the CPU in it and with L2 cold: ``copies`` distinct
    caches of the shape (one PagedCase of batch * copies sequences, each with its own
    memory) are called one after another inside one CUDA graph, as the engine replays
    decode; time per call = graph time / copies. do_bench's per-call events instead
    include whatever launch latency the GPU waits on, which for a ~30 us kernel made the
    B=1 rows bimodal (NOTES.md attempt 17). profile_names: for these paths, also each
    kernel's device time per call inside the replays (torch.profiler over 5 replays):
    the cold-L2 kernel times, which a profile of repeated eager calls on one cache
    (decode_breakdown.py's rows) understates where the records fit in L2. variants:
    {name: paged_decode_attention keyword arguments}, more KVarN paths to time (as
    "kvarn_" + name). only: time just these of the built-in paths (and the variants)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kvarn.kernels.decode_attention import paged_decode_attention
    case, cfg, b = case_for(label, copies)
    hq, hkv = case.hq, case.hkv
    sl = [slice(i * b, (i + 1) * b) for i in range(copies)]
    outs = [torch.empty_like(case.q[s]) for s in sl]
    backend = sdpa_backend_name(case)

    def sdpa(i):
        q = case.q[sl[i], :, None, :]
        return F.scaled_dot_product_attention(q, case.k_sdpa[sl[i]], case.v_sdpa[sl[i]], enable_gqa=True)

    fns = {
        "kvarn": lambda i: paged_decode_attention(case.q[sl[i]], case.kv, case.records, case.bt[sl[i]],
                                                  case.lens[sl[i]], cfg, out=outs[i]),
        "fp16": lambda i: paged_decode_attention(case.q[sl[i]], case.kv_full, None, case.bt_full[sl[i]],
                                                 case.lens[sl[i]], None, out=outs[i]),
        "sdpa": sdpa,
    }
    from kvarn.kernels.decode_attention import gluon_supported
    # where the Gluon kernel applies, time both kernels ("kvarn", kernel="auto", is one of
    # them: GLUON_AUTO_DIMS and GLUON_MIN_RECORDS decide which)
    if gluon_supported(case.q, cfg, hq // hkv):
        for kern in ("triton", "gluon"):
            fns["kvarn_" + kern] = functools.partial(
                lambda i, kern: paged_decode_attention(case.q[sl[i]], case.kv, case.records, case.bt[sl[i]],
                                                       case.lens[sl[i]], cfg, out=outs[i], kernel=kern), kern=kern)
    if only is not None:
        fns = {k: v for k, v in fns.items() if k in only}
    for vname, kw in (variants or {}).items():
        fns["kvarn_" + vname] = functools.partial(
            lambda i, kw: paged_decode_attention(case.q[sl[i]], case.kv, case.records, case.bt[sl[i]],
                                                 case.lens[sl[i]], cfg, out=outs[i], **kw), kw=kw)
    row = {"shape": label, "copies": copies, "replays": replays, "sdpa_backend": backend}
    for name, fn in fns.items():
        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if (name == "sdpa" and backend == "flash") \
            else contextlib.nullcontext()
        with ctx:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(copies):      # compile / warm outside the capture
                    fn(i)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(copies):
                    fn(i)
        times = []
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        for _ in range(replays):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / copies)
        times.sort()
        row[name] = {"ms_median": times[len(times) // 2], "ms_min": times[0], "ms_max": times[-1]}
        if name in profile_names:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    g.replay()
                torch.cuda.synchronize()
            row[name]["kernels_ms_per_call"] = kernel_times(prof, 5 * copies)
        del g
    if "kvarn" in row and "sdpa" in row:
        row["kvarn_over_sdpa"] = row["kvarn"]["ms_median"] / row["sdpa"]["ms_median"]
    del case
    torch.cuda.empty_cache()
    return row


def decode_rows(args, copy_bw, log):
    """Each shape in its own process: a kernel fault poisons the CUDA context, and one
    shape's failure must not take the others' numbers with it."""
    rows = []
    for label, *_ in SHAPES:
        if args.shapes and label not in args.shapes:
            continue
        out = f"/tmp/kvarn_row_{label}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--one-shape", label, "--out", out,
               "--copy-bw", str(copy_bw)] + (["--check"] if args.check else []) \
            + (["--variants", *args.variants] if args.variants else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=550)
        if r.returncode == 0:
            row = json.load(open(out))
            log(f"{label:14s} kvarn {row['kvarn']['ms']:.4f} ms ({row['kvarn']['TBps']:.2f} TB/s) "
                f"fp16 {row['fp16']['ms']:.4f} sdpa {row['sdpa']['ms']:.4f} ({row['sdpa']['backend']}) "
                f"x{row['speedup_kvarn_vs_sdpa']:.2f}"
                + (f" triton-kernel {row['kvarn_triton']['ms']:.4f}" if "kvarn_triton" in row else "")
                + (f" check {row['check_rel_err']}" if args.check else ""))
        else:
            row = {"shape": label, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:400]}
            log(f"{label:14s} FAILED {row['error']}")
        rows.append(row)
    return rows


def decode_variants(case: PagedCase) -> list:
    """KVarN decode under other launch settings (for choosing the defaults); each variant's
    output is compared with the default launch's (max abs difference)."""
    from kvarn.kernels.decode_attention import default_launch, default_num_splits
    slots = default_launch(case.cfg, case.cfg.group_size, case.d)[3]
    base = default_num_splits(case.batch, case.hkv, case.bt.shape[1], case.q.device, slots)
    ref = case.run_kvarn().float()
    # Session 5: the Gluon record kernel (decode_gluon.py; kernel="gluon") at its default
    # split count and others. The earlier sweeps (prefetch, register caps, rec_joint,
    # splits) are in NOTES.md.
    from kvarn.kernels.decode_attention import gluon_supported
    configs = []
    if gluon_supported(case.q, case.cfg, case.hq // case.hkv):
        configs = [dict(kernel="gluon", num_splits=s) for s in (None, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)]
        configs += [dict(kernel="gluon", prefetch=p, maxnreg=r) for p, r in (("l2x2", None), (None, None), ("l2", 0))]
        if case.d != 128:   # session 6: the register caps of the head_dim 64 / 256 ports
            caps = (96, 112, 144, 168) if case.d == 64 else (168, 200, 232)
            configs += [dict(kernel="gluon", maxnreg=r) for r in caps]
    out = []
    for cfg in configs:
        kw = dict(num_warps=4, num_stages=2, num_splits=base, maxnreg=None, rec_deq=True)
        kw.update(cfg)
        if kw.get("kernel") == "gluon":
            kw = {k: cfg[k] for k in cfg}
        try:
            diff = (case.run_kvarn(**kw).float() - ref).abs().max().item()
            ms = bench(lambda: case.run_kvarn(**kw), rep=100)
        except Exception as e:    # a launch that does not compile or fit: record it, go on
            out.append({**kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        out.append({**kw, "ms": ms, "max_abs_diff_vs_default": diff})
    return out


def store_inputs(layers: int, hkv: int, d: int, tokens: int, cfg):
    """A prompt's fp16 blocks (rotated frame, per-channel scales) on the GPU, every layer:
    (kv [L, 2, m+1, Hkv, G, D], src block ids 1..m, dst record ids 0..m-1, m); block 0 is
    the sink, so m = tokens / G - 1 tiles per (layer, head, K/V) are quantized."""
    g = cfg.group_size
    m = tokens // g - 1
    gen = torch.Generator(device="cuda").manual_seed(1)
    chan = torch.rand(d, device="cuda", generator=gen) * 3 + 0.1
    kv = (torch.randn(layers, 2, m + 1, hkv, g, d, device="cuda", generator=gen) * chan).half()
    src = torch.arange(1, m + 1, dtype=torch.int32, device="cuda")
    dst = torch.arange(m, dtype=torch.int32, device="cuda")
    return kv, src, dst, m


def store_rows(args, log):
    """The 16K-token prompt of a Llama-3-8B-shaped model, every layer in one launch."""
    from kvarn.format import KVarNConfig
    from kvarn.kernels.reference import ref_store_tiles
    from kvarn.kernels.store import store_tiles
    from kvarn.quant.records import unpack_record_fields
    out = []
    for label, layers, hkv, d, tokens, preset in [("llama3_8b_16k", 32, 8, 128, 16384, "kvarn_k4v2_g128"),
                                                   ("llama3_8b_16k_k4v4", 32, 8, 128, 16384, "kvarn_k4v4_g128"),
                                                   ("d64_16k", 30, 3, 64, 16384, "kvarn_k4v2_g128")]:
        cfg = KVarNConfig.from_name(preset, d)
        g = cfg.group_size
        kv, src, dst, m = store_inputs(layers, hkv, d, tokens, cfg)
        rec = torch.zeros(layers, m, hkv, cfg.record_bytes, dtype=torch.uint8, device="cuda")
        ms = bench(lambda: store_tiles(kv, src, rec, dst, cfg), warmup=5, rep=50)
        in_bytes = layers * m * hkv * g * d * 2 * 2
        row = {"shape": label, "preset": preset, "layers": layers, "kv_heads": hkv, "head_dim": d,
               "prompt_tokens": tokens, "blocks": m, "tiles": layers * m * hkv * 2, "ms": ms,
               "fp16_input_GBps": in_bytes / (ms * 1e-3) / 1e9}
        # flips against the torch reference quantizer (same GPU), first 4 layers
        ref = torch.zeros_like(rec[:4])
        ref_store_tiles(kv[:4], src, ref, dst, cfg)
        fg = unpack_record_fields(rec[:4].reshape(-1, cfg.record_bytes), cfg)
        fr = unpack_record_fields(ref.reshape(-1, cfg.record_bytes), cfg)
        row["flips_first4layers"] = {k: int((fg[k] != fr[k]).sum()) for k in fg}
        row["values_first4layers"] = {k: int(fg[k].numel()) for k in fg}
        row["bytes_differ_first4layers"] = int((rec[:4] != ref).sum())
        out.append(row)
        log(f"store {label:20s} {ms:.3f} ms  {row['fp16_input_GBps']:.0f} GB/s fp16 in  "
            f"code flips {row['flips_first4layers']['k_codes'] + row['flips_first4layers']['v_codes']}")
        del kv, rec, ref
        torch.cuda.empty_cache()
    return out


DIAG_CASES = {  # name: (kernel, preset or None, lens, q_lens or None, num_splits, num_stages, head_dim[, kwargs])
    "dec_fp16_s1": ("decode", None, [300, 1000], None, 1, 2, 128),
    "dec_fp16_s3": ("decode", None, [300, 1000], None, 3, 2, 128),
    "dec_kvarn_s1": ("decode", PRESET, [300, 1000], None, 1, 2, 128),
    "dec_kvarn_s3": ("decode", PRESET, [300, 1000], None, 3, 2, 128),
    "dec_kvarn_s1_st1": ("decode", PRESET, [300, 1000], None, 1, 1, 128),
    "dec_kvarn_s3_st1": ("decode", PRESET, [300, 1000], None, 3, 1, 128),
    "dec_kvarn_recs_only": ("decode", PRESET, [257, 385], None, 1, 2, 128),
    "dec_kvarn_d64": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 64),
    "ext_fp16": ("extend", None, [300, 1000], [300, 40], None, 2, 128),
    "ext_kvarn": ("extend", PRESET, [300, 1000], [3, 40], None, 2, 128),
    "store": ("store", PRESET, None, None, None, None, 128),
    "dec_kvarn_d64_bh32": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 64, {"block_h": 32}),
    "dec_kvarn_d64_bh64": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 64, {"block_h": 64}),
    "dec_kvarn_d64_w8": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 64, {"num_warps": 8}),
    "dec_kvarn_d64_st3": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 3, 64),
    "dec_kvarn_d64_rs32": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 64, {"rec_sub": 32}),
    "dec_kvarn_g128_d64": ("decode", PRESET, [300, 1000], None, 2, 2, 64),
    "dec_kvarn_d256": ("decode", PRESET, [300, 1000], None, 2, 2, 256),
    "dec_kvarn_w8": ("decode", PRESET, [300, 1000], None, 2, 2, 128, {"num_warps": 8}),
    "dec_kvarn_st3": ("decode", PRESET, [300, 1000], None, 2, 3, 128),
    "dec_fp16_d64": ("decode", None, [300, 1000], None, 2, 2, 64),
    "dec_fp16_d256": ("decode", None, [300, 1000], None, 2, 2, 256),
    "ext_kvarn_d64": ("extend", "kvarn_k4v2_g64", [300, 1000], [3, 40], None, 2, 64),
    "ext_kvarn_d256": ("extend", PRESET, [300, 1000], [3, 40], None, 2, 256),
    # kvarn_k4v4_g64 at D = 256: illegal address at the default 8 warps (Triton 3.6)
    "dec_g64_d256": ("decode", "kvarn_k4v4_g64", [300, 1000], None, 2, 2, 256),
    "dec_g64_d256_w4": ("decode", "kvarn_k4v4_g64", [300, 1000], None, 2, 2, 256, {"num_warps": 4}),
    "dec_g64_d256_rs32": ("decode", "kvarn_k4v4_g64", [300, 1000], None, 2, 2, 256, {"rec_sub": 32}),
    "dec_g64_d256_bh64": ("decode", "kvarn_k4v4_g64", [300, 1000], None, 2, 2, 256, {"block_h": 64}),
    "dec_g64_d256_w4_rs32": ("decode", "kvarn_k4v4_g64", [300, 1000], None, 2, 2, 256,
                             {"num_warps": 4, "rec_sub": 32}),
    "dec_g64v2_d256": ("decode", "kvarn_k4v2_g64", [300, 1000], None, 2, 2, 256),
}


def diag_case(name: str) -> str:
    """Run one small case on the GPU against the reference; 'ok <err>' or raises."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "kernels"))
    import test_decode_attention as T
    from kvarn.format import KVarNConfig
    kind, preset, lens, q_lens, splits, stages, d, *kw = DIAG_CASES[name]
    kw = kw[0] if kw else {}
    if kind == "store":
        from kvarn.kernels.reference import ref_store_tiles
        from kvarn.kernels.store import store_tiles
        cfg = KVarNConfig.from_name(preset, d)
        kv = torch.randn(2, 2, 4, 2, cfg.group_size, d).half()
        ids = torch.tensor([1, 3, 0], dtype=torch.int32)
        ref = torch.zeros(2, 3, 2, cfg.record_bytes, dtype=torch.uint8)
        ref_store_tiles(kv, ids, ref, torch.tensor([0, 1, 2], dtype=torch.int32), cfg)
        got = ref.clone().zero_().cuda()
        store_tiles(kv.cuda(), ids.cuda(), got, torch.tensor([0, 1, 2], dtype=torch.int32).cuda(), cfg)
        torch.cuda.synchronize()
        return f"ok bytes differ {int((got.cpu() != ref).sum())}"
    cfg = KVarNConfig.from_name(preset, d) if preset else None
    g = cfg.group_size if cfg else 128
    q_lens = q_lens or [1] * len(lens)
    kv, records, bt, ctx = T.build_paged_cache(cfg, lens, q_lens, 2, d, g, seed=1, device="cuda")
    cu = [0]
    for t in q_lens:
        cu.append(cu[-1] + t)
    q = torch.randn(cu[-1], 8, d, device="cuda").half()
    if kind == "decode":
        from kvarn.kernels.decode_attention import paged_decode_attention
        out = paged_decode_attention(q, kv, records, bt, ctx, cfg, num_splits=splits, num_stages=stages, **kw)
    else:
        from kvarn.kernels.extend_attention import paged_extend_attention
        out = paged_extend_attention(q, kv, records, bt, ctx, torch.tensor(cu, dtype=torch.int32, device="cuda"),
                                     cfg, num_stages=stages)
    torch.cuda.synchronize()
    ref, t16 = T.fp32_and_fp16_oracles(q, kv, records, bt, ctx, cu, cfg, 1.0 / math.sqrt(d))
    err = float((out.float().cpu() - ref).norm() / ref.norm())
    err16 = float((t16 - ref).norm() / ref.norm())
    return f"ok err {err:.2e} (fp16 torch {err16:.2e})"


def diag(names, sanitize_first_failure=True):
    """Each case in its own process (a fault poisons the CUDA context); then the first
    failing case again under compute-sanitizer for the faulting kernel and line."""
    failed = []
    for name in names:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--diag-one", name],
                           capture_output=True, text=True, timeout=550)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        status = last if r.returncode == 0 else "FAIL " + (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        print(f"diag {name:22s} {status}", flush=True)
        if r.returncode:
            failed.append(name)
    if failed and sanitize_first_failure and os.environ.get("KVARN_SANITIZE"):
        r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--print-limit", "4",
                            sys.executable, os.path.abspath(__file__), "--diag-one", failed[0]],
                           capture_output=True, text=True, timeout=400)
        print("\n".join((r.stdout + r.stderr).splitlines()[:80]), flush=True)


def table(res) -> str:
    lines = ["| shape | KVarN ms | fp16 paged ms | SDPA ms | KVarN TB/s (of copy) | KVarN x SDPA |",
             "|---|---|---|---|---|---|"]
    for r in res["decode"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error'][:60]} | | | | |")
            continue
        k = r["kvarn"]
        lines.append(f"| {r['shape']} | {k['ms']:.4f} | {r['fp16']['ms']:.4f} | {r['sdpa']['ms']:.4f} | "
                     f"{k['TBps']:.2f} ({100 * k['frac_copy_bw']:.0f}%) | {r['speedup_kvarn_vs_sdpa']:.2f} |")
    for s in res.get("store", []):
        lines.append(f"| store {s['shape']} | {s['ms']:.3f} ms | {s['fp16_input_GBps']:.0f} GB/s in | | | |")
    return "\n".join(lines)


def plot(paths):
    """Decode times and speed-ups per shape. Where a file has a CUDA-graph replay of a
    shape (``graph_latency``), that number is plotted instead of do_bench's (hatched
    bars, labelled "graph"): do_bench of a ~20 us kernel also times the Python launch.
    Decode and graph rows come from every file, a later file's row replacing an earlier
    one of the same shape (a rerun of a few shapes after a full run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [paths] if isinstance(paths, str) else list(paths)
    path = paths[0]
    res = json.load(open(path))
    rows = [r for r in res["decode"] if "error" not in r]
    graph = {}
    for p in paths:
        later = json.load(open(p))
        if p != path:
            redo = {r["shape"]: r for r in later.get("decode", []) if "error" not in r}
            rows = [redo.get(r["shape"], r) for r in rows]
        graph.update({g["shape"]: g for g in later.get("graph_latency", []) if "error" not in g})

    def ms(r, name):
        g = graph.get(r["shape"])
        return g[name]["ms_median"] if g else r[name]["ms"]

    labels = [r["shape"] + (" (graph)" if r["shape"] in graph else "") for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    w = 0.27
    for i, (name, color) in enumerate([("kvarn", "C0"), ("fp16", "C1"), ("sdpa", "C2")]):
        ax1.bar([j + (i - 1) * w for j in x], [ms(r, name) for r in rows], w, label=name, color=color,
                hatch=["//" if r["shape"] in graph else "" for r in rows])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (median, log)")
    ax1.legend()
    ax1.set_title(f"decode attention on {res['device']['name']} (KVarN {PRESET}); "
                  "hatched: CUDA-graph replay, cold L2")
    ax2.bar(list(x), [ms(r, "sdpa") / ms(r, "kvarn") for r in rows], 0.5, color="C0", label="KVarN / SDPA",
            hatch=["//" if r["shape"] in graph else "" for r in rows])
    ax2.plot(list(x), [ms(r, "sdpa") / ms(r, "fp16") for r in rows], "o", color="C1", label="fp16 paged / SDPA")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.axhline(2.5, color="C3", lw=0.8, ls="--", label="issue target at >= 16K (2.5x)")
    ax2.set_ylabel("speedup vs SDPA fp16")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, rotation=30, ha="right")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(png)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--check", action="store_true", help="verify each shape on the GPU before timing")
    ap.add_argument("--shapes", nargs="*", help="only these shape labels")
    ap.add_argument("--variants", nargs="*", default=[], help="shape labels to sweep launch settings on")
    ap.add_argument("--no-store", action="store_true")
    ap.add_argument("--graph-latency", nargs="*", default=[],
                    help="shape labels to time also as CUDA-graph replays over distinct caches (L2 cold)")
    ap.add_argument("--plot", metavar="JSON", nargs="+",
                    help="plot a results file (no GPU needed) and exit; graph-replay rows of further files override")
    ap.add_argument("--diag", nargs="*", help="run small GPU cases one per process (all if none named)")
    ap.add_argument("--diag-one", help=argparse.SUPPRESS)
    ap.add_argument("--one-shape", help=argparse.SUPPRESS)
    ap.add_argument("--copy-bw", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_shape:
        json.dump(decode_row(args.one_shape, args, args.copy_bw), open(args.out, "w"))
        return
    if args.plot:
        plot(args.plot)
        return
    if args.diag_one:
        print(diag_case(args.diag_one))
        return
    if args.diag is not None:
        diag(args.diag or list(DIAG_CASES))
        return
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    res = {**run_header(), "timing": "triton.testing.do_bench median (L2 flushed before each call)",
           "kvarn_preset": PRESET}
    res["copy_bw_Bps"] = copy_bandwidth()
    log(f"copy bandwidth {res['copy_bw_Bps'] / 1e12:.3f} TB/s (read + write)")
    res["decode"] = decode_rows(args, res["copy_bw_Bps"], log)
    if args.graph_latency:
        res["graph_latency"] = []
        for label in args.graph_latency:
            r = graph_latency(label, copies=8 if "128K" in label else 16)
            res["graph_latency"].append(r)
            log(f"graph {label:12s} kvarn {r['kvarn']['ms_median']:.4f} fp16 {r['fp16']['ms_median']:.4f} "
                f"sdpa {r['sdpa']['ms_median']:.4f} ms per call (kvarn/sdpa {r['kvarn_over_sdpa']:.2f})"
                + "".join(f", {k[6:]} kernel {r[k]['ms_median']:.4f}" for k in ("kvarn_triton", "kvarn_gluon") if k in r))
    if not args.no_store:
        res["store"] = store_rows(args, log)
    json.dump(res, open(args.out, "w"), indent=1)
    print(table(res))
    for r in res["decode"]:
        for v in r.get("variants", []):
            print(r["shape"], v)


if __name__ == "__main__":
    main()
