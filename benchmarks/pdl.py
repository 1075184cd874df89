"""Programmatic dependent launch (``KVARN_PDL``, NOTES.md attempt 38) on and off, in one
process, alternating: CUDA-graph replay per decode call (kernels.py ``graph_latency``: 16
distinct caches, L2 cold) and the eager time per call of 50 back-to-back calls.

    python benchmarks/pdl.py [--shapes B1_N32K ...] [--rounds 2] [--out pdl.json]

Every path of ``graph_latency`` is timed each way: "kvarn" (the default), the Triton
and Gluon kernels, the fp16 cache ("fp16", our paged kernel) and SDPA (unaffected: the
spread of its two numbers is the noise of the run).
"""
import argparse
import json

import torch

from kernels import case_for, graph_latency, run_header, wall_ms   # this folder is sys.path[0]


def eager_ms(label: str, calls: int = 50) -> float:
    """Wall time per call of ``calls`` back-to-back default decode calls (CUDA events)."""
    from kvarn.kernels.decode_attention import paged_decode_attention
    case, cfg, _ = case_for(label, want=("kvarn",))
    out = torch.empty_like(case.q)
    fn = lambda: paged_decode_attention(case.q, case.kv, case.records, case.bt, case.lens, cfg, out=out)
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    ms = wall_ms(fn, calls)
    del case
    torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["B1_N4K", "B1_N32K", "B1_N128K", "D64_B1_N32K", "B16_N16K"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="pdl.json")
    args = ap.parse_args()
    from kvarn.kernels import decode_attention
    header, default = run_header(), decode_attention.PDL
    rows = []
    for label in args.shapes:
        for rnd in range(args.rounds):
            for mode in ("0", "1"):
                decode_attention.PDL = mode
                g = graph_latency(label, copies=8 if "128K" in label else 16)
                r = {"shape": label, "round": rnd, "pdl": mode, "eager_ms": eager_ms(label),
                     **{k: g[k]["ms_median"] for k in ("kvarn", "kvarn_triton", "kvarn_gluon", "fp16", "sdpa") if k in g}}
                rows.append(r)
                print(f"{label:12s} round {rnd} pdl {mode}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)), flush=True)
                # rewritten after every row: a later fault must not lose the numbers
                json.dump({**header, "rows": rows}, open(args.out, "w"), indent=1)
    decode_attention.PDL = default


if __name__ == "__main__":
    main()
