"""The 'auto' pool: every logical block is a plain block in the model's dtype.

    kv [L, 2, nfp, Hkv, G, D]; a sequence of N tokens uses block_table[0 .. ceil(N/G)-1],
    token p at block_table[p // G], offset p % G. No records, nothing to flush.

Export (kvarn.transfer's 'auto' layout): sink = the first min(N, G) tokens, tail = the
rest, both head-major [Hkv, L, 2, n, D] in the cache dtype, model frame.
"""
from __future__ import annotations

import math

import torch

from kvarn.cache.base import KVPool, numpy_to_torch, payload_torch_dtype, torch_to_numpy


def gather_tokens(kv: torch.Tensor, block_table: list[int], num_tokens: int) -> torch.Tensor:
    """kv [L, 2, nfp, Hkv, G, D] -> one sequence's tokens [Hkv, L, 2, num_tokens, D]."""
    g = kv.shape[4]
    ids = torch.tensor(block_table[: math.ceil(num_tokens / g)], dtype=torch.long, device=kv.device)
    x = kv[:, :, ids]                                     # [L, 2, nb, Hkv, G, D]
    x = x.permute(3, 0, 1, 2, 4, 5)                       # [Hkv, L, 2, nb, G, D]
    return x.reshape(*x.shape[:3], -1, x.shape[-1])[:, :, :, :num_tokens]


def scatter_tokens(kv: torch.Tensor, block_table: list[int], tokens: torch.Tensor) -> None:
    """tokens [Hkv, L, 2, n, D] -> kv blocks block_table[0 .. ceil(n/G)-1], in place."""
    g = kv.shape[4]
    n = tokens.shape[3]
    nb = math.ceil(n / g)
    if nb == 0:
        return
    ids = torch.tensor(block_table[:nb], dtype=torch.long, device=kv.device)
    padded = tokens.new_zeros(*tokens.shape[:3], nb * g, tokens.shape[4])
    padded[:, :, :, :n] = tokens
    x = padded.reshape(*tokens.shape[:3], nb, g, tokens.shape[4]).permute(1, 2, 3, 0, 4, 5)
    kv[:, :, ids] = x.to(kv.dtype)                        # [L, 2, nb, Hkv, G, D]


class FP16Pool(KVPool):
    kv_cache_dtype = "auto"
    rotated = False
    cfg = None

    def flush(self, src_fp16_blocks, dst_record_blocks) -> None:
        if src_fp16_blocks:
            raise RuntimeError("an 'auto' cache has no records to flush into")

    def export_quantized(self, block_table, num_tokens, preset: str) -> dict:
        """This rank's heads packed to a KVarN preset where the cache lives (the store
        kernel on a GPU), so only records + the fp16 sink/tail leave the device."""
        from kvarn.cache.kvarn_pool import quantize_tokens
        from kvarn.format import KVarNConfig

        toks = gather_tokens(self.kv, block_table, num_tokens)
        cfg = KVarNConfig.from_name(preset, toks.shape[-1])
        records, sink, tail = quantize_tokens(toks, cfg)      # rotated from the model dtype, as a write would
        return {"records": torch_to_numpy(records), "sink": torch_to_numpy(sink), "tail": torch_to_numpy(tail)}

    def export_blocks(self, block_table, num_tokens) -> dict:
        toks = gather_tokens(self.kv, block_table, num_tokens)
        ns = min(num_tokens, self.block_size)
        return {"sink": torch_to_numpy(toks[:, :, :, :ns]), "tail": torch_to_numpy(toks[:, :, :, ns:])}

    def import_blocks(self, block_table, num_tokens, buffers, header) -> None:
        if header["kv_dtype"] != "auto":
            raise RuntimeError("an 'auto' cache imports only 'auto' payloads (checked in validation)")
        dtype = self.kv.dtype
        sink = numpy_to_torch(buffers["sink"], payload_torch_dtype(header), self.device).to(dtype)
        tail = numpy_to_torch(buffers["tail"], payload_torch_dtype(header), self.device).to(dtype)
        scatter_tokens(self.kv, block_table, torch.cat([sink, tail], dim=3))
