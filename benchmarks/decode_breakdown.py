"""Per-kernel GPU time of one decode call (torch.profiler, CUDA activity), for the
small-batch shapes where launches and the split merge, not record bytes, set the time.

    python benchmarks/decode_breakdown.py [--shapes B1_N32K ...] [--out breakdown.json]

Each shape: the default ``paged_decode_attention`` call (and kernel="triton"), 20 calls
after warm-up; per kernel name the mean device time per call, and the wall time per call
of the whole sequence (launch gaps included) from CUDA events. Then kernels.py's
CUDA-graph replay timing (16 distinct caches, L2 cold), with the default path's kernels
profiled inside the replays (``kernels_ms_per_call`` of the graph rows: cold-L2 kernel
times; the eager rows above reuse one cache, whose records may stay in L2).
"""
import argparse
import json

import torch

from kernels import case_for, graph_latency, kernel_times, run_header, wall_ms   # this folder is sys.path[0]


def breakdown(label: str, kernel: str, calls: int = 20, num_splits: int | None = None,
              maxnreg: int | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from kvarn.kernels.decode_attention import paged_decode_attention
    case, cfg, _ = case_for(label, want=("kvarn",))
    out = torch.empty_like(case.q)
    fn = lambda: paged_decode_attention(case.q, case.kv, case.records, case.bt, case.lens, cfg, out=out,
                                        kernel=kernel, num_splits=num_splits, maxnreg=maxnreg)
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = kernel_times(prof, calls)
    wall = wall_ms(fn, calls)
    del case
    torch.cuda.empty_cache()
    return {"shape": label, "kernel": kernel, "num_splits": num_splits, "maxnreg": maxnreg, "kernels_ms_per_call": per,
            "sum_kernels_ms": sum(per.values()), "wall_ms_per_call": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["B1_N4K", "B1_N32K", "B1_N128K", "D64_B1_N32K"])
    ap.add_argument("--out", default="breakdown.json")
    ap.add_argument("--gluon-launch", nargs="*", default=[], metavar="SPLITS[:MAXNREG]",
                    help="also profile kernel='gluon' at these split counts (and register caps); "
                         "e.g. 254:128 = one record per program, 16 programs per SM at D 128")
    args = ap.parse_args()
    rows = []
    for label in args.shapes:
        launches = [("auto", None, None), ("triton", None, None), ("gluon", None, None)]
        for spec in args.gluon_launch:
            splits, _, reg = spec.partition(":")
            launches.append(("gluon", int(splits), int(reg) if reg else None))
        for kernel, splits, reg in launches:
            r = breakdown(label, kernel, num_splits=splits, maxnreg=reg)
            rows.append(r)
            print(f"{label:14s} {kernel:6s} splits {splits or 'default':>7} regs {reg or 'default':>7} "
                  f"wall {r['wall_ms_per_call']:.4f} ms, kernels {r['sum_kernels_ms']:.4f}: "
                  + ", ".join(f"{k[:40]} {v:.4f}" for k, v in r["kernels_ms_per_call"].items()), flush=True)
    graph = []
    for label in args.shapes:
        r = graph_latency(label, copies=8 if "128K" in label else 16, profile_names=("kvarn",))
        graph.append(r)
        print(f"graph {label:14s}: kvarn {r['kvarn']['ms_median']:.4f} sdpa {r['sdpa']['ms_median']:.4f} ms "
              f"(kvarn/sdpa {r['kvarn_over_sdpa']:.2f})"
              + "".join(f", {k[6:]} kernel {r[k]['ms_median']:.4f}" for k in ("kvarn_triton", "kvarn_gluon") if k in r)
              + "; in the replays: " + ", ".join(f"{k[:40]} {v:.4f}"
                                                 for k, v in r["kvarn"].get("kernels_ms_per_call", {}).items()),
              flush=True)
    json.dump({**run_header(), "rows": rows, "graph_latency": graph}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
