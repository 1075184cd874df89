"""The rotation: Sylvester Hadamard of order D scaled by 1/sqrt(D).

Symmetric and orthonormal (H @ H = I), no random signs, one matrix for every layer
and head, so rotating back is the same product as rotating forward.
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=None)
def _hadamard_cpu_fp64(d: int) -> torch.Tensor:
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def hadamard(d: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """[d, d] normalized Sylvester Hadamard matrix."""
    return _hadamard_cpu_fp64(d).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ H over the last dim, computed in fp32, returned in ``out_dtype`` (default x's)."""
    h = hadamard(x.shape[-1], torch.float32, x.device)
    return (x.float() @ h).to(out_dtype or x.dtype)
