"""The Gluon path's Triton pieces, on the CPU interpreter: ``_fp16_chunk_kernel`` (the
fp16 sink and tail blocks in chunks of keys, one partial each) and the channel-slice
merge ``_merge_chunks_kernel`` (``merge_partials``). The record partials, which the Gluon kernel writes on the
GPU (test_decode_gluon.py), are made here by torch from the dequantized records, so the
merged output is the whole decode attention and is held to run_case's bar.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvarn.format import KVarNConfig
from kvarn.kernels.decode_attention import LOG2E, fp16_block_n, fp16_partials, merge_partials
from kvarn.kernels.reference import gather_context, num_record_blocks

from test_decode_attention import DEVICE, assert_close_to_reference, build_paged_cache, fp32_and_fp16_oracles


def torch_record_partials(q, kv, records, bt, ctx, cfg, scale, num_splits, po, plse):
    """Partials 0 .. num_splits-1: the records of each sequence split into num_splits runs
    of blocks (runs past the last record get lse -inf, as the Gluon kernel writes them)."""
    g = cfg.group_size
    bsz, hq, d = q.shape
    for b in range(bsz):
        n = int(ctx[b])
        k, v = gather_context(kv.cpu(), records.cpu(), bt[b].cpu(), n, 1, cfg)
        rep = hq // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        n_rec = num_record_blocks(n - 1, g)
        bps = max(-(-n_rec // num_splits), 1)
        for s in range(num_splits):
            r0, r1 = 1 + s * bps, min(1 + (s + 1) * bps, n_rec + 1)
            if r0 >= r1:
                plse[b, :, s] = float("-inf")
                continue
            kk, vv = k[r0 * g:r1 * g], v[r0 * g:r1 * g]
            sc = torch.einsum("hd,nhd->hn", q[b].float().cpu(), kk) * scale
            plse[b, :, s] = (torch.logsumexp(sc, -1) * LOG2E).to(plse.device)
            po[b, :, s] = torch.einsum("hn,nhd->hd", torch.softmax(sc, -1), vv).to(po.device)


# (head_dim, query heads per KV head, lengths, record splits, keys per fp16 chunk): lengths
# 1 (sink only), G-1, G, G+1 (a tail), 2G (full tail, no record), 2G+1 (the first
# record), many records; a chunk of 16 or 32 keys (small batches) or the fp16 sub-tile
@pytest.mark.parametrize("d,qh,lens,splits,block_n", [
    (128, 4, [1, 127, 128, 129, 256, 257, 700], 2, 32),
    (128, 3, [300, 1, 1000], 3, None),
    (64, 3, [129, 520, 64], 1, 16),
    (64, 8, [2, 390], 4, None),
    (256, 2, [385, 128], 2, 32),
])
def test_fp16_chunks_and_merge_match_reference(d, qh, lens, splits, block_n):
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", d)
    g, hkv = cfg.group_size, 2
    block_n = block_n or fp16_block_n(g, d)
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * len(lens), hkv, d, g, seed=d + qh)
    q = torch.randn(len(lens), hkv * qh, d, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    scale = 1.0 / math.sqrt(d)
    parts = splits + 2 * (g // block_n)
    po = torch.full((len(lens), hkv * qh, parts, d), float("nan"), device=DEVICE)
    plse = torch.full((len(lens), hkv * qh, parts), float("nan"), device=DEVICE)
    torch_record_partials(q, kv, records, bt, ctx, cfg, scale, splits, po, plse)
    fp16_partials(q, kv, bt, ctx, po, plse, scale, splits, block_n)
    assert not torch.isnan(plse).any()          # every chunk wrote its lse, -inf if empty
    out = merge_partials(po, plse, torch.full_like(q, float("nan")))
    ref, t16 = fp32_and_fp16_oracles(q, kv, records, bt, ctx, list(range(len(lens) + 1)), cfg, scale)
    assert_close_to_reference(out, ref, t16)


def test_merge_skips_empty_partials_and_zero_rows():
    """Partials with lse -inf are never read (their o is NaN here); a row whose every
    partial is empty (a context-0 padding row) comes out 0."""
    gen = torch.Generator().manual_seed(3)
    bsz, hq, parts, d = 3, 4, 37, 64
    po = torch.randn(bsz, hq, parts, d, generator=gen).to(DEVICE)
    plse = (torch.randn(bsz, hq, parts, generator=gen) * 4).to(DEVICE)
    empty = torch.rand(bsz, hq, parts, generator=gen).to(DEVICE) < 0.3
    plse[empty] = float("-inf")
    plse[2] = float("-inf")
    po[plse == float("-inf")] = float("nan")
    out = merge_partials(po, plse, torch.empty(bsz, hq, d, dtype=torch.float16, device=DEVICE))
    w = torch.exp2(plse - plse.amax(-1, keepdim=True).clamp_min(-1e30)).nan_to_num(0.0)
    expect = (w[..., None] * po.nan_to_num(0.0)).sum(2) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()
    torch.testing.assert_close(out.float(), expect.half().float(), atol=2e-3, rtol=2e-3)
