"""Small-batch decode: the Gluon path's split count and record prefetch under CUDA-graph
replay (kernels.py ``graph_latency``: 16 distinct caches, L2 cold), for the B1 N32K
shortfall (benchmarks/NOTES.md session 12).

    python benchmarks/b1_launch.py [--shapes B1_N32K B1_N128K] [--splits 64 96 128 192 256]
                                   [--out b1_launch.json]

Per shape: the default call ("kvarn"), SDPA, and the Gluon path at each split count x
prefetch ("l2": one record ahead into L2, "l2x2": two, None), at 128 splits without
the register cap and at 200 registers, and at 128-256 splits under a 128 / 144 register
cap (16 programs per SM: 256 splits in one wave), each variant's output checked
against the default's on one cache first (max abs difference). Then the
default's kernels profiled inside the replays with programmatic dependent launch off,
so that no kernel's time includes waiting for the one before it (with PDL on, each
kernel is launched early and its device time includes that wait).
"""
import argparse
import json

import torch

from kernels import case_for, graph_latency, run_header   # this folder is sys.path[0]

PREFETCH = ("l2", "l2x2", None)


def check(label: str, variants: dict) -> dict:
    """Max abs difference of each variant's output from the default call's, one cache."""
    from kvarn.kernels.decode_attention import paged_decode_attention
    case, cfg, _ = case_for(label, want=("kvarn",))
    run = lambda **kw: paged_decode_attention(case.q, case.kv, case.records, case.bt, case.lens, cfg, **kw).float()
    base = run()
    out = {name: (run(**kw) - base).abs().max().item() for name, kw in variants.items()}
    del case
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["B1_N32K", "B1_N128K"])
    ap.add_argument("--splits", nargs="*", type=int, default=[64, 96, 128, 192, 256])
    ap.add_argument("--out", default="b1_launch.json")
    args = ap.parse_args()
    from kvarn.kernels import decode_attention
    res = {**run_header(), "rows": []}
    for label in args.shapes:
        variants = {f"s{s}_{p}": dict(kernel="gluon", num_splits=s, prefetch=p)
                    for s in args.splits for p in PREFETCH}
        # the register cap (decode_gluon.LAUNCH: 168 at D 128, for 12 programs per SM at
        # large batches; B1's 1,024 programs do not need them all): uncapped and between
        for cap in (0, 200):
            variants[f"s128_l2_cap{cap}"] = dict(kernel="gluon", num_splits=128, prefetch="l2", maxnreg=cap)
        # below the cap: 128 registers (9 spill stores in the record loop, Triton 3.6
        # offline) fit 16 one-warp programs per SM, so 256 splits of one record each
        # (2,048 programs) are one wave on 132 SMs, where at 168 registers they are two
        # (NOTES.md attempt 49: slower, H100 session 14, B1 N32K 0.029-0.030 ms against 0.025)
        for s, p, cap in ((256, None, 128), (256, "l2", 128), (192, "l2", 128), (128, "l2", 128),
                          (256, None, 144)):
            variants[f"s{s}_{p}_cap{cap}"] = dict(kernel="gluon", num_splits=s, prefetch=p, maxnreg=cap)
        diffs = check(label, variants)
        copies = 8 if "128K" in label else 16
        g = graph_latency(label, copies=copies, variants=variants)
        row = {"shape": label, "copies": copies, "kvarn": g["kvarn"]["ms_median"], "sdpa": g["sdpa"]["ms_median"],
               "variants": [{"name": k, **variants[k], "ms": g["kvarn_" + k]["ms_median"],
                             "max_abs_diff_vs_default": diffs[k]} for k in variants]}
        default_pdl = decode_attention.PDL
        decode_attention.PDL = "0"
        try:
            cold = graph_latency(label, copies=copies, profile_names=("kvarn",))
        finally:
            decode_attention.PDL = default_pdl
        row["pdl_off"] = {"kvarn": cold["kvarn"]["ms_median"],
                          "kernels_ms_per_call": cold["kvarn"].get("kernels_ms_per_call")}
        res["rows"].append(row)
        json.dump(res, open(args.out, "w"), indent=1)
        best = min(row["variants"], key=lambda v: v["ms"])
        print(f"{label}: default {row['kvarn']:.4f} ms, sdpa {row['sdpa']:.4f}; best {best['name']} "
              f"{best['ms']:.4f}; PDL off {row['pdl_off']['kvarn']:.4f}, kernels {row['pdl_off']['kernels_ms_per_call']}",
              flush=True)
        for v in row["variants"]:
            print(f"    {v['name']:12s} {v['ms']:.4f} ms (diff {v['max_abs_diff_vs_default']:.1e})", flush=True)

if __name__ == "__main__":
    main()
