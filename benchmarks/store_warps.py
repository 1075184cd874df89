"""Store kernel under other num_warps on the 8B 16K-token shape: time and byte equality
with the default launch (a GPU sweep behind benchmarks/NOTES.md's store attempts)."""
import json
import sys

import torch
import triton

from kvarn.format import KVarNConfig
from kvarn.kernels.store import store_tiles

from kernels import store_inputs     # benchmarks/kernels.py (this folder is sys.path[0])


def main(out_path):
    layers, hkv, d, tokens = 32, 8, 128, 16384
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join(sys.argv), "rows": []}
    for preset in ("kvarn_k4v2_g128", "kvarn_k4v4_g128"):
        cfg = KVarNConfig.from_name(preset, d)
        kv, src, dst, m = store_inputs(layers, hkv, d, tokens, cfg)
        ref = torch.zeros(layers, m, hkv, cfg.record_bytes, dtype=torch.uint8, device="cuda")
        store_tiles(kv, src, ref, dst, cfg)
        for w in (None, 8, 2):
            rec = torch.zeros_like(ref)
            store_tiles(kv, src, rec, dst, cfg, num_warps=w)
            diff = int((rec != ref).sum())
            ms = triton.testing.do_bench(lambda: store_tiles(kv, src, rec, dst, cfg, num_warps=w), warmup=5, rep=50)
            row = {"preset": preset, "num_warps": w or "default", "ms": ms, "bytes_differing_from_default": diff}
            print(row, flush=True)
            res["rows"].append(row)
    json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "store_warps.json")
