"""Session 5 sweep of the Gluon record kernel's knobs (prefetch, register cap, splits)."""
import json, os, sys, torch
sys.path.insert(0, "benchmarks")
from kernels import PagedCase, bench
from kvarn.format import KVarNConfig
cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
out = []
shapes = [(64, 16384, (2, 4)), (128, 8192, (1, 2)), (16, 16384, (6, 8, 12)), (64, 4096, (1, 2, 4)), (1, 131072, (48, 96, 128))]
for (b, n, splits) in shapes:
    c = PagedCase(b, n, 32, 8, 128, cfg, want=("kvarn",))
    ref = c.run_kvarn().float()
    t_ms = bench(lambda: c.run_kvarn(), rep=100)
    print(b, n, "triton", f"{t_ms:.4f}", flush=True)
    out.append(dict(batch=b, context=n, kernel="triton", ms=t_ms))
    for pf in (None, "l2", "l2x2"):
        for reg in (None, 168, 128):
            for s in splits:
                kw = dict(kernel="gluon", num_splits=s, prefetch=pf, maxnreg=reg)
                try:
                    o = c.run_kvarn(**kw).float()
                    d = float((o - ref).norm() / ref.norm())
                    ms = bench(lambda: c.run_kvarn(**kw), rep=100)
                    print(b, n, kw, f"{ms:.4f} rel {d:.1e}", flush=True)
                    out.append(dict(batch=b, context=n, **kw, ms=ms, rel_diff_vs_triton=d))
                except Exception as e:
                    print(b, n, kw, "ERR", type(e).__name__, str(e)[:200], flush=True)
    del c; torch.cuda.empty_cache()
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/gluon_sweep1.json", "w"), indent=1)
