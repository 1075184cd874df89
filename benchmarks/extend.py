"""Extend (chunked prefill continuation) attention on the GPU: KVarN vs fp16 paged vs SDPA.

    python benchmarks/extend.py [--out extend.json] [--shapes LABEL ...] [--variants [--workspace-only]]
    python benchmarks/extend.py --plot benchmarks/results/extend_h100_s9.json   # no GPU needed

Each shape (batch, cached prefix, new tokens per sequence; 32 query / 8 KV heads, D 128):
``paged_extend_attention`` over a KVarN cache (records for blocks 1 .. prefix/G - 1, the
sink and the blocks the new tokens reach in fp16), the same kernel over an fp16 paged
cache, and torch SDPA (FlashAttention where it takes the shape) on contiguous fp16 K/V
with a bottom-right causal mask. Times: triton.testing.do_bench medians (L2 flushed).
Also the relative error of both paged outputs against an fp32 computation on the same
(dequantized) K/V, first sequence.
"""
import argparse
import json
import math
import platform
import sys

import torch

from kernels import PRESET, bench, git_commit, kvarn_env, kvarn_paged_cache, source_sha256   # this folder is sys.path[0]

SHAPES = [  # (label, batch, prefix, new tokens)
    ("B1_P16K_T512", 1, 16384, 512),
    ("B1_P4K_T2K", 1, 4096, 2048),
    ("B4_P8K_T256", 4, 8192, 256),
    ("B16_P4K_T8", 16, 4096, 8),       # speculative verify: 8 drafted tokens
    ("B32_P8K_T16", 32, 8192, 16),     # 16 drafted tokens: 64 rows, where "auto" turns to "fa"
    ("B64_P16K_T4", 64, 16384, 4),
]
# Run when named in --shapes: 1, 2, 3, 4, 5 and 6 fa programs (of 32 new tokens) per sequence
# and KV head, for the workspace's threshold (use_workspace, WS_MIN_PROGRAMS)
WS_SHAPES = [("B8_P8K_T32", 8, 8192, 32), ("B8_P8K_T64", 8, 8192, 64), ("B8_P8K_T96", 8, 8192, 96), ("B8_P8K_T128", 8, 8192, 128),
             ("B8_P8K_T160", 8, 8192, 160),
             ("B8_P8K_T192", 8, 8192, 192)]
HQ, HKV, D = 32, 8, 128


class ExtendCase:
    def __init__(self, batch, prefix, t_new, cfg, seed=0):
        from kvarn.kernels.reference import num_record_blocks
        g = cfg.group_size
        gen = torch.Generator(device="cuda").manual_seed(seed)
        n = prefix + t_new
        nb = math.ceil(n / g)
        n_rec = num_record_blocks(prefix, g)
        self.batch, self.t_new, self.cfg = batch, t_new, cfg
        chan = torch.randn(D, device="cuda", generator=gen)
        rnd = lambda *s: (torch.randn(*s, device="cuda", generator=gen) + chan).half()
        self.q = torch.randn(batch * t_new, HQ, D, device="cuda", generator=gen).half()
        self.lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        self.cu = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * t_new
        # KVarN: records for blocks 1 .. n_rec, fp16 for the sink and the new tokens' blocks
        self.kv, self.records, self.bt = kvarn_paged_cache(batch, n_rec, nb - n_rec, HKV, D, cfg, rnd)
        # fp16 paged
        self.kv_full = rnd(2, batch * nb, HKV, g, D)
        self.bt_full = torch.randperm(batch * nb, dtype=torch.int32).reshape(batch, nb).cuda()
        # contiguous, for SDPA
        self.k_sdpa = rnd(batch, HKV, n, D)
        self.v_sdpa = rnd(batch, HKV, n, D)
        self.q_sdpa = self.q.view(batch, t_new, HQ, D).transpose(1, 2).contiguous()
        self.n, self.n_rec = n, n_rec

    def run(self, which, **launch):
        """launch: kernel / block_m / num_warps / num_stages for the paged kernel (default: its own)."""
        from kvarn.kernels.extend_attention import paged_extend_attention
        if which == "kvarn":
            return paged_extend_attention(self.q, self.kv, self.records, self.bt, self.lens, self.cu, self.cfg,
                                          max_q_len=self.t_new, **launch)
        if which == "fp16":
            return paged_extend_attention(self.q, self.kv_full, None, self.bt_full, self.lens, self.cu, None,
                                          max_q_len=self.t_new, **launch)
        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(self.t_new, self.n)
        return F.scaled_dot_product_attention(self.q_sdpa, self.k_sdpa, self.v_sdpa, attn_mask=mask,
                                              enable_gqa=True)

    def error(self, which):
        """Relative error of sequence 0 vs ``ref_paged_attention`` in fp32 on the K/V the
        kernel reads."""
        from kvarn.kernels.reference import ref_paged_attention
        kv, rec, bt, cfg = ((self.kv, self.records, self.bt, self.cfg) if which == "kvarn"
                            else (self.kv_full, None, self.bt_full, None))
        ref = ref_paged_attention(self.q[:self.t_new].float(), kv, rec, bt[:1], self.lens[:1], self.cu[:2], cfg)
        out = self.run(which)[:self.t_new].float()
        return float((out - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="extend.json")
    ap.add_argument("--shapes", nargs="*")
    ap.add_argument("--variants", action="store_true",
                    help="also time both kernels (rows, fa) at other row tiles, warp counts and stages, "
                         "on both caches")
    ap.add_argument("--workspace-only", action="store_true",
                    help="with --variants: only the fa kernel without and with the workspace, and over fp16")
    ap.add_argument("--plot", metavar="JSON", help="plot a results file (no GPU needed) and exit")
    args = ap.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    from kvarn.format import KVarNConfig
    cfg = KVarNConfig.from_name(PRESET, D)
    rows = []
    for label, b, prefix, t in SHAPES + WS_SHAPES:
        if (label not in args.shapes) if args.shapes else (label, b, prefix, t) in WS_SHAPES:
            continue
        case = ExtendCase(b, prefix, t, cfg)
        row = {"shape": label, "batch": b, "prefix": prefix, "new_tokens": t, "q_heads": HQ, "kv_heads": HKV,
               "head_dim": D, "record_blocks_per_seq": case.n_rec}
        for which in ("kvarn", "fp16", "sdpa"):
            row[f"{which}_ms"] = bench(lambda: case.run(which), rep=100)
        row["kvarn_rel_err"] = case.error("kvarn")
        row["fp16_rel_err"] = case.error("fp16")
        row["kvarn_over_sdpa"] = row["kvarn_ms"] / row["sdpa_ms"]
        row["kvarn_over_fp16"] = row["kvarn_ms"] / row["fp16_ms"]
        if args.variants:
            base = case.run("kvarn").float()
            row["variants"] = []
            # session 9 (results/extend_h100_s9.json): 64 rows at 4 warps 1.5-1.7x faster than
            # at 8, 128 rows 2.5-4x slower, 256 does not compile. Session 10 (s10.json): the
            # "fa" kernel 2x faster than "rows" with hundreds of new tokens, "rows" at 16-32
            # rows best with 4-8 new tokens; the default is now "auto" (extend_launch) and these are
            # the launches it chooses between and their neighbours, on both caches (the
            # launches test_extend_gpu_large checks).
            launches = [
                ("kvarn", "rows", 64, 4, 3, None), ("kvarn", "rows", 32, 4, 2, None),
                ("kvarn", "rows", 16, 2, 2, None), ("kvarn", "rows", 16, 2, 2, "joint"),
                ("kvarn", "rows", 16, 4, 2, "joint"), ("kvarn", "rows", 32, 4, 2, "joint"),
                ("kvarn", "fa", None, None, None, False),
                ("kvarn", "fa", None, None, None, True), ("kvarn", "fa", 128, 4, 2, None),
                ("kvarn", "fa", 64, 4, 2, None), ("kvarn", "fa", 128, 8, 3, None),
                ("fp16", "rows", 64, 4, 3, None), ("fp16", "rows", 16, 2, 2, None),
                ("fp16", "fa", None, None, None, None)]
            if args.workspace_only:
                launches = [x for x in launches if x[1] == "fa" and x[2] is None]
            for which, kernel, block_m, warps, stages, ws in launches:
                # the last field: the fa kernel's workspace, or "joint" for the rows kernel's
                # rec_joint (NOTES.md attempt 43)
                kw = dict(kernel=kernel, block_m=block_m, num_warps=warps, num_stages=stages)
                if ws == "joint":
                    kw["rec_joint"] = True
                else:
                    kw["workspace"] = ws
                try:
                    ref = base if which == "kvarn" else case.run("fp16").float()
                    diff = (case.run(which, **kw).float() - ref).abs().max().item()
                    ms = bench(lambda: case.run(which, **kw), rep=100)
                except Exception as e:    # a tile that does not compile or fit: record it, go on
                    row["variants"].append({"cache": which, **kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                row["variants"].append({"cache": which, **kw, "ms": ms, "max_abs_diff_vs_default": diff})
                print(f"    {which} {kernel} block_m {block_m} warps {warps} stages {stages} workspace/joint {ws}: "
                      f"{ms:.4f} ms "
                      f"(diff {diff:.1e})", flush=True)
        rows.append(row)
        _dump(args, rows)      # after every shape, so that a run cut off keeps what it measured
        print(f"{label:14s} kvarn {row['kvarn_ms']:.4f} fp16 {row['fp16_ms']:.4f} sdpa {row['sdpa_ms']:.4f} ms "
              f"(kvarn/sdpa {row['kvarn_over_sdpa']:.2f}; err kvarn {row['kvarn_rel_err']:.2e} "
              f"fp16 {row['fp16_rel_err']:.2e})", flush=True)
        del case
        torch.cuda.empty_cache()


def plot(path: str) -> str:
    """Per shape: KVarN, our fp16 paged kernel and SDPA (ms, log scale), and each kernel /
    launch variant that a --variants run timed (markers over the KVarN bar, or the fp16
    bar for the fp16 cache's; black the "rows" kernel, red "fa"). Writes the PNG next to
    the JSON and returns its path."""
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = json.load(open(path))
    rows = res["rows"]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(10, 5))
    w = 0.25
    for i, (name, color) in enumerate([("kvarn", "C0"), ("fp16", "C1"), ("sdpa", "C2")]):
        label = {"kvarn": "KVarN (the default launch at the run)", "fp16": "our fp16 paged", "sdpa": "SDPA fp16"}[name]
        ax.bar([j + (i - 1) * w for j in x], [r[f"{name}_ms"] for r in rows], w, label=label, color=color)
    marks = "ov^sD<>ph*xXd+"
    kind_of = lambda v: (v.get("cache", "kvarn"), v.get("kernel", "rows"), v["block_m"], v["num_warps"],
                         v.get("num_stages", 2), v.get("workspace"), v.get("rec_joint"))
    kinds = sorted({kind_of(v) for r in rows for v in r.get("variants", []) if "ms" in v}, key=str)
    for k, kind in enumerate(kinds):
        pts = [(j + (-w if kind[0] == "kvarn" else 0), v["ms"]) for j, r in enumerate(rows)
               for v in r.get("variants", []) if "ms" in v and kind_of(v) == kind]
        launch = "default launch" if kind[2] is None else f"{kind[2]} rows, {kind[3]} warps, {kind[4]} stages"
        if kind[5] is not None:
            launch += ", workspace" if kind[5] else ", no workspace"
        if kind[6]:
            launch += ", joint records"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marks[k % len(marks)],
                color="k" if kind[1] == "rows" else "C3", mfc="none",
                label=f"{'KVarN' if kind[0] == 'kvarn' else 'fp16'} {kind[1]}, {launch}")
    ax.set_yscale("log")
    ax.set_ylabel("ms (do_bench median, log)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['shape']}\n({r['batch']} seq, {r['new_tokens']} new)" for r in rows], fontsize=8)
    ax.set_title(f"extend attention on {res['device']['name']} ({res['kvarn_preset']}, 32/8 heads, D 128)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    return png


def _dump(args, rows):
    import triton
    props = torch.cuda.get_device_properties(0)
    json.dump({"command": " ".join(["python"] + sys.argv), "git_commit": git_commit(),
               "source_sha256": source_sha256(),
               "device": {"name": props.name, "sms": props.multi_processor_count},
               "versions": {"torch": torch.__version__, "triton": triton.__version__,
                            "python": platform.python_version(), "cuda": torch.version.cuda},
               "timing": "triton.testing.do_bench median (L2 flushed before each call)",
               "env": kvarn_env(), "kvarn_preset": PRESET, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
