"""The Gluon path's fp16 sink/tail modes at batch sizes where the record kernel fills the
GPU (NOTES.md attempt 30): chunks (KVARN_GLUON_FP16_CHUNKS) x side stream
(KVARN_GLUON_SIDE_STREAM), each timed by do_bench and by CUDA-graph replay on one cache.

    python benchmarks/fp16_part_modes.py [--shapes D256_B64_N4K ...] [--out modes.json]
"""
import argparse
import json
import sys

import torch

from kernels import case_for, bench, git_commit, source_sha256   # this folder is sys.path[0]


def graph_ms(fn) -> float:
    """do_bench of the replay of a graph that captured one call of fn."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, rep=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["D256_B64_N4K", "D256_B16_N16K", "D64_B64_N16K", "B64_N16K",
                                                     "B16_N16K", "B64_N4K"])
    ap.add_argument("--out", default="modes.json")
    args = ap.parse_args()
    from kvarn.kernels import decode_attention as da
    rows = []
    for label in args.shapes:
        case, cfg, _ = case_for(label, want=("kvarn",))
        out = torch.empty_like(case.q)
        fn = lambda: da.paged_decode_attention(case.q, case.kv, case.records, case.bt, case.lens, cfg, out=out,
                                               kernel="gluon")
        ref = None
        for chunks in (False, True):
            for side in (False, True):
                da.GLUON_FP16_CHUNKS, da.GLUON_SIDE_STREAM = chunks, side
                res = fn().float().clone()
                ref = res if ref is None else ref
                row = {"shape": label, "fp16_chunks": chunks, "side_stream": side, "ms": bench(fn, rep=100),
                       "graph_ms": graph_ms(fn), "max_abs_diff": (res - ref).abs().max().item()}
                rows.append(row)
                print(f"{label:14s} chunks {chunks:d} side {side:d}: {row['ms']:.4f} ms, graph {row['graph_ms']:.4f}",
                      flush=True)
        del case
        torch.cuda.empty_cache()
    import triton
    json.dump({"command": " ".join(["python", *sys.argv]), "shapes": args.shapes,
               "git_commit": git_commit(), "source_sha256": source_sha256(),
               "device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__, "triton": triton.__version__},
               "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
