"""CUDA attention: the Triton kernels (same signatures as the reference ops).

The decode path does no host synchronisation, so the model runner can capture it in
a CUDA graph (block_tables / context_lens / slot_mapping are static buffers there).
"""
from __future__ import annotations

from kvarn.attention.base import AttentionBackend
from kvarn.kernels.reference import ref_write_kv


class TritonBackend(AttentionBackend):
    def __init__(self, pool):
        super().__init__(pool)
        from kvarn.kernels.decode_attention import paged_decode_attention
        from kvarn.kernels.extend_attention import paged_extend_attention
        self._decode = paged_decode_attention
        self._extend = paged_extend_attention

    def write_kv(self, kv, k, v, slot_mapping) -> None:
        # An index_put on device tensors: no host sync, graph-capturable.
        ref_write_kv(kv, k, v, slot_mapping)

    def attention_dtype(self, q, kv):
        return kv.dtype          # the kernels compute in the cache's fp16/bf16

    def decode(self, q, kv, records, md):
        return self._decode(q, kv, records, md.block_tables, md.context_lens, self.pool.cfg)

    def extend(self, q, kv, records, md):
        return self._extend(q, kv, records, md.block_tables, md.context_lens, md.cu_seqlens_q, self.pool.cfg,
                            max_q_len=max(md.query_lens))
