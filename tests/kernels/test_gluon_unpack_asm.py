"""The Gluon record kernel's unpack PTX (decode_gluon.K_ASM, _v_unpack_asm and their RAW
forms, NOTES.md attempt 50) run by a small interpreter on the CPU: every output register
holds the codes the fragment layout expects, centered (c - 8, c - 2) or, RAW, as fp16
subnormals that the kernel's row factors (RAW_K_EVEN / RAW_K_ODD per token parity,
2^24 / 4^j per V channel position) turn back into the codes. The GPU tests check the
kernel's outputs; this pins the bit-level contract between the PTX and those factors.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("triton.experimental.gluon")
from kvarn.kernels import decode_gluon as dg  # noqa: E402


def _f16x2(x: int) -> np.ndarray:
    return np.array([x & 0xFFFF, x >> 16], dtype=np.uint16).view(np.float16)


def _bits(h: np.ndarray) -> int:
    u = h.astype(np.float16).view(np.uint16)
    return int(u[0]) | (int(u[1]) << 16)


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = src[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Interpret the subset of PTX the unpack uses; $0..$(n_out-1) out, then the inputs."""
    regs = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else regs[tok]

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            r = val(a[1])
        elif op == "prmt.b32":
            r = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "and.b32":
            r = val(a[1]) & val(a[2])
        elif op == "lop3.b32":
            assert a[4] == "0xEA", a                              # (a & b) | c
            r = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "sub.f16x2":
            r = _bits(_f16x2(val(a[1])).astype(np.float64) - _f16x2(val(a[2])).astype(np.float64))
        elif op == "fma.rn.f16x2":
            x, y, z = (_f16x2(val(t)).astype(np.float64) for t in a[1:4])
            r = _bits(x * y + z)
        else:
            raise AssertionError(f"unexpected PTX {op}")
        regs[a[0]] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


def _asm(c) -> str:
    return c.value if hasattr(c, "value") else str(c)


@pytest.mark.parametrize("raw", [False, True])
def test_k_unpack(raw):
    rng = np.random.default_rng(5)
    asm = _asm(dg.K_ASM_RAW if raw else dg.K_ASM)
    for _ in range(200):
        wa, wb = (int(x) for x in rng.integers(0, 2**32, size=2, dtype=np.uint64))
        out = run_ptx(asm, [wa, wb], 8)
        for n in range(8):                                        # token n of the 8 in a word
            want = np.array([(wa >> 4 * n) & 15, (wb >> 4 * n) & 15], dtype=np.float64)
            got = _f16x2(out[n]).astype(np.float64)
            if raw:
                got = got * (_asm(dg.RAW_K_ODD) if n % 2 else _asm(dg.RAW_K_EVEN))
                assert np.array_equal(got, want), (n, got, want)
            else:
                assert np.array_equal(got, want - 8), (n, got, want)


@pytest.mark.parametrize("n_bytes", [4, 2])
@pytest.mark.parametrize("raw", [False, True])
def test_v_unpack(n_bytes, raw):
    rng = np.random.default_rng(6)
    asm = dg._v_unpack_asm(n_bytes, raw=raw)
    for _ in range(200):
        wa, wb = (int(x) for x in rng.integers(0, 2**32, size=2, dtype=np.uint64))
        out = run_ptx(asm, [wa, wb], 4 * n_bytes)
        for k in range(n_bytes):
            for j in range(4):                                    # channel 4k + j of the word
                want = np.array([(wa >> (8 * k + 2 * j)) & 3, (wb >> (8 * k + 2 * j)) & 3], dtype=np.float64)
                got = _f16x2(out[4 * k + j]).astype(np.float64)
                if raw:
                    assert np.array_equal(got * 2.0 ** 24 / 4 ** j, want), (k, j, got, want)
                else:
                    assert np.array_equal(got, want - 2), (k, j, got, want)


def test_interpreter_knows_every_op():
    """The PTX strings use only the ops run_ptx interprets (a new op fails here first)."""
    ops = set()
    for asm in (_asm(dg.K_ASM), _asm(dg.K_ASM_RAW), dg._v_unpack_asm(4), dg._v_unpack_asm(4, raw=True)):
        ops |= {m.group(1) for m in re.finditer(r"^\s*([a-z][\w.]*)\s", asm, re.M)}
    assert ops <= {".reg", "mov.b32", "prmt.b32", "and.b32", "lop3.b32", "sub.f16x2", "fma.rn.f16x2"}, ops
