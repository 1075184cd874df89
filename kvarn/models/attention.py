"""The attention op of one decoder layer: post-RoPE q, k and v in, attention output out.

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]  ->  o [T, Hq * D]
    (this rank's heads; T = all tokens of the flattened batch)

Under an engine (``get_forward_context()`` set), the engine's attention backend does
everything that depends on the batch: it writes k and v into its paged KV cache and
attends each sequence's queries over that sequence's cached context, as described by
``ctx.attn_metadata``. ``v`` may be a strided view of the fused qkv output (row stride
(Hq + 2 * Hkv) * D); q and k are fresh tensors.

Without a context, the tokens are one sequence and attention is dense and causal;
query head h reads KV head h // (Hq / Hkv) (GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvarn.models.context import get_forward_context

__all__ = ["Attention", "dense_causal_attention"]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of one sequence -> [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # 4-D [1, H, T, D]: with 3-D inputs SDPA skips the flash/memory-efficient kernels.
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return o[0].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_tokens = q.shape[0]
        ctx = get_forward_context()
        if ctx is not None:
            return ctx.attn_backend.forward(self.layer_idx, q, k, v, ctx.attn_metadata).reshape(num_tokens, -1)
        return dense_causal_attention(q, k, v, self.scale).reshape(num_tokens, -1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, scale={self.scale:.6g}"
        )
