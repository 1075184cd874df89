"""Asymmetric round-to-nearest per row, and bit packing of code rows.

Codes pack the lowest index into the lowest bits: with b-bit codes, byte j of a row
holds codes j*(8/b) .. j*(8/b)+8/b-1, code i at shift (i mod 8/b)*b.
"""
from __future__ import annotations

import torch

STEP_MIN = 1e-10


def round_rows(x: torch.Tensor, bits: int):
    """x [..., L] fp32 -> (codes uint8 [..., L], step [...], lo [...]).

    lo is the float row minimum (the zero point), step = (max - min) / (2^bits - 1)
    clamped to 1e-10; torch.round rounds half to even, as Triton's rint does.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(-1)
    hi = x.amax(-1)
    step = ((hi - lo) / qmax).clamp_min(STEP_MIN)
    codes = torch.round((x - lo[..., None]) / step[..., None]).clamp(0, qmax)
    return codes.to(torch.uint8), step, lo


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., L] (values < 2^bits) -> packed uint8 [..., L*bits/8]."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"row length {codes.shape[-1]} is not a multiple of {per}")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., B] -> codes uint8 [..., B*8/bits]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)
