"""The Gluon record kernel's code unpack with the fp16 magic number ("centered", the
kernel since session 5) against the subnormal one ("raw", NOTES.md attempt 50), with
and without the K words in one batch of loads ("kall", attempt 51) and the hoisted q
with the zero terms by MMA ("qmma", attempts 52-53), under CUDA-graph replay (kernels.py
``graph_latency``: distinct caches, L2 cold), all in one run; raw's output is checked
against centered's first.

    python benchmarks/raw_codes.py [--shapes B1_N32K ...] [--out raw_codes.json]
"""
import argparse
import json

import torch

from kernels import case_for, graph_latency, run_header   # this folder is sys.path[0]

SHAPES = ["B1_N4K", "B1_N32K", "B1_N128K", "B16_N16K", "B64_N16K", "D64_B1_N32K", "D64_B64_N16K",
          "D256_B16_N16K"]
VARIANTS = {"centered": dict(kernel="gluon", raw=False), "raw": dict(kernel="gluon", raw=True),
            # attempt 51 (head_dim 128 only): a record's K words in one batch of loads
            "raw_kall": dict(kernel="gluon", raw=True, kall=True),
            "kall": dict(kernel="gluon", raw=False, kall=True),
            # attempts 52-53: q hoisted, the zero terms by MMA (with raw)
            "raw_qmma": dict(kernel="gluon", raw=True, qmma=True),
            "raw_qmma_kall": dict(kernel="gluon", raw=True, qmma=True, kall=True),
            # offline the raw loop needs 181 registers uncapped against LAUNCH's cap of 168
            "raw_qmma_cap0": dict(kernel="gluon", raw=True, qmma=True, maxnreg=0),
            # attempt 53's centered QMMA spills once at 168 registers (offline), none at 176
            "raw_qmma_cap176": dict(kernel="gluon", raw=True, qmma=True, maxnreg=176)}


def copies_for(label: str) -> int:
    """Enough distinct caches that the graph's data is several times the L2, within memory."""
    if label.startswith(("B1_", "D64_B1")):
        return 8 if "128K" in label else 16
    return 2


def diff(label: str) -> float:
    """max |raw - centered| / max |centered| on one cache."""
    from kvarn.kernels.decode_attention import paged_decode_attention
    case, cfg, _ = case_for(label, want=("kvarn",))
    run = lambda raw: paged_decode_attention(case.q, case.kv, case.records, case.bt, case.lens, cfg,
                                             kernel="gluon", raw=raw).float()
    a, b = run(False), run(True)
    out = ((b - a).abs().max() / a.abs().max()).item()
    del case
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=SHAPES)
    ap.add_argument("--out", default="raw_codes.json")
    ap.add_argument("--variants", nargs="*", help="time only these variants, SDPA and the default")
    ap.add_argument("--no-diff", action="store_true", help="skip the output check")
    args = ap.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants} if args.variants else VARIANTS
    res = {**run_header(), "rows": []}
    for label in args.shapes:
        d = float("nan") if args.no_diff else diff(label)
        g = graph_latency(label, copies=copies_for(label), variants=variants,
                          only=("kvarn", "sdpa") if args.variants else None)
        row = {"shape": label, "copies": copies_for(label), "rel_max_diff_raw_vs_centered": d,
               "default": g["kvarn"]["ms_median"], "sdpa": g["sdpa"]["ms_median"],
               **{k: g["kvarn_" + k]["ms_median"] for k in variants}, "timings": g}
        res["rows"].append(row)
        json.dump(res, open(args.out, "w"), indent=1)
        print(f"{label}: default {row['default']:.4f} ms, sdpa {row['sdpa']:.4f}; diff {d:.2e}; "
              + ", ".join(f"{k} {row[k]:.4f} ({row['sdpa'] / row[k]:.2f}x sdpa)" for k in variants), flush=True)


if __name__ == "__main__":
    main()
