"""The Gluon record kernel's machine code, offline (no GPU): compiled for sm_90a by the
installed Triton (3.6 as on the GPU machine) with the JIT's alignment hints, then
disassembled with the cuobjdump Triton ships. Prints the register count, whether any
local-memory spill remains, and the record loop's instruction count and mix (the loop
is the longest backward branch).

    python benchmarks/gluon_sass.py [--d 128] [--qh 4] [--maxnreg N] [--ahead K] [--pair] [--raw] [--kall] [--qmma]

Defaults are decode_gluon.LAUNCH's (LAUNCH_PAIR's with --pair) for the head dim (session 8: D 128 at 168 registers,
2,319 instructions per record, 60% of them the unpack's LOP3 / HADD2 / HFMA2 / PRMT).
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

from gluon_ptx_diff import ROOT, REL, _load, compile_record_kernel   # this folder is sys.path[0]


def loop_ops(sass: str) -> list:
    """Opcodes of the longest backward branch's body."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    addr = lambda ln: int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16)
    best = None
    for ln in lines:
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr(ln):
            span = (addr(ln) - int(m.group(1), 16), int(m.group(1), 16), addr(ln))
            best = span if best is None or span > best else best
    if best is None:
        return []
    _, lo, hi = best
    ops = []
    for ln in lines:
        if lo <= addr(ln) <= hi:
            toks = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", ln).split()
            ops.append((toks[1] if toks[0].startswith("@") else toks[0]).split(".")[0])
    return ops


def disassemble(compiled) -> tuple:
    """(SASS text, cuobjdump -res-usage text) of a compiled kernel, with the cuobjdump
    that the installed Triton ships."""
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = [subprocess.run([os.path.join(tools, "cuobjdump"), flag, cubin], capture_output=True,
                              text=True, check=True).stdout for flag in ("-sass", "-res-usage")]
    return out[0], out[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--qh", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--ahead", type=int, default=None)
    ap.add_argument("--pair", action="store_true", help="two records per loop iteration")
    ap.add_argument("--raw", action="store_true", help="the subnormal code unpack (NOTES.md attempt 50)")
    ap.add_argument("--kall", action="store_true", help="a record's K words in one batch of loads (attempt 51)")
    ap.add_argument("--qmma", action="store_true", help="q hoisted, sum q kz by MMA (attempt 52; with --raw)")
    args = ap.parse_args()
    import triton
    m = _load(os.path.join(ROOT, REL), "decode_gluon_sass")
    maxnreg, _, ahead = m.LAUNCH[args.d]
    if args.pair and args.d in m.LAUNCH_PAIR:
        maxnreg, ahead = m.LAUNCH_PAIR[args.d][0], 0
    maxnreg = args.maxnreg if args.maxnreg is not None else maxnreg
    ahead = args.ahead if args.ahead is not None else ahead
    k = compile_record_kernel(m, args.qh, args.d, maxnreg, ahead, hints=True, pair=args.pair, raw=args.raw,
                              kall=args.kall, qmma=args.qmma)
    sass, res = disassemble(k)
    regs = re.findall(r"REG:(\d+)", res)
    ops = loop_ops(sass)
    mix = collections.Counter(ops)
    print(f"triton {triton.__version__}, D={args.d} QH={args.qh} maxnreg={maxnreg} ahead={ahead} pair={args.pair} raw={args.raw} kall={args.kall} qmma={args.qmma}: "
          f"registers {regs[0] if regs else '?'}, spill instructions anywhere {sass.count('STL')}")
    print(f"record loop: {len(ops)} instructions, STL {mix['STL']} LDL {mix['LDL']}")
    print("mix: " + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))


if __name__ == "__main__":
    main()
