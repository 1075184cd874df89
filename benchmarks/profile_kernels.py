"""Drive one decode shape and the store shape a few times, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:'_decode_kernel|_store_kernel' \
        --launch-skip 2 --launch-count 1 --section SchedulerStats --section WarpStateStats ... \
        python3 benchmarks/profile_kernels.py [--shape B64_N16K] [--store]

Each kernel runs 4 times (2 warm-up launches for ncu to skip). Decode: the default launch
of ``paged_decode_attention`` on benchmarks/kernels.py's PagedCase; store: the 8B 16K-token
prompt (kernels.py's store_inputs), the wrapper's default launch.
"""
import argparse
import sys

import torch

from kernels import PRESET, SHAPES, PagedCase, store_inputs   # this folder is sys.path[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="B64_N16K", help="a decode shape label of kernels.py (none: skip)")
    ap.add_argument("--store", action="store_true", help="also the 8B 16K-token store")
    ap.add_argument("--store-warps", type=int, help="store num_warps (default: the wrapper's)")
    args = ap.parse_args()
    from kvarn.format import KVarNConfig
    if args.shape and args.shape != "none":
        label, b, n, hq, hkv, d = next(s for s in SHAPES if s[0] == args.shape)
        case = PagedCase(b, n, hq, hkv, d, KVarNConfig.from_name(PRESET, d), want=("kvarn",))
        for _ in range(4):
            case.run_kvarn()
        torch.cuda.synchronize()
        print("decode", label, "done", file=sys.stderr)
    if args.store:
        from kvarn.kernels.store import store_tiles
        cfg = KVarNConfig.from_name(PRESET, 128)
        kv, src, dst, m = store_inputs(32, 8, 128, 16384, cfg)
        rec = torch.empty(32, m, 8, cfg.record_bytes, dtype=torch.uint8, device="cuda")
        for _ in range(4):
            store_tiles(kv, src, rec, dst, cfg, num_warps=args.store_warps)
        torch.cuda.synchronize()
        print("store done", file=sys.stderr)


if __name__ == "__main__":
    main()
