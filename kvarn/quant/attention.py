"""Reference attention over one sequence's KVarN cache (the kernels' oracle).

One sequence's cache, per layer, in the rotated frame:

    positions  0 ........ G-1 | G ....... 2G-1 | ... | nb*G+G ... N-1
               sink (fp16)    | record 0        | ... | tail (fp16, < G tokens
               [Ls, Hkv, D]   | [nb, Hkv, RB]         in decode) [Lt, Hkv, D]

Queries are the last Lq positions of the context (decode: Lq = 1). Query i sits at
position N - Lq + i and, causally, sees positions <= its own. q is rotated by H,
scores need no un-rotation (q H (K H)^T = q K^T), the output is rotated back by H.
Everything here runs in fp32.
"""
from __future__ import annotations

import math

import torch

from kvarn.format import KVarNConfig
from kvarn.quant.hadamard import rotate
from kvarn.quant.records import dequantize_rotated_blocks


def assemble_context(sink_k, sink_v, records, tail_k, tail_v, cfg: KVarNConfig):
    """Concatenate sink, dequantized records and tail -> (k, v) [N, Hkv, D] fp32 (rotated frame)."""
    ks, vs = [sink_k.float()], [sink_v.float()]
    if records is not None and records.shape[0] > 0:
        k, v = dequantize_rotated_blocks(records, cfg, torch.float32)   # [nb, G, H, D]
        ks.append(k.reshape(-1, *k.shape[2:]))
        vs.append(v.reshape(-1, *v.shape[2:]))
    if tail_k is not None and tail_k.shape[0] > 0:
        ks.append(tail_k.float())
        vs.append(tail_v.float())
    return torch.cat(ks, 0), torch.cat(vs, 0)


def dense_attention(q, k, v, sm_scale: float | None = None, causal: bool = True):
    """q [Lq, Hq, D], k/v [N, Hkv, D] (Hq a multiple of Hkv) -> [Lq, Hq, D] fp32.

    Queries are the last Lq positions of the N-token context.
    """
    lq, hq, d = q.shape
    n, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if lq > n:
        raise ValueError(f"{lq} queries but only {n} context tokens")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    rep = hq // hkv
    kk = k.float().repeat_interleave(rep, dim=1)     # [N, Hq, D]
    vv = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,nhd->hqn", q.float(), kk) * scale
    if causal:
        qpos = torch.arange(n - lq, n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqn,nhd->qhd", p, vv)


def reference_extend_attention(q, sink_k, sink_v, records, tail_k, tail_v, cfg: KVarNConfig,
                               sm_scale: float | None = None):
    """q [Lq, Hq, D] in the original frame -> attention output [Lq, Hq, D] fp32, original frame."""
    k, v = assemble_context(sink_k, sink_v, records, tail_k, tail_v, cfg)
    q_rot = rotate(q, torch.float32) if cfg.rotate else q.float()
    o = dense_attention(q_rot, k, v, sm_scale, causal=True)
    return rotate(o, torch.float32) if cfg.rotate else o


def reference_decode_attention(q, sink_k, sink_v, records, tail_k, tail_v, cfg: KVarNConfig,
                               sm_scale: float | None = None):
    """One decode step: q [Hq, D] (original frame) -> [Hq, D] fp32 (original frame)."""
    return reference_extend_attention(q[None], sink_k, sink_v, records, tail_k, tail_v, cfg, sm_scale)[0]
