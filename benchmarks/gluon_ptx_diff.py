"""Does the Gluon record kernel at head_dim 128 compile to the same instructions as an
earlier revision's? An offline check (no GPU): both revisions of
kvarn/kernels/decode_gluon.py are compiled for sm_90a by the installed Triton (3.6 on
the GPU machine; any release with Gluon), and their PTX is compared with register
names normalized and debug info dropped.

    python benchmarks/gluon_ptx_diff.py [--old-rev a951eb6] [--qh 4]

Prints the instruction counts, whether the instruction multisets are equal, and the
first index where the normalized sequences differ (the record loop ends before it if
only the epilogue changed). Exit status 0 when the multisets are equal.
"""
import argparse
import collections
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = "kvarn/kernels/decode_gluon.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def compile_record_kernel(m, qh: int, d: int = 128, maxnreg: int = 168, ahead: int = 1, hints: bool = False,
                          pair: bool = False, raw: bool = False, kall: bool = False,
                          qmma: bool = False):
    """``m.record_attention_kernel`` (m: a loaded decode_gluon module) compiled for
    sm_90a at QH = qh, head_dim d. hints=True adds the 16-divisibility the JIT gives
    pointers and the q / record strides at run time (without it loads do not vectorize,
    which changes the instruction count). pair: two records per loop iteration (session 8).
    raw: the subnormal code unpack (session 15, NOTES.md attempt 50); kall: a record's K
    words loaded in one batch (attempt 51); qmma: q hoisted and sum q kz by MMA (attempt 52)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, ROOT)
    from kvarn.format import KVarNConfig
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", d)
    o = cfg.offsets
    const = dict(QH=qh, G=cfg.group_size, AHEAD=ahead, OFF_KC=o["k_codes"], OFF_KS=o["k_scale"],
                 OFF_KZ=o["k_zero"], OFF_KT=o["k_tok"], OFF_VC=o["v_codes"], OFF_VCH=o["v_chan"],
                 OFF_VS=o["v_scale"], OFF_VZ=o["v_zero"])
    fn = m.record_attention_kernel
    names = list(inspect.signature(fn.fn).parameters)
    if "D" in names:                       # the head_dim-generic kernel (session 6)
        const.update(D=cfg.head_dim, PF_ASM=m.prefetch_asm(cfg.record_bytes) if ahead else "")
    if "PAIR" in names:
        const.update(PAIR=pair)
    if "RAW" in names:
        const.update(RAW=raw, PDL=False)
    if "KALL" in names:
        const.update(KALL=kall)
    if "QMMA" in names:
        const.update(QMMA=qmma)
    ptrs = {"q_ptr": "*fp16", "rec_ptr": "*u8", "bt_ptr": "*i32", "ctx_ptr": "*i32", "po_ptr": "*fp32",
            "plse_ptr": "*fp32"}
    aligned = set(ptrs) | {"stride_qb", "stride_qh", "stride_rb", "stride_rh"}
    sig, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in ptrs:
            sig[n] = ptrs[n]
        elif n == "qk_scale":
            sig[n] = "fp32"
        elif n in const:
            sig[n] = "constexpr"
            constexprs[(i,)] = const[n]
        else:
            sig[n] = "i32"
        if hints and n in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(GluonASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, maxnreg=maxnreg))


def _ptx(m, qh: int) -> str:
    return compile_record_kernel(m, qh).asm["ptx"]   # 168: the D-128 cap of both revisions


def _ops(ptx: str) -> list:
    """Instruction lines with registers renamed to R; labels, directives, debug info dropped."""
    out = []
    for line in ptx.splitlines():
        t = line.strip()
        if not t or t.startswith(("//", ".", "$", "{", "}", ")", "(")):
            continue
        t = t.split("//")[0].strip()
        out.append(re.sub(r"%(r|rd|f|p|rs|h|fd)\d+", "R", t))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old-rev", default="a951eb6")
    ap.add_argument("--qh", type=int, default=4)
    args = ap.parse_args()
    src = subprocess.run(["git", "-C", ROOT, "show", f"{args.old_rev}:{REL}"], check=True, capture_output=True,
                         text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    old = _ops(_ptx(_load(f.name, "gluon_old"), args.qh))
    os.unlink(f.name)
    new = _ops(_ptx(_load(os.path.join(ROOT, REL), "gluon_new"), args.qh))
    same = collections.Counter(old) == collections.Counter(new)
    first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    print(f"{args.old_rev}: {len(old)} instructions; working tree: {len(new)}; same multiset: {same}; "
          f"sequences equal up to instruction {first}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
