"""CPU attention: the reference ops of kvarn/kernels/reference.py, plus one batched decode.

Prefill chunks call ``ref_paged_attention`` as it is. Decode steps gather every
sequence's context at once and run one masked SDPA, the same math as
``ref_paged_decode_attention`` (which loops over sequences: tens of small ops per
sequence and layer, the larger part of a CPU decode step at batch 8):

    block_tables [B, nb] --is-record mask (1 <= i <= (N_b - 2)//G, reference.py)-->
      fp16 ids   -> kv[0/1] gathered                  [Hkv, B, nb, G, D]
      record ids -> dequantize_rotated_blocks(...)    written into the record slots
    -> K, V [B, Hkv, nb*G, D] fp32, key j visible to row b iff j < N_b
    -> SDPA(q [B, Hq, 1, D], K, V, mask, GQA)         [B, Hq, D]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvarn.attention.base import AttentionBackend
from kvarn.kernels.reference import ref_paged_attention, ref_write_kv
from kvarn.quant.records import dequantize_rotated_blocks


def batched_decode_attention(q, kv, records, block_tables, context_lens, context_lens_host, cfg,
                             sm_scale: float | None = None):
    """q [B, Hq, D] (cache frame) -> [B, Hq, D]; ``ref_paged_decode_attention`` semantics."""
    b, hq, d = q.shape
    g = kv.shape[3]
    hkv = kv.shape[2]
    nb = math.ceil(max(context_lens_host) / g)
    ids = block_tables[:, :nb].long()
    if cfg is not None:
        n_rec = ((context_lens.long() - 1) // g - 1).clamp_min(0)              # records of the prefix
        pos = torch.arange(nb, device=q.device)
        is_rec = (pos[None, :] >= 1) & (pos[None, :] <= n_rec[:, None])
        fp_ids = ids.masked_fill(is_rec, 0)
    else:
        fp_ids = ids
    # gather into [Hkv, B, nb, G, D]: (nb, G, D) stay contiguous, so [B, Hkv, nb*G, D] is a view
    k = kv[0].transpose(0, 1)[:, fp_ids].float()
    v = kv[1].transpose(0, 1)[:, fp_ids].float()
    if cfg is not None and bool(is_rec.any()):
        kr, vr = dequantize_rotated_blocks(records[ids[is_rec]], cfg, torch.float32)   # [n, G, Hkv, D]
        k[:, is_rec] = kr.permute(2, 0, 1, 3)
        v[:, is_rec] = vr.permute(2, 0, 1, 3)
    k = k.transpose(0, 1).reshape(b, hkv, nb * g, d)
    v = v.transpose(0, 1).reshape(b, hkv, nb * g, d)
    mask = torch.arange(nb * g, device=q.device)[None, :] < context_lens.long()[:, None]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = F.scaled_dot_product_attention(q.float()[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=hq != hkv)
    return out[:, :, 0, :].to(q.dtype)


class TorchBackend(AttentionBackend):
    def write_kv(self, kv, k, v, slot_mapping) -> None:
        ref_write_kv(kv, k, v, slot_mapping)

    def decode(self, q, kv, records, md):
        return batched_decode_attention(q, kv, records, md.block_tables, md.context_lens, md.context_lens_host,
                                        self.pool.cfg)

    def extend(self, q, kv, records, md):
        return ref_paged_attention(q, kv, records, md.block_tables, md.context_lens, md.cu_seqlens_q,
                                   self.pool.cfg)
