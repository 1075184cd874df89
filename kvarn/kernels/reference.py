"""Paged KV-cache operations in plain torch: the contract every Triton kernel meets.

The engine's CPU path runs these; the kernel tests compare the Triton kernels to them.
They work in the *cache frame*: for a KVarN cache everything is Hadamard-rotated
(the caller rotates q before and the output after); for an fp16 (``auto``) cache
the frame is the model's own.

Per layer, a cache holds two pools (shapes per rank: Hkv = this rank's KV heads):

    kv_fp16  fp16  [2, num_fp_blocks, Hkv, G, D]    K at [0], V at [1]; a block's tile
                                                     for one head is contiguous [G, D]
    records  uint8 [num_records, Hkv, record_bytes]  one KVarN record per (block, head);
                                                     None for an fp16 cache

A sequence's logical blocks map to physical ids through one row of ``block_tables``
(int32 [B, max_blocks]). Which pool an id points into follows from lengths alone.
With context_len N (the new tokens included) and q_len T new tokens, prefix = N - T:

    logical block   0        1 .. prefix//G - 1       prefix//G ... (N-1)//G
                    sink     full, committed blocks   fp16 blocks still filling
                    fp16     KVarN records            (hold the new tokens)

    e.g. G=4, prefix=13, T=3 (N=16):
    tokens     0123 | 4567 | 89ab | c d e f
    block      0    | 1    | 2    | 3
    pool       fp16 | rec  | rec  | fp16       block_tables[b] = [f0, r1, r2, f3, ...]

For an fp16 cache every logical block is an fp16 block. The engine keeps this true
by quantizing every full non-sink block at the end of the step that filled it.

Slot mapping (where new tokens' K/V are written): slot = fp16_block_id * G + offset.
Query layout is varlen: q [T_total, Hq, D] with cu_seqlens_q [B+1] (decode: T=1 each).
"""
from __future__ import annotations

import math

import torch

from kvarn.format import KVarNConfig
from kvarn.quant.attention import dense_attention
from kvarn.quant.records import dequantize_rotated_blocks, quantize_rotated_blocks


def num_record_blocks(prefix_len: int, group_size: int) -> int:
    """How many logical blocks (1 .. n) of a sequence are KVarN records."""
    return max(prefix_len // group_size - 1, 0)


def ref_write_kv(kv_fp16: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor):
    """Scatter new tokens' k, v [T, Hkv, D] into kv_fp16 [2, nb, Hkv, G, D] at slot_mapping [T]."""
    g = kv_fp16.shape[3]
    slot_mapping = slot_mapping.long()
    blk, off = slot_mapping // g, slot_mapping % g
    kv_fp16[0, blk, :, off] = k.to(kv_fp16.dtype)
    kv_fp16[1, blk, :, off] = v.to(kv_fp16.dtype)


def gather_context(kv_fp16, records, block_table, context_len: int, q_len: int,
                   cfg: KVarNConfig | None):
    """One sequence's context -> (k, v) [N, Hkv, D] fp32 in the cache frame."""
    g = kv_fp16.shape[3]
    n_blocks = (context_len + g - 1) // g
    n_rec = num_record_blocks(context_len - q_len, g) if cfg is not None else 0
    ids = block_table[:n_blocks].long()
    ks, vs = [], []
    for i in range(n_blocks):
        if 1 <= i <= n_rec:
            if i == 1:  # dequantize the whole run of records at once
                k, v = dequantize_rotated_blocks(records[ids[1:1 + n_rec]], cfg, torch.float32)
                ks.append(k.reshape(-1, *k.shape[2:]))
                vs.append(v.reshape(-1, *v.shape[2:]))
            continue
        ks.append(kv_fp16[0, ids[i]].float().transpose(0, 1))   # [G, Hkv, D]
        vs.append(kv_fp16[1, ids[i]].float().transpose(0, 1))
    return torch.cat(ks)[:context_len], torch.cat(vs)[:context_len]


def ref_paged_attention(q, kv_fp16, records, block_tables, context_lens, cu_seqlens_q,
                        cfg: KVarNConfig | None, sm_scale: float | None = None):
    """Causal attention of new tokens over paged caches.

    q [T_total, Hq, D] (cache frame); context_lens [B] (new tokens included);
    cu_seqlens_q [B+1]; returns [T_total, Hq, D] in q's dtype.
    """
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        q_b = q[cu[b]:cu[b + 1]]
        if q_b.shape[0] == 0:
            continue
        k, v = gather_context(kv_fp16, records, block_tables[b], lens[b], q_b.shape[0], cfg)
        out[cu[b]:cu[b + 1]] = dense_attention(q_b, k, v, scale, causal=True).to(q.dtype)
    return out


def ref_paged_decode_attention(q, kv_fp16, records, block_tables, context_lens,
                               cfg: KVarNConfig | None, sm_scale: float | None = None):
    """One new token per sequence: q [B, Hq, D] -> [B, Hq, D]."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return ref_paged_attention(q, kv_fp16, records, block_tables, context_lens, cu, cfg, sm_scale)


def ref_store_tiles(kv_fp16_all: torch.Tensor, src_blocks: torch.Tensor,
                    records_all: torch.Tensor, dst_blocks: torch.Tensor, cfg: KVarNConfig):
    """Quantize fp16 blocks into records, every layer at once, in place.

    kv_fp16_all fp16 [L, 2, nfp, Hkv, G, D] (already in the rotated frame);
    records_all uint8 [L, nrec, Hkv, RB]; src_blocks/dst_blocks [M] block ids.
    """
    if src_blocks.numel() == 0:
        return
    src = src_blocks.long()
    dst = dst_blocks.long()
    for layer in range(kv_fp16_all.shape[0]):
        k = kv_fp16_all[layer, 0, src].transpose(1, 2)           # [M, G, Hkv, D]
        v = kv_fp16_all[layer, 1, src].transpose(1, 2)
        records_all[layer, dst] = quantize_rotated_blocks(k.contiguous(), v.contiguous(), cfg)
