#!/usr/bin/env python
"""CPU fp32 linears as the engine runs them: ``kvarn.models.layers.linear`` with and
without the oneDNN-packed weight, against ``F.linear``, on SmolLM2-135M-shaped weights.

    python benchmarks/cpu_linear.py --out benchmarks/results/cpu_linear.json

Layers: 30 distinct copies of one decoder layer's four linears (qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536: 425 MB of fp32), called in turn so every weight streams
from DRAM as in a decode step; the LM head (49152x576, 113 MB) alone. Rows 1 (batch-1
decode) and 8 (batch 8). GB/s = weight bytes / time. Median of --reps passes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import _cpu_name, _meta  # noqa: E402  (benchmarks/engine.py: device name, command/commit/versions)

from kvarn.models.layers import linear  # noqa: E402

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for _ in range(args.layers) for n, k in LAYER]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    head = torch.randn(49152, 576)
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head)
    layer_bytes = sum(w.numel() for w in weights) * 4
    rows = []
    for m in (1, 8):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        variants = {
            "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
            "linear, unpacked (W @ x.T at <= 8 rows)": lambda: [linear(xs[w.shape[1]], w) for w in weights],
            "linear, oneDNN-packed": lambda: [linear(xs[w.shape[1]], w, packed=p) for w, p in zip(weights, packed)],
        }
        for name, fn in variants.items():
            ms = timed(fn, args.reps)
            rows.append({"what": f"{args.layers} layers' linears", "rows": m, "variant": name, "ms": ms,
                         "weight_GBps": layer_bytes / ms / 1e6})
        x = torch.randn(m, 576)
        for name, fn in {"F.linear": lambda: F.linear(x, head),
                         "linear, unpacked (W @ x.T at <= 8 rows)": lambda: linear(x, head),
                         "linear, oneDNN-packed": lambda: linear(x, head, packed=head_packed)}.items():
            ms = timed(fn, args.reps * 4)
            rows.append({"what": "LM head 49152x576", "rows": m, "variant": name, "ms": ms,
                         "weight_GBps": head.numel() * 4 / ms / 1e6})
    for r in rows:
        print(f"{r['what']:24s} rows {r['rows']}  {r['variant']:40s} {r['ms']:8.2f} ms  {r['weight_GBps']:5.1f} GB/s")
    res = {**_meta(args), "device": {"cpu": _cpu_name(), "torch_threads": torch.get_num_threads()},
           "load_average": list(__import__("os").getloadavg()), "layer_weight_bytes": layer_bytes, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
