"""The store kernel's machine code, offline (no GPU): ``_store_kernel`` compiled for
sm_90a by the installed Triton (the GPU machine has 3.6) with the JIT's alignment
hints, disassembled with the cuobjdump Triton ships. Prints registers, spills and the
normalization loop's instruction count and mix (the loop is the longest backward branch).
Session 9, triton 3.7.1 (the CPU venv; session 4 counted 1,580 per step with 3.6):
255 registers and 1,558 instructions per step at 4 warps; 182 and 946 at 8 warps.

    python benchmarks/store_sass.py [--preset kvarn_k4v2_g128] [--d 128] [--warps 4] [--maxnreg N]
"""
import argparse
import collections
import inspect
import os
import re
import sys

from gluon_sass import disassemble, loop_ops      # this folder is sys.path[0]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="kvarn_k4v2_g128")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap (ptxas spills past it)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvarn.format import KVarNConfig
    from kvarn.kernels import store
    from kvarn.quant.normalize import IMBALANCE_EPS, STD_CLAMP
    from kvarn.quant.rtn import STEP_MIN
    cfg = KVarNConfig.from_name(args.preset, args.d)
    o = cfg.offsets
    const = dict(G=cfg.group_size, D=cfg.head_dim, K_BITS=cfg.k_bits, V_BITS=cfg.v_bits,
                 OFF_KC=o["k_codes"], OFF_KS=o["k_scale"], OFF_KZ=o["k_zero"], OFF_KT=o["k_tok"],
                 OFF_VC=o["v_codes"], OFF_VCH=o["v_chan"], OFF_VS=o["v_scale"], OFF_VZ=o["v_zero"],
                 OFF_END=o["end"], RB=cfg.record_bytes, ITERS=cfg.norm_iters,
                 E_LO=store._exp_f32(cfg.log_clip[0]), E_HI=store._exp_f32(cfg.log_clip[1]),
                 STD_LO=STD_CLAMP[0], STD_HI=STD_CLAMP[1], EPS=IMBALANCE_EPS, STEP_EPS=STEP_MIN,
                 )
    ptrs = {"k_ptr": "*fp16", "v_ptr": "*fp16", "src_ptr": "*i32", "rec_ptr": "*u8", "dst_ptr": "*i32"}
    fn = store._store_kernel
    names = list(inspect.signature(fn.fn).parameters)
    sig, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in ptrs:
            sig[n] = ptrs[n]
        elif n in const:
            sig[n] = "constexpr"
            constexprs[(i,)] = const[n]
        else:
            sig[n] = "i32"
        if n in ptrs or n.startswith("stride_"):      # what the JIT sees at run time
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=args.warps, **({"maxnreg": args.maxnreg} if args.maxnreg else {})))
    sass, res = disassemble(k)
    regs = re.findall(r"REG:(\d+)", res)
    smem = re.findall(r"SHARED:(\d+)", res)
    ops = loop_ops(sass)
    mix = collections.Counter(ops)
    total = len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass))
    print(f"triton {triton.__version__}, {args.preset} D={args.d} warps={args.warps} maxnreg={args.maxnreg}: "
          f"registers {regs[0] if regs else '?'}, static shared {smem[0] if smem else '?'}, "
          f"spill instructions anywhere {sass.count('STL')}, instructions in all {total}")
    print(f"longest loop: {len(ops)} instructions, BAR {mix['BAR']}, STL {mix['STL']} LDL {mix['LDL']}")
    print("mix: " + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))


if __name__ == "__main__":
    main()
