"""The KVarN pool: records for full committed blocks, fp16 blocks for sinks and tails.

    kv       fp16  [L, 2, nfp, Hkv, G, D]     rotated frame: sink blocks, filling tails,
                                              and blocks a prefill chunk just wrote
    records  uint8 [L, nrec, Hkv, RB]         one record per (layer, block, KV head)

Flush policy: at the end of the step that filled a non-sink block (all G tokens
committed), the block is quantized from its fp16 slot into a record, every layer at
once in ONE store launch (``flush``), and the driver frees the fp16 slot. The driver
picks the ids; the pool only moves bytes.

Payload layout (kvarn.transfer), N committed tokens, ns = min(N, G),
nrec = max(N//G - 1, 0), nt = N - ns - nrec*G (< G):

    records uint8 [Hkv, L, nrec, RB]   sink fp16 [Hkv, L, 2, ns, D]   tail fp16 [Hkv, L, 2, nt, D]
"""
from __future__ import annotations

import torch

from kvarn.cache.base import KVPool, numpy_to_torch, payload_torch_dtype, torch_to_numpy
from kvarn.cache.fp16_pool import gather_tokens
from kvarn.format import KVarNConfig
from kvarn.kernels.reference import num_record_blocks, ref_store_tiles
from kvarn.quant.hadamard import rotate
from kvarn.quant.records import quantize_rotated_blocks


def _store_fn(use_triton: bool):
    if use_triton:
        from kvarn.kernels.store import store_tiles
        return store_tiles
    return ref_store_tiles


def _quantize_rotated_fn(use_triton: bool):
    """fp16 rotated blocks [n, G, H, D] -> records [n, H, RB]."""
    if use_triton:
        try:
            from kvarn.kernels.store import quantize_blocks_triton
        except ImportError:
            return quantize_rotated_blocks
        return lambda k, v, cfg: quantize_blocks_triton(k, v, cfg, False)
    return quantize_rotated_blocks


def split_counts(num_tokens: int, g: int) -> tuple[int, int, int]:
    """(sink tokens, record blocks, tail tokens) of a committed sequence."""
    ns = min(num_tokens, g)
    nrec = num_record_blocks(num_tokens, g)
    return ns, nrec, num_tokens - ns - nrec * g


def quantize_tokens(toks: torch.Tensor, cfg: KVarNConfig, use_triton: bool | None = None):
    """Model-frame tokens [Hkv, L, 2, N, D] -> (records uint8 [Hkv, L, nrec, RB],
    sink fp16 [Hkv, L, 2, ns, D], tail fp16 [Hkv, L, 2, nt, D]) in the rotated frame.

    Rotation is the write path's (x @ H in fp32, stored fp16) and the full non-sink blocks
    are quantized as a flush would, so an imported 'auto' payload equals a KVarN prefill.
    """
    g = cfg.group_size
    hkv, nl, _, n, d = toks.shape
    ns, nrec, nt = split_counts(n, g)
    rot = rotate(toks, torch.float16)
    if nrec:
        full = rot[:, :, :, ns:ns + nrec * g]
        blocks = full.reshape(hkv, nl, 2, nrec, g, d).permute(2, 1, 3, 4, 0, 5)    # [2, L, nrec, G, Hkv, D]
        if use_triton is None:
            use_triton = toks.device.type == "cuda"
        rec = _quantize_rotated_fn(use_triton)(blocks[0].reshape(nl * nrec, g, hkv, d).contiguous(),
                                                blocks[1].reshape(nl * nrec, g, hkv, d).contiguous(), cfg)
        records = rec.reshape(nl, nrec, hkv, -1).permute(2, 0, 1, 3)
    else:
        records = torch.zeros(hkv, nl, 0, cfg.record_bytes, dtype=torch.uint8, device=toks.device)
    return records, rot[:, :, :, :ns], rot[:, :, :, ns + nrec * g:]


class KVarNPool(KVPool):
    rotated = True

    def __init__(self, *, kv_cache_dtype: str, sizing, num_layers, num_kv_heads, head_dim, dtype, device,
                 use_triton: bool | None = None):
        super().__init__(sizing=sizing, num_layers=num_layers, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, dtype=torch.float16, device=device)
        self.kv_cache_dtype = kv_cache_dtype
        self.cfg = KVarNConfig.from_name(kv_cache_dtype, head_dim)
        assert self.cfg.group_size == self.block_size
        self.records = torch.empty(num_layers, sizing.num_record_blocks, num_kv_heads, self.cfg.record_bytes,
                                   dtype=torch.uint8, device=self.device)
        self.use_triton = self.device.type == "cuda" if use_triton is None else use_triton
        self._store = _store_fn(self.use_triton)

    def flush(self, src_fp16_blocks, dst_record_blocks) -> None:
        if not src_fp16_blocks:
            return
        src = torch.tensor(src_fp16_blocks, dtype=torch.int32, device=self.device)
        dst = torch.tensor(dst_record_blocks, dtype=torch.int32, device=self.device)
        self._store(self.kv, src, self.records, dst, self.cfg)

    # --- transfer --------------------------------------------------------------
    def export_blocks(self, block_table, num_tokens) -> dict:
        g = self.block_size
        ns, nrec, nt = split_counts(num_tokens, g)
        sink = gather_tokens(self.kv, block_table[:1], ns)
        rec_ids = torch.tensor(block_table[1:1 + nrec], dtype=torch.long, device=self.device)
        records = self.records[:, rec_ids].permute(2, 0, 1, 3)                 # [Hkv, L, nrec, RB]
        if nt:
            tail = gather_tokens(self.kv, block_table[1 + nrec:2 + nrec], nt)
        else:
            tail = sink[:, :, :, :0]
        return {"records": torch_to_numpy(records), "sink": torch_to_numpy(sink), "tail": torch_to_numpy(tail)}

    def import_blocks(self, block_table, num_tokens, buffers, header) -> None:
        g = self.block_size
        ns, nrec, nt = split_counts(num_tokens, g)
        dev = self.device
        if header["kv_dtype"] == "auto":
            pd = payload_torch_dtype(header)
            toks = torch.cat([numpy_to_torch(buffers["sink"], pd, dev), numpy_to_torch(buffers["tail"], pd, dev)], 3)
            records, sink, tail = quantize_tokens(toks, self.cfg, self.use_triton)
            records = records.permute(1, 2, 0, 3)
        else:
            sink = numpy_to_torch(buffers["sink"], torch.float16, dev)
            tail = numpy_to_torch(buffers["tail"], torch.float16, dev)
            records = numpy_to_torch(buffers["records"], torch.uint8, dev).permute(1, 2, 0, 3) if nrec else None
        _write_partial_block(self.kv, block_table[0], sink)
        if nrec:
            ids = torch.tensor(block_table[1:1 + nrec], dtype=torch.long, device=dev)
            self.records[:, ids] = records
        if nt:
            _write_partial_block(self.kv, block_table[1 + nrec], tail)


def _write_partial_block(kv: torch.Tensor, block_id: int, toks: torch.Tensor) -> None:
    """toks [Hkv, L, 2, n <= G, D] -> the first n slots of fp16 block block_id."""
    n = toks.shape[3]
    kv[:, :, block_id, :, :n] = toks.permute(1, 2, 0, 3, 4).to(kv.dtype)
