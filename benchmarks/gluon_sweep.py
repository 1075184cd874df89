"""Session 5 sweep of the Gluon record kernel's knobs (prefetch, register cap, splits)
against the Triton kernel, on the GPU (benchmarks/NOTES.md attempt 26).

    PYTHONPATH=. python3 benchmarks/gluon_sweep.py --out benchmarks/results/gluon_sweep_h100.json
"""
import argparse
import json
import os
import platform
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import PagedCase, bench, git_commit, source_sha256  # noqa: E402

from kvarn.format import KVarNConfig  # noqa: E402

SHAPES = [(64, 16384, (2, 4)), (128, 8192, (1, 2)), (16, 16384, (6, 8, 12)), (64, 4096, (1, 2, 4)),
          (1, 131072, (48, 96, 128))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gluon_sweep.json")
    args = ap.parse_args()
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    props = torch.cuda.get_device_properties(0)
    res = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "git_commit": git_commit(), "source_sha256": source_sha256(),
           "device": {"name": props.name, "sms": props.multi_processor_count},
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "python": platform.python_version(), "cuda": torch.version.cuda},
           "timing": "triton.testing.do_bench median (L2 flushed), rep=100; 32/8 heads, D=128",
           "rows": []}
    for (b, n, splits) in SHAPES:
        c = PagedCase(b, n, 32, 8, 128, cfg, want=("kvarn",))
        ref = c.run_kvarn(kernel="triton").float()
        t_ms = bench(lambda: c.run_kvarn(kernel="triton"), rep=100)
        print(b, n, "triton", f"{t_ms:.4f}", flush=True)
        res["rows"].append(dict(batch=b, context=n, kernel="triton", ms=t_ms))
        for pf in (None, "l2", "l2x2"):
            for reg in (0, 168, 128):
                for s in splits:
                    kw = dict(kernel="gluon", num_splits=s, prefetch=pf, maxnreg=reg)
                    try:
                        d = float((c.run_kvarn(**kw).float() - ref).norm() / ref.norm())
                        ms = bench(lambda: c.run_kvarn(**kw), rep=100)
                    except Exception as e:    # record a failing setting, go on
                        print(b, n, kw, "ERR", type(e).__name__, str(e)[:200], flush=True)
                        continue
                    print(b, n, kw, f"{ms:.4f} rel {d:.1e}", flush=True)
                    res["rows"].append(dict(batch=b, context=n, **kw, ms=ms, rel_diff_vs_triton=d))
        del c
        torch.cuda.empty_cache()
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
