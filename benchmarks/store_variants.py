"""Store kernel launch variants on the 8B 16K-token shape: time, bytes differing from the
default launch, and code/scale flips against the torch reference quantizer on the first
4 layers, for two inputs: zero-mean Gaussian tiles (``store_inputs``, the timing input)
and tiles with per-channel offsets (|mean| several stds, where a one-pass variance would
cancel). GPU sweeps behind benchmarks/NOTES.md's store attempts (16, 23, 24);
results/store_warps_h100.json came from this script's first form (store_warps.py),
results/store_onepass_h100.json from its form at c391d50, results/store_variants_h100.json
(with one_pass rows) from 90bba76, whose store kernel had the shifted one-pass variant.

    PYTHONPATH=. python3 benchmarks/store_variants.py $OUT/store_variants.json
"""
import json
import sys

import torch
import triton

from kvarn.format import KVarNConfig
from kvarn.kernels.reference import ref_store_tiles
from kvarn.kernels.store import store_tiles
from kvarn.quant.records import unpack_record_fields

from kernels import git_commit, source_sha256, store_inputs   # benchmarks/kernels.py (sys.path[0])

# (num_warps, maxnreg); None = the wrapper's default. Session 9 (offline, store_sass.py,
# triton 3.7.1): 8 warps capped at 128 registers keep the loop spill-free (965
# instructions per step per thread, 11 spill instructions outside it), so two 8-warp
# CTAs share an SM (16 warps, against the default's two 4-warp CTAs at 255 registers);
# 16 warps take 120 registers uncapped (one CTA, 654 per step).
VARIANTS = [(None, None), (8, None), (8, 128), (16, None)]


def biased(kv: torch.Tensor) -> torch.Tensor:
    """kv plus a per-(layer, K/V, head, channel) offset drawn from N(0, 4^2) in units of
    that channel's std (so |mean| / std is several for most channels)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    std = kv[:, :, :4].float().std(dim=(2, 4), keepdim=True)
    off = torch.randn(kv.shape[0], 2, 1, kv.shape[3], 1, kv.shape[5], device="cuda", generator=gen) * 4
    return (kv.float() + off * std).half()


def main(out_path):
    layers, hkv, d, tokens = 32, 8, 128, 16384
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join(sys.argv), "git_commit": git_commit(), "source_sha256": source_sha256(),
           "rows": []}
    for preset in ("kvarn_k4v2_g128", "kvarn_k4v4_g128"):
        cfg = KVarNConfig.from_name(preset, d)
        kv0, src, dst, m = store_inputs(layers, hkv, d, tokens, cfg)
        for data in ("gaussian", "offsets"):
            kv = kv0 if data == "gaussian" else biased(kv0)
            ref = torch.zeros(layers, m, hkv, cfg.record_bytes, dtype=torch.uint8, device="cuda")
            store_tiles(kv, src, ref, dst, cfg)
            torch_ref = torch.zeros_like(ref[:4])
            ref_store_tiles(kv[:4], src, torch_ref, dst, cfg)
            fr = unpack_record_fields(torch_ref.reshape(-1, cfg.record_bytes), cfg)
            for w, nreg in VARIANTS:
                rec = torch.zeros_like(ref)
                store_tiles(kv, src, rec, dst, cfg, num_warps=w, maxnreg=nreg)
                diff = int((rec != ref).sum())
                fg = unpack_record_fields(rec[:4].reshape(-1, cfg.record_bytes), cfg)
                ms = None
                if data == "gaussian":
                    ms = triton.testing.do_bench(
                        lambda: store_tiles(kv, src, rec, dst, cfg, num_warps=w, maxnreg=nreg),
                        warmup=5, rep=50)
                row = {"preset": preset, "data": data, "num_warps": w or "default", "maxnreg": nreg,
                       "ms": ms, "bytes_differing_from_default": diff,
                       "flips_vs_torch_first4layers": {k: int((fg[k] != fr[k]).sum()) for k in fg},
                       "codes_first4layers": int(fg["k_codes"].numel())}
                print(row, flush=True)
                res["rows"].append(row)
    json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "store_variants.json")
