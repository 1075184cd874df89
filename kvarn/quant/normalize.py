"""Log-domain, Sinkhorn-like variance normalization of a batch of tiles.

Input tiles M: [N, R, C] fp32. Output scales s_col [N, C] and s_row [N, R] such that
B = M / s_col[:, None, :] / s_row[:, :, None] has balanced row and column spreads.
The scales kept are the best-so-far (lowest imbalance) over the iterations, the
identity included; dropping that selection costs accuracy (KVARN_FORMAT.md step 3).
"""
from __future__ import annotations

import torch

STD_CLAMP = (1e-3, 1e3)
IMBALANCE_EPS = 1e-8


def imbalance(x: torch.Tensor) -> torch.Tensor:
    """max/min ratio of column stds plus that of row stds (sample std, n-1). [N, R, C] -> [N]."""
    col = x.std(dim=1, unbiased=True)
    row = x.std(dim=2, unbiased=True)
    return (col.amax(-1) / col.amin(-1).clamp_min(IMBALANCE_EPS)
            + row.amax(-1) / row.amin(-1).clamp_min(IMBALANCE_EPS))


def normalize_tiles(m: torch.Tensor, iters: int = 8, log_clip=(-0.3, 10.0)):
    """Return (s_col [N, C], s_row [N, R]) for tiles m [N, R, C] (fp32)."""
    if m.dim() != 3:
        raise ValueError(f"normalize_tiles expects [N, R, C], got {tuple(m.shape)}")
    m = m.float()
    n, r, c = m.shape
    lo, hi = log_clip
    a = m.new_zeros(n, c)
    b = m.new_zeros(n, r)
    best = imbalance(m)
    best_a, best_b = a.clone(), b.clone()
    for _ in range(iters):
        cur = m / a.exp()[:, None, :] / b.exp()[:, :, None]
        a = (a + cur.std(dim=1, unbiased=True).clamp(*STD_CLAMP).log()).clamp(lo, hi)
        cur = m / a.exp()[:, None, :] / b.exp()[:, :, None]
        b = (b + cur.std(dim=2, unbiased=True).clamp(*STD_CLAMP).log()).clamp(lo, hi)
        cur = m / a.exp()[:, None, :] / b.exp()[:, :, None]
        score = imbalance(cur)
        better = score <= best
        best = torch.where(better, score, best)
        best_a = torch.where(better[:, None], a, best_a)
        best_b = torch.where(better[:, None], b, best_b)
    return best_a.exp(), best_b.exp()
