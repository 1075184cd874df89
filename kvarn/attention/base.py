"""The attention seam: what a model layer calls with its post-RoPE q, k, v.

    out = backend.forward(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], md)  # [T, Hq, D]

T is every scheduled token of the step, sequences back to back (varlen):

    cu_seqlens_q   0      3   4        9          sequence b owns q rows cu[b] .. cu[b+1]-1
    q rows         a a a  b   c c c c c
    context_lens     N_a    N_b    N_c            cached prefix + these new tokens
    slot_mapping   fp16 block id * G + offset of every new token

The backend (1) moves k, v into the cache frame (KVarN: x @ H, fp16) and writes them
at slot_mapping, (2) attends: a step whose sequences all start at position 0
(``dense_prefill``) attends exactly over the fresh k, v in the model frame; anything
else reads the paged cache (kvarn/kernels/reference.py fixes the layout) with q in the
cache frame, and the output comes back through H.

The V-side rotation pair (v @ H on write, out @ H after attention) could be folded
into W_v and W_o at load time (H is orthonormal and symmetric), saving two matmuls per
layer; we keep it explicit so the model stays unaware of the cache format.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvarn.quant.hadamard import hadamard


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # int64 [T]
    block_tables: torch.Tensor      # int32 [B, max_blocks]
    context_lens: torch.Tensor      # int32 [B]
    cu_seqlens_q: torch.Tensor      # int32 [B+1]
    query_lens: list[int]           # host copy of the q lengths
    context_lens_host: list[int]    # host copy of context_lens
    is_decode: bool                 # every sequence has exactly one new token
    dense_prefill: bool             # every sequence starts at position 0
    skip_cache: bool = False        # profiling run: no pool, nothing written

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class AttentionBackend(ABC):
    def __init__(self, pool):
        self.pool = pool
        self._h: dict = {}

    def hadamard(self, d: int, dtype, device) -> torch.Tensor:
        key = (d, dtype, str(device))
        if key not in self._h:
            self._h[key] = hadamard(d, dtype, device)
        return self._h[key]

    def to_cache_frame(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """KVarN: x @ H computed in fp32, stored as dtype (fp16); 'auto': a cast."""
        if self.pool is None or not self.pool.rotated:
            return x.to(dtype)
        return (x.float() @ self.hadamard(x.shape[-1], torch.float32, x.device)).to(dtype)

    def from_cache_frame(self, x: torch.Tensor, dtype) -> torch.Tensor:
        return self.to_cache_frame(x, dtype)        # H @ H = I

    def forward(self, layer_idx: int, q, k, v, md: AttentionMetadata) -> torch.Tensor:
        if md.skip_cache:
            return self.dense_causal(q, k, v, md)
        kv, records = self.pool.layer(layer_idx)
        self.write_kv(kv, self.to_cache_frame(k, kv.dtype), self.to_cache_frame(v, kv.dtype), md.slot_mapping)
        if md.dense_prefill:
            return self.dense_causal(q, k, v, md)
        q_c = self.to_cache_frame(q, self.attention_dtype(q, kv))
        if md.is_decode:
            out = self.decode(q_c, kv, records, md)
        else:
            out = self.extend(q_c, kv, records, md)
        return self.from_cache_frame(out, q.dtype)

    def attention_dtype(self, q, kv) -> torch.dtype:
        return kv.dtype if self.pool.rotated else q.dtype

    def dense_causal(self, q, k, v, md: AttentionMetadata) -> torch.Tensor:
        """Exact causal attention of each sequence over its own fresh k, v (model frame)."""
        out = torch.empty_like(q)
        start = 0
        for n in md.query_lens:
            qb = q[start:start + n].transpose(0, 1)           # [Hq, n, D]
            kb = k[start:start + n].transpose(0, 1)
            vb = v[start:start + n].transpose(0, 1)
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                               scale=1.0 / math.sqrt(q.shape[-1]),
                                               enable_gqa=kb.shape[0] != qb.shape[0])
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out

    @abstractmethod
    def write_kv(self, kv, k, v, slot_mapping) -> None: ...

    @abstractmethod
    def decode(self, q, kv, records, md: AttentionMetadata) -> torch.Tensor: ...

    @abstractmethod
    def extend(self, q, kv, records, md: AttentionMetadata) -> torch.Tensor: ...
