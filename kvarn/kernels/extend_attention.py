"""Paged extend (chunked prefill) attention over a partly quantized KVarN or fp16 cache.

    out = paged_extend_attention(q, kv_fp16, records, block_tables, context_lens, cu_seqlens_q, cfg)
        q             fp16  [T_total, Hq, D]   new tokens of every sequence (varlen), cache frame
        kv_fp16       fp16  [2, nfp, Hkv, G, D]  (new tokens' K/V already written there)
        records       uint8 [nrec, Hkv, RB]    None with cfg=None (fp16 cache)
        block_tables  int32 [B, max_blocks];  context_lens int32 [B] (N, new tokens included)
        cu_seqlens_q  int32 [B+1]: sequence b's queries are q[cu[b]:cu[b+1]] (T_b of them)
        out           fp16  [T_total, Hq, D]

Semantics are ``ref_paged_attention``'s: query i of sequence b sits at position
N - T_b + i and sees keys at positions <= its own. Which blocks are records follows
from the prefix N - T_b (layout diagram: kvarn/kernels/reference.py); the tile math is
decode_attention.py's (``_fp16_tile``, ``_record_tile``).

Tiling:

    grid = (cdiv(max_q_len, BLOCK_T), Hkv, B)
    one program: BLOCK_T consecutive new tokens of one sequence x the QH query heads of
    one KV head, flattened token-major into BLOCK_M = BLOCK_T * QH (padded) tile rows:

        row r -> token i = pid_q * BLOCK_T + r // QH, head kvh * QH + r % QH,
                 position prefix + i

        keys:  block 0 (sink, fp16) | records 1 .. n_rec | fp16 blocks .. last needed
               n_rec = max(prefix // G - 1, 0)              ^ (prefix + last token) // G

Two kernels share this grid, rows and key ranges: ``_extend_kernel`` ("rows") keeps
the decode kernel's transposed tiles (rows on the MMA's N side, dequantization folded
into the dots), best for a few new tokens per sequence; ``_extend_fa_kernel`` ("fa")
puts rows on the M side and dequantizes each record once per program into fp16 K / V
operand tiles, best for many. ``extend_launch`` picks one by shape.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvarn.format import KVarNConfig
from kvarn.kernels.decode_attention import (
    FP16_MAGIC,
    LOG2E,
    _code_order,
    _fp16_blocks,
    _joint_records,
    _record_tile,
    _scale_zero,
    _unpack_words,
    check_paged_args,
    fp16_block_n,
    joint_prefetch_mode,
    record_constexprs,
)

# The default extend kernel: "auto" (``extend_launch``'s choice by shape), "rows" or "fa".
EXTEND_KERNEL = os.environ.get("KVARN_EXTEND_KERNEL", "auto")
# The fa kernel's fp16 workspace for the records by default: "auto" (``use_workspace``),
# "1" (always) or "0" (never). Natural-order version (NOTES.md attempt 42), H100
# (results/extend_h100_s12.json): B1 16K+512 0.574 ms against 0.781 without, B1 4K+2K
# 0.570 against 1.296 (the fp16 cache 0.566), B4 8K+256 0.634 against 0.782.
EXTEND_WORKSPACE = os.environ.get("KVARN_EXTEND_WORKSPACE", "auto")
# The rows kernel's records through the decode kernel's joint record loop
# (``_joint_records``: scales applied to the codes, one softmax update per record, the
# next record's scale fields prefetched) instead of ``_record_tile``; records of two
# 64-token pieces only (G = 128). NOTES.md attempt 43. "auto" (default): where it was
# timed, k4v2_g128 at D 128 and up to 32 rows (H100, results/extend_h100_s12.json: 16
# sequences x 8 new tokens 0.207 -> 0.124 ms at 32 rows, 64 x 4 1.28 -> 0.93 at 16 rows);
# "1": wherever it applies; "0": never.
EXTEND_REC_JOINT = os.environ.get("KVARN_EXTEND_REC_JOINT", "auto")
# The workspace's dequant kernel expanding whole code words (``_dequant_prefix_kernel``
# WORDS; NOTES.md attempt 45), on by default ("0" turns it off): H100, session 14, the
# default call with the workspace (results/extend_h100_s14_before.json / _threshold.json
# without, _words.json with) B4 8K+256 0.647 -> 0.535 ms, B1 16K+512 0.576 -> 0.527,
# B8 8K+160 1.014 -> 0.819.
DEQUANT_WORDS = os.environ.get("KVARN_DEQUANT_WORDS", "1") == "1"


@triton.jit
def _program_rows(pid_q, kvh, n_q, prefix, QH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """A program's tile rows (module docstring): token, query head, whether the row is
    live, and its position (dead rows take the last token's, so that no row is empty)."""
    rows = tl.arange(0, BLOCK_M)
    tok = pid_q * BLOCK_T + rows // QH
    head = kvh * QH + rows % QH
    row_ok = (rows < BLOCK_T * QH) & (tok < n_q)
    return tok, head, row_ok, prefix + tl.minimum(tok, n_q - 1)


@triton.jit
def _key_orders(REC_SUB: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                IS_KVARN: tl.constexpr):
    """The token order of a record piece's K codes and the channel order of V's
    (``_code_order``; identity for an fp16 cache)."""
    if IS_KVARN:
        k_tok = _code_order(REC_SUB, K_BITS)
        v_chan = _code_order(D, V_BITS)
    else:
        k_tok = tl.arange(0, REC_SUB)
        v_chan = tl.arange(0, D)
    return k_tok, v_chan


@triton.jit
def _extend_kernel(q_ptr, kv_ptr, rec_ptr, bt_ptr, ctx_ptr, cu_ptr, out_ptr, qk_scale, magic,
                   stride_qt, stride_qh, stride_kv, stride_fb, stride_fh,
                   stride_rb, stride_rh, stride_bt, stride_ot, stride_oh,
                   QH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                   G: tl.constexpr, BLOCK_N: tl.constexpr, REC_SUB: tl.constexpr, D: tl.constexpr,
                   IS_KVARN: tl.constexpr,
                   K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                   OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                   OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                   OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr,
                   REC_JOINT: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    n_q = tl.load(cu_ptr + b + 1) - q_start
    n_ctx = tl.load(ctx_ptr + b)
    prefix = n_ctx - n_q

    offs_d = tl.arange(0, D)
    tok, head, row_ok, row_pos = _program_rows(pid_q, kvh, n_q, prefix, QH, BLOCK_M, BLOCK_T)
    V_PERM: tl.constexpr = 32 // V_BITS if IS_KVARN else 0
    k_tok, v_chan = _key_orders(REC_SUB, D, K_BITS, V_BITS, IS_KVARN)
    q = tl.load(q_ptr + (q_start + tok)[None, :].to(tl.int64) * stride_qt
                + head[None, :] * stride_qh + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    qf = q.to(tl.float32) * qk_scale                                 # [D, BLOCK_M]
    q16 = qf.to(q.dtype)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([D, BLOCK_M], tl.float32)

    last_tok = tl.minimum((pid_q + 1) * BLOCK_T, n_q) - 1
    end = tl.where(pid_q * BLOCK_T < n_q, (prefix + last_tok) // G + 1, 0)
    bt = bt_ptr + b.to(tl.int64) * stride_bt
    fp_head = kv_ptr + kvh.to(tl.int64) * stride_fh
    n_rec = 0
    if IS_KVARN:
        n_rec = tl.maximum(prefix // G - 1, 0)
    SUB: tl.constexpr = G // BLOCK_N
    last_sub = tl.where(pid_q * BLOCK_T < n_q, (prefix + last_tok) // BLOCK_N + 1, 0)
    acc, m, l = _fp16_blocks(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,      # the sink
                             0, tl.minimum(tl.minimum(end, 1) * SUB, last_sub),
                             row_pos, n_ctx, G, BLOCK_N, D, V_PERM)
    if IS_KVARN:
        rec_head = rec_ptr + kvh.to(tl.int64) * stride_rh
        if REC_JOINT:       # every record key is visible to every new token
            acc, m, l = _joint_records(acc, m, l, q16, bt, rec_head, stride_rb, 1, tl.minimum(end, n_rec + 1),
                                       k_tok, v_chan, magic, G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ,
                                       OFF_KT, OFF_VC, OFF_VCH, OFF_VS, OFF_VZ, PREFETCH)
        else:
            for i in range(1, tl.minimum(end, n_rec + 1)):
                blk = tl.load(bt + i).to(tl.int64)
                acc, m, l = _record_tile(acc, m, l, qf, rec_head + blk * stride_rb, k_tok, v_chan, magic,
                                         G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                                         OFF_VC, OFF_VCH, OFF_VS, OFF_VZ)
    acc, m, l = _fp16_blocks(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,      # fp16, causal
                             (n_rec + 1) * SUB, last_sub, row_pos, n_ctx, G, BLOCK_N, D, V_PERM)

    o = acc / tl.where(l > 0, l, 1.0)[None, :]
    tl.store(out_ptr + (q_start + tok)[None, :].to(tl.int64) * stride_ot
             + head[None, :] * stride_oh + v_chan[:, None],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[None, :])


@triton.jit
def _fa_softmax(s, m, l):
    """Scores s [rows, keys] (log2 units) -> p, the rescale alpha, the new max and sum."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _fa_fp16_range(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb, j0, j1, row_pos, n_ctx, v_cols,
                   G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DIRECT: tl.constexpr = False):
    """fp16 key tiles j0 .. j1-1 of BLOCK_N keys (block j // (G / BLOCK_N)), causal.
    The block's id is bt[j // SUB], or with DIRECT bt + j // SUB itself (an int: the
    dequantized-prefix workspace, where a sequence's blocks are consecutive; read with
    v_cols the identity).

    FlashAttention orientation: q16 [M, D], acc [M, D]; K^T [D, BLOCK_N] and V
    [BLOCK_N, D] straight from the paged pool. V's columns come in the order v_cols
    (a KVarN record's permuted channel order, or 0 .. D-1), so one accumulator holds
    both kinds of tile. Key t is visible to row r iff t <= row_pos[r]; V rows at or past
    n_ctx were never written: masked to 0 so that garbage cannot turn p = 0 into NaN.
    """
    SUB: tl.constexpr = G // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for j in range(j0, j1):
        if DIRECT:
            blk = (bt + j // SUB).to(tl.int64)
        else:
            blk = tl.load(bt + j // SUB).to(tl.int64)
        k_ptr = fp_head + blk * stride_fb + (j % SUB) * (BLOCK_N * D)
        key = j * BLOCK_N + offs_n
        kt = tl.load(k_ptr + offs_n[None, :] * D + offs_d[:, None])                  # [D, N]
        s = tl.dot(q16, kt)                                                           # [M, N]
        s = tl.where(key[None, :] <= row_pos[:, None], s, float("-inf"))
        p, alpha, m, l = _fa_softmax(s, m, l)
        v = tl.load(k_ptr + stride_kv + offs_n[:, None] * D + v_cols[None, :],
                    mask=(key < n_ctx)[:, None], other=0.0)                           # [N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m, l


@triton.jit
def _deq_k_piece(rec16, rec32, ks, kz, k_tok, h, magic, G: tl.constexpr, D: tl.constexpr,
                 K_BITS: tl.constexpr, OFF_KC: tl.constexpr, OFF_KT: tl.constexpr):
    """Piece h of a record's K, dequantized: K^T [D, HALF] fp16, column i = token
    h * HALF + k_tok[i]. ks, kz: ``_scale_zero``'s per-channel scale and centered zero."""
    offs_d = tl.arange(0, D)
    HALF: tl.constexpr = k_tok.shape[0]
    KW: tl.constexpr = G * K_BITS // 32
    KWH: tl.constexpr = HALF * K_BITS // 32
    kt = tl.load(rec16 + OFF_KT // 2 + h * HALF + k_tok)
    kw = tl.load(rec32 + OFF_KC // 4 + offs_d[:, None] * KW + h * KWH + tl.arange(0, KWH)[None, :])
    return (_unpack_words(kw, K_BITS, magic) * ks[:, None] + kz[:, None]) * kt[None, :]


@triton.jit
def _deq_v_piece(rec16, rec32, vch, k_tok, h, magic, D: tl.constexpr, V_BITS: tl.constexpr,
                 OFF_VC: tl.constexpr, OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """Piece h of a record's V, dequantized: [HALF, D] fp16, row i = token h * HALF +
    k_tok[i], column c = channel v_chan[c] (vch: v_chan's channel scales)."""
    HALF: tl.constexpr = k_tok.shape[0]
    VW: tl.constexpr = D * V_BITS // 32
    tok = h * HALF + k_tok
    vs, vz = _scale_zero(rec16, tok, V_BITS, OFF_VS, OFF_VZ)
    vw = tl.load(rec32 + OFF_VC // 4 + tok[:, None] * VW + tl.arange(0, VW)[None, :])
    return (_unpack_words(vw, V_BITS, magic) * vs[:, None] + vz[:, None]) * vch[None, :]


@triton.jit
def _fa_record(acc, m, l, q16, rec, k_tok, v_chan, magic, G: tl.constexpr, D: tl.constexpr,
               K_BITS: tl.constexpr, V_BITS: tl.constexpr,
               OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
               OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
               OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """One KVarN record (every key visible to every row), in pieces of HALF tokens:
    the codes are dequantized once per program into fp16 K^T [D, HALF] and V [HALF, D]
    tiles with every scale folded in (what an fp16 cache would hold, up to fp16
    rounding), which the two dots then take as their shared-memory operands:

        K^T[d, t] = ((ck - C) ks[d] + kz[d] + C ks[d]) kt[t]
        V[t, c]   = ((cv - C) vs[t] + vz[t] + C vs[t]) vch[c]      (c in v_chan order)

    Score column i of piece h is token h * HALF + k_tok[i]; acc column c is channel
    v_chan[c] (``_code_order``), as in the fp16 tiles' v_cols.
    """
    offs_d = tl.arange(0, D)
    rec16 = rec.to(tl.pointer_type(tl.float16))
    rec32 = rec.to(tl.pointer_type(tl.int32))
    HALF: tl.constexpr = k_tok.shape[0]
    ks, kz = _scale_zero(rec16, offs_d, K_BITS, OFF_KS, OFF_KZ)
    vch = tl.load(rec16 + OFF_VCH // 2 + v_chan)
    for h in tl.static_range(G // HALF):
        kd = _deq_k_piece(rec16, rec32, ks, kz, k_tok, h, magic, G, D, K_BITS, OFF_KC, OFF_KT)
        s = tl.dot(q16, kd)                                                                # [M, HALF]
        p, alpha, m, l = _fa_softmax(s, m, l)
        vd = _deq_v_piece(rec16, rec32, vch, k_tok, h, magic, D, V_BITS, OFF_VC, OFF_VS, OFF_VZ)
        acc = tl.dot(p.to(tl.float16), vd, acc * alpha[:, None])
    return acc, m, l


@triton.jit
def _dequant_prefix_kernel(rec_ptr, bt_ptr, ctx_ptr, cu_ptr, ws_ptr,
                           stride_rb, stride_rh, stride_bt, stride_wkv, stride_wb, max_blocks,
                           G: tl.constexpr, SUB_T: tl.constexpr, D: tl.constexpr,
                           K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                           OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                           OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                           OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr, WORDS: tl.constexpr = False):
    """Record i = pid0 + 1 of sequence b, KV head pid1 -> fp16 K / V in the workspace
    ws [2, B * max_blocks, Hkv, G, D] at block b * max_blocks + i, laid out as an fp16
    cache block: token-major, tokens and channels in their natural order, so that the
    fa kernel reads it (and every fp16 block, and stores its output) with no channel
    permutation, in contiguous runs. Each value is KVARN_FORMAT.md's reconstruction in
    fp32, rounded once to fp16:

        K[t, d] = (code_k[d, t] k_scale[d] + k_zero[d]) k_tok[t]
        V[t, d] = (code_v[t, d] v_scale[t] + v_zero[t]) v_chan[d]

    How a code leaves its word, which either way is KVARN_FORMAT.md's packing (lowest
    index in the lowest bits), not the attention kernels' word unpack (``_code_order``'s
    permutation: session 10 stored that permuted order, V through a permuted channel
    index, 2-byte scattered stores, and the workspace was 1.85-3.0x slower than none;
    NOTES.md attempts 37, 40, 42):

        WORDS False  by index arithmetic (word d G bK / 32 + t / (32 / bK), shift
                     (t mod 32 / bK) bK for K; V alike along d): one 4-byte gather per
                     code (session 11; measured on the H100 in session 12)
        WORDS True   each word loaded once, coalesced, and expanded by shifts: K words
                     [DC channels, G bK / 32] -> codes [DC, G], transposed to
                     token-major; V words [SUB_T tokens, D bV / 32] -> codes [SUB_T, D]
                     as they lie (session 12, attempt 45; the default since session
                     14, H100: B4 8K+256 0.647 -> 0.535 ms)"""
    i = tl.program_id(0) + 1
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    n_q = tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    n_rec = tl.maximum((tl.load(ctx_ptr + b) - n_q) // G - 1, 0)
    if (i > n_rec) | (n_q <= 0):
        return
    blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + i).to(tl.int64)
    rec = rec_ptr + kvh.to(tl.int64) * stride_rh + blk * stride_rb
    rec16 = rec.to(tl.pointer_type(tl.float16))
    rec32 = rec.to(tl.pointer_type(tl.int32))
    KPW: tl.constexpr = 32 // K_BITS                 # codes per 32-bit word
    VPW: tl.constexpr = 32 // V_BITS
    KW: tl.constexpr = G // KPW                      # K words per channel
    VW: tl.constexpr = D // VPW                      # V words per token
    KMASK: tl.constexpr = (1 << K_BITS) - 1
    VMASK: tl.constexpr = (1 << V_BITS) - 1
    DC: tl.constexpr = 8192 // G if 8192 // G < D else D     # channels per K piece
    offs_d = tl.arange(0, D)
    if WORDS:
        vch = tl.load(rec16 + OFF_VCH // 2 + offs_d).to(tl.float32)
        out = ws_ptr + (b.to(tl.int64) * max_blocks + i) * stride_wb + kvh * (G * D)
        t_all = tl.arange(0, G)
        kt = tl.load(rec16 + OFF_KT // 2 + t_all).to(tl.float32)
        k_shift = tl.arange(0, KPW) * K_BITS
        for c in tl.static_range(D // DC):
            d = c * DC + tl.arange(0, DC)
            kw = tl.load(rec32 + OFF_KC // 4 + d[:, None] * KW + tl.arange(0, KW)[None, :])   # [DC, KW]
            kc = tl.reshape((kw[:, :, None] >> k_shift[None, None, :]) & KMASK, (DC, G))
            kc = tl.trans(kc).to(tl.float32)                                                # [G, DC]
            ks = tl.load(rec16 + OFF_KS // 2 + d).to(tl.float32)
            kz = tl.load(rec16 + OFF_KZ // 2 + d).to(tl.float32)
            tl.store(out + t_all[:, None] * D + d[None, :],
                     ((kc * ks[None, :] + kz[None, :]) * kt[:, None]).to(tl.float16))
        v_shift = tl.arange(0, VPW) * V_BITS
        for h in tl.static_range(G // SUB_T):
            t = h * SUB_T + tl.arange(0, SUB_T)
            vw = tl.load(rec32 + OFF_VC // 4 + t[:, None] * VW + tl.arange(0, VW)[None, :])   # [SUB_T, VW]
            vc = tl.reshape((vw[:, :, None] >> v_shift[None, None, :]) & VMASK, (SUB_T, D)).to(tl.float32)
            vs = tl.load(rec16 + OFF_VS // 2 + t).to(tl.float32)
            vz = tl.load(rec16 + OFF_VZ // 2 + t).to(tl.float32)
            tl.store(out + stride_wkv + t[:, None] * D + offs_d[None, :],
                     ((vc * vs[:, None] + vz[:, None]) * vch[None, :]).to(tl.float16))
    else:
        ks = tl.load(rec16 + OFF_KS // 2 + offs_d).to(tl.float32)
        kz = tl.load(rec16 + OFF_KZ // 2 + offs_d).to(tl.float32)
        vch = tl.load(rec16 + OFF_VCH // 2 + offs_d).to(tl.float32)
        out = ws_ptr + (b.to(tl.int64) * max_blocks + i) * stride_wb + kvh * (G * D)
        for h in tl.static_range(G // SUB_T):
            t = h * SUB_T + tl.arange(0, SUB_T)
            kt = tl.load(rec16 + OFF_KT // 2 + t).to(tl.float32)
            kw = tl.load(rec32 + OFF_KC // 4 + offs_d[None, :] * KW + (t // KPW)[:, None])
            kc = ((kw >> ((t % KPW) * K_BITS)[:, None]) & KMASK).to(tl.float32)
            k = (kc * ks[None, :] + kz[None, :]) * kt[:, None]
            tl.store(out + t[:, None] * D + offs_d[None, :], k.to(tl.float16))
            vs = tl.load(rec16 + OFF_VS // 2 + t).to(tl.float32)
            vz = tl.load(rec16 + OFF_VZ // 2 + t).to(tl.float32)
            vw = tl.load(rec32 + OFF_VC // 4 + t[:, None] * VW + (offs_d // VPW)[None, :])
            vc = ((vw >> ((offs_d % VPW) * V_BITS)[None, :]) & VMASK).to(tl.float32)
            v = (vc * vs[:, None] + vz[:, None]) * vch[None, :]
            tl.store(out + stride_wkv + t[:, None] * D + offs_d[None, :], v.to(tl.float16))


@triton.jit
def _extend_fa_kernel(q_ptr, kv_ptr, rec_ptr, bt_ptr, ctx_ptr, cu_ptr, out_ptr, qk_scale, magic,
                      stride_qt, stride_qh, stride_kv, stride_fb, stride_fh,
                      stride_rb, stride_rh, stride_bt, stride_ot, stride_oh,
                      ws_ptr, stride_wkv, stride_wb, max_blocks,
                      QH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                      G: tl.constexpr, BLOCK_N: tl.constexpr, REC_SUB: tl.constexpr, D: tl.constexpr,
                      IS_KVARN: tl.constexpr, WS: tl.constexpr,
                      K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                      OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                      OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                      OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """``_extend_kernel``'s grid, rows and key ranges, FlashAttention-oriented: query
    rows are the MMA's M side (q16 [BLOCK_M, D] held once, fp16), keys its N side.
    WS: the records were dequantized beforehand into the workspace ws_ptr
    (``_dequant_prefix_kernel``), read here as fp16 blocks."""
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    n_q = tl.load(cu_ptr + b + 1) - q_start
    if pid_q * BLOCK_T >= n_q:
        return
    n_ctx = tl.load(ctx_ptr + b)
    prefix = n_ctx - n_q

    offs_d = tl.arange(0, D)
    tok, head, row_ok, row_pos = _program_rows(pid_q, kvh, n_q, prefix, QH, BLOCK_M, BLOCK_T)
    # with the workspace no record is read here: every tile, and the output, in natural order
    k_tok, v_cols = _key_orders(REC_SUB, D, K_BITS, V_BITS, IS_KVARN and not WS)
    q = tl.load(q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt
                + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q16 = (q.to(tl.float32) * qk_scale).to(q.dtype)                       # [M, D]
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    last_tok = tl.minimum((pid_q + 1) * BLOCK_T, n_q) - 1
    end = (prefix + last_tok) // G + 1
    bt = bt_ptr + b.to(tl.int64) * stride_bt
    fp_head = kv_ptr + kvh.to(tl.int64) * stride_fh
    n_rec = 0
    if IS_KVARN:
        n_rec = tl.maximum(prefix // G - 1, 0)
    SUB: tl.constexpr = G // BLOCK_N
    last_sub = (prefix + last_tok) // BLOCK_N + 1
    acc, m, l = _fa_fp16_range(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,     # the sink
                               0, tl.minimum(SUB, last_sub), row_pos, n_ctx, v_cols, G, BLOCK_N, D)
    if WS:
        acc, m, l = _fa_fp16_range(acc, m, l, q16, b.to(tl.int64) * max_blocks,
                                   ws_ptr + kvh.to(tl.int64) * (G * D), stride_wkv, stride_wb,
                                   SUB, tl.minimum(end, n_rec + 1) * SUB, row_pos, n_ctx, v_cols,
                                   G, BLOCK_N, D, True)
    elif IS_KVARN:
        rec_head = rec_ptr + kvh.to(tl.int64) * stride_rh
        for i in range(1, tl.minimum(end, n_rec + 1)):
            blk = tl.load(bt + i).to(tl.int64)
            acc, m, l = _fa_record(acc, m, l, q16, rec_head + blk * stride_rb, k_tok, v_cols, magic,
                                   G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                                   OFF_VC, OFF_VCH, OFF_VS, OFF_VZ)
    acc, m, l = _fa_fp16_range(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,     # fp16, causal
                               tl.maximum(n_rec + 1, 1) * SUB, last_sub, row_pos, n_ctx, v_cols,
                               G, BLOCK_N, D)

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot
             + head[:, None] * stride_oh + v_cols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_extend_attention(q, kv_fp16, records, block_tables, context_lens, cu_seqlens_q,
                           cfg: KVarNConfig | None, sm_scale: float | None = None,
                           max_q_len: int | None = None, block_m: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           kernel: str | None = None, workspace: bool | None = None,
                           rec_joint: bool | None = None) -> torch.Tensor:
    """Causal attention of new tokens q [T_total, Hq, D] over paged caches -> [T_total, Hq, D].

    ``ref_paged_attention`` semantics. max_q_len (a Python int) sizes the grid; without
    it the wrapper reads cu_seqlens_q back from the device (one sync).

    kernel: "rows" (``_extend_kernel``: the decode kernel's transposed tiles, query rows
    on the MMA's N side), "fa" (``_extend_fa_kernel``: query rows on the M side,
    records dequantized once per program into fp16 operand tiles) or "auto" (by the
    rows a program needs: ``extend_launch``); None: ``EXTEND_KERNEL`` (env
    ``KVARN_EXTEND_KERNEL``, default "auto"). block_m / num_warps / num_stages: the
    launch (None: ``extend_launch``'s choice for the shape).

    workspace (the "fa" kernel over a KVarN cache): dequantize every sequence's records
    once per KV head into an fp16 workspace first (``_dequant_prefix_kernel``; B x
    max_blocks x Hkv x G x D x 4 bytes), instead of once per program. None:
    ``EXTEND_WORKSPACE`` (env ``KVARN_EXTEND_WORKSPACE``, default "auto": where enough
    programs per KV head read each record and it fits, ``use_workspace``).

    rec_joint (the "rows" kernel over a k4v2/k4v4 cache of 128-token blocks): its
    records through the decode kernel's joint record loop (``_joint_records``) instead of
    ``_record_tile``. None: ``EXTEND_REC_JOINT`` (env ``KVARN_EXTEND_REC_JOINT``; "auto":
    ``rec_joint_auto``).
    """
    hkv, g, d = check_paged_args(q, kv_fp16, records, block_tables, context_lens, cfg, 3)
    t_total, hq, _ = q.shape
    bsz = context_lens.shape[0]
    if block_tables.shape[0] != bsz or cu_seqlens_q.shape != (bsz + 1,):
        raise ValueError(f"batch {bsz}: block_tables {tuple(block_tables.shape)}, "
                         f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} (want [{bsz + 1}])")
    if cu_seqlens_q.dtype != torch.int32 or not cu_seqlens_q.is_contiguous() or cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q must be contiguous int32 on {q.device}, got {cu_seqlens_q.dtype}")
    out = torch.empty_like(q)
    if bsz == 0 or t_total == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_q_len <= 0:
        return out
    qh = hq // hkv
    kernel, block_m, num_warps, num_stages = extend_launch(max_q_len, qh, d, cfg, kernel, block_m,
                                                           num_warps, num_stages, rec_joint)
    fa = kernel == "fa"
    block_t = block_m // qh
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    rec = records if records is not None else kv_fp16
    srb, srh = (records.stride(0), records.stride(1)) if records is not None else (0, 0)
    grid = (triton.cdiv(max_q_len, block_t), hkv, bsz)
    args = (q, kv_fp16, rec, block_tables, context_lens, cu_seqlens_q, out, scale * LOG2E, FP16_MAGIC,
            q.stride(0), q.stride(1), kv_fp16.stride(0), kv_fp16.stride(1), kv_fp16.stride(2),
            srb, srh, block_tables.stride(0), out.stride(0), out.stride(1))
    consts = dict(QH=qh, BLOCK_M=block_m, BLOCK_T=block_t, G=g,
                  BLOCK_N=min(g, 64) if fa else fp16_block_n(g, d), REC_SUB=min(g, 64), D=d,
                  **record_constexprs(cfg))
    joint_ok = cfg is not None and g == 2 * min(g, 64)
    if rec_joint and (fa or not joint_ok):
        raise ValueError("rec_joint=True needs the 'rows' kernel over a KVarN cache of 128-token blocks")
    if not fa:
        if workspace:
            raise ValueError("workspace=True needs the 'fa' kernel")
        if rec_joint is None:
            rec_joint = rec_joint_auto(cfg, d, block_m, EXTEND_REC_JOINT)
        joint = bool(rec_joint) and joint_ok
        prefetch = joint_prefetch_mode("auto", d, q.device) if joint else 0
        _extend_kernel[grid](*args, **consts, REC_JOINT=joint, PREFETCH=prefetch,
                             num_warps=num_warps, num_stages=num_stages)
        return out
    if workspace is None and EXTEND_WORKSPACE != "auto":
        workspace = EXTEND_WORKSPACE == "1"
    if workspace is None:
        workspace = use_workspace(cfg, grid[0], bsz, block_tables.shape[1], hkv, g, d)
    ws = None
    if workspace and cfg is not None:
        ws = dequant_prefix(records, block_tables, context_lens, cu_seqlens_q, cfg, kv_fp16.dtype)
    ws_args = (ws, ws.stride(0), ws.stride(1)) if ws is not None else (kv_fp16, 0, 0)   # unused without WS
    _extend_fa_kernel[grid](*args, *ws_args, block_tables.shape[1],
                            **consts, WS=ws is not None, num_warps=num_warps, num_stages=num_stages)
    return out


def dequant_prefix(records, block_tables, context_lens, cu_seqlens_q, cfg: KVarNConfig,
                   dtype=torch.float16, words: bool | None = None) -> torch.Tensor:
    """The extend workspace: every sequence's records (blocks 1 .. n_rec of its prefix,
    n_rec = max((context - new tokens) // G - 1, 0)) dequantized into
    ws [2, B * max_blocks, Hkv, G, D] (K, V), block i of sequence b at row b * max_blocks
    + i, in an fp16 cache block's layout (``_dequant_prefix_kernel``); other rows are
    left unwritten. words: the kernel's WORDS (codes expanded from whole words); None:
    ``DEQUANT_WORDS`` (env ``KVARN_DEQUANT_WORDS``, on unless "0")."""
    bsz, max_blocks = block_tables.shape
    hkv, g, d = records.shape[1], cfg.group_size, cfg.head_dim
    ws = torch.empty(2, bsz * max_blocks, hkv, g, d, dtype=dtype, device=records.device)
    _dequant_prefix_kernel[(max(max_blocks - 1, 1), hkv, bsz)](
        records, block_tables, context_lens, cu_seqlens_q, ws,
        records.stride(0), records.stride(1), block_tables.stride(0), ws.stride(0), ws.stride(1), max_blocks,
        G=g, SUB_T=min(g, 8192 // d), D=d, **{k: v for k, v in record_constexprs(cfg).items() if k != "IS_KVARN"},
        WORDS=DEQUANT_WORDS if words is None else bool(words), num_warps=4)
    return ws


# The workspace (paged_extend_attention) is used when at least this many programs per KV
# head and sequence would each dequantize the same records, and it fits WS_MAX_BYTES:
# WS_MIN_PROGRAMS with the dequant kernel's WORDS (the default), WS_MIN_PROGRAMS_NO_WORDS
# without (``use_workspace``).
WS_MIN_PROGRAMS = 2
WS_MIN_PROGRAMS_NO_WORDS = 5
WS_MAX_BYTES = 512 << 20


def use_workspace(cfg: KVarNConfig | None, programs_per_head: int, bsz: int, max_blocks: int,
                  hkv: int, g: int, d: int) -> bool:
    """Whether the "fa" kernel should read the records through an fp16 workspace.

    Without it every program of a (sequence, KV head) dequantizes each record in
    registers; with it they are dequantized once (``dequant_prefix``) and every program
    reads fp16 back, so it pays from some number of programs per record on. H100,
    8 sequences of 8K + 64 / 96 / 128 / 160 / 192 new tokens (2-6 fa programs of 32
    tokens), fa without -> with the workspace (session 14, results/extend_h100_s14_*.json):

        WORDS on  (default)   0.410 -> 0.378, 0.787 -> 0.599, 0.795 -> 0.602,
                              1.159 -> 0.808, 1.161 -> 0.817 ms: pays from 2 programs
        WORDS off             0.407 -> 0.577, 0.781 -> 0.791, 0.795 -> 0.797,
                              1.162 -> 1.013, 1.179 -> 1.021: from 5

    At one program it is a toss-up (session 14, WORDS on: B8 8K+32 0.378 against 0.395,
    B32 8K+16 at 128 rows 1.00 against 0.76), so it stays off there.

    Head dims up to 128 only: timed at 128, GPU-tested at 64 and 128. At 256 the fa
    kernel over the workspace pipelines fp16 K / V tiles of 64 x 256, and at 128 rows
    and 3 stages needs 256 KB of shared memory, more than an H100 has (227 KB; the GPU
    test at that launch failed to compile in session 14 when this rule let D 256 in)."""
    least = WS_MIN_PROGRAMS if DEQUANT_WORDS else WS_MIN_PROGRAMS_NO_WORDS
    return (cfg is not None and d <= 128 and programs_per_head >= least
            and 4 * bsz * max_blocks * hkv * g * d <= WS_MAX_BYTES)


def rec_joint_auto(cfg: KVarNConfig | None, d: int, block_m: int, mode: str = "auto") -> bool:
    """The rows kernel's default for rec_joint: mode "1" / "0" (env
    ``KVARN_EXTEND_REC_JOINT``) on / off where it applies, "auto" on where it was timed
    faster: k4v2_g128 at head_dim 128, up to 32 rows (H100, results/extend_h100_s12.json:
    1.2-1.7x at 16 and 32 rows on all six shapes; 64 rows spills more with it, offline,
    and other presets and head dims were not timed)."""
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"KVARN_EXTEND_REC_JOINT must be 'auto', '0' or '1', got {mode!r}")
    if mode != "auto":
        return mode == "1"
    return (cfg is not None and (cfg.k_bits, cfg.v_bits, cfg.group_size) == (4, 2, 128)
            and d == 128 and block_m <= 32)


def extend_launch(max_q_len: int, qh: int, d: int, cfg: KVarNConfig | None, kernel: str | None = None,
                  block_m: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, rec_joint: bool | None = None) -> tuple[str, int, int, int]:
    """(kernel, block_m, num_warps, num_stages) for a batch: what is given, the rest chosen.
    rec_joint: the call's (None: ``rec_joint_auto``'s default), which sets the warps of
    the 16-row rows launch.

    kernel "auto" (the default, ``EXTEND_KERNEL``) picks by the rows one program needs,
    R = next_pow2(max_q_len * qh), at least 16, where it was measured and GPU-tested
    (H100, D 128, 4 query heads per KV head):

        R <= 32    k4v2_g128: "rows", R rows at 4 warps, records through the joint
                   loop (``rec_joint_auto``): the fewest idle rows (session 12, H100,
                   results/extend_h100_s12.json: 64 sequences x 4 new tokens 0.93 ms at
                   16 rows, fa at 64 rows 1.58, SDPA 7.0; 16 x 8: 0.124 at 32 rows, fa
                   0.202, SDPA 0.40). Without the joint loop (rec_joint False, or off
                   by ``KVARN_EXTEND_REC_JOINT``) 16 rows take 2 warps.
        R >= 64    k4v2_g128 or the fp16 cache: "fa", 128 rows at 8 warps (64 rows at 4
                   where R is 64): the records dequantized once per program for 32
                   tokens x 4 heads, or once per KV head into the fp16 workspace where
                   ``use_workspace`` says (hundreds of new tokens, session 14: 0.52-0.57 ms
                   with it, 0.80-1.32 without, the fp16 cache 0.47-0.58, SDPA 0.41-0.55)

    Elsewhere (other presets, head dims 64 / 256) "auto" is the rows kernel at its
    earlier default launch (nothing else was timed there).

    Refused: the rows kernel at 32 rows and 4 warps with D 64, which Triton 3.6
    miscompiles (compute-sanitizer on the H100: the P V wgmma of ``_record_tile``
    reads shared memory past the kernel's allocation, an illegal address;
    benchmarks/results/logs/sanitizer_extend_rows_m32_w4_d64_h100_s10.log).
    """
    kernel = EXTEND_KERNEL if kernel is None else kernel
    if kernel not in ("auto", "rows", "fa"):
        raise ValueError(f"kernel must be 'auto', 'rows' or 'fa', got {kernel!r}")
    k4v2_g128 = cfg is not None and (cfg.k_bits, cfg.v_bits, cfg.group_size) == (4, 2, 128)
    if kernel == "auto":
        need = max(16, triton.next_power_of_2(max(1, max_q_len) * qh))
        kernel = "rows"
        if d == 128 and need >= 64 and (cfg is None or k4v2_g128):
            kernel = "fa"
            block_m = min(need, 128) if block_m is None else block_m
        elif d == 128 and need <= 32 and k4v2_g128 and block_m is None:
            block_m = need
            # 16 rows: 2 warps with _record_tile, 4 with the joint loop (64 x 4 new tokens:
            # 1.284 against 0.929 ms, and 0.968 at 2 warps; results/extend_h100_s12.json)
            joint = rec_joint_auto(cfg, d, need, EXTEND_REC_JOINT) if rec_joint is None else rec_joint
            num_warps = (4 if need == 32 or joint else 2) if num_warps is None else num_warps
    fa = kernel == "fa"
    if block_m is None:
        block_m = (128 if d <= 128 else 64) if fa else (64 if d <= 128 else 32)
    block_m = max(16, triton.next_power_of_2(qh), block_m)
    if num_warps is None:
        if fa:
            num_warps = 8 if block_m * d >= 128 * 128 else 4
        else:
            # k4v2_g128 at D 128, 64 rows: 4 warps 1.53-1.67x faster than 8 with hundreds of
            # new tokens, output bit-identical to 8 warps' on all five shapes (H100,
            # results/extend_h100_s9.json; 8% slower with 8 new tokens x 16 sequences). Other
            # presets, head dims and the fp16 cache were not timed at 4 warps: 8 as before.
            num_warps = 4 if (k4v2_g128 and d == 128 and block_m == 64) else 8
    if kernel == "rows" and d == 64 and block_m == 32 and num_warps == 4:
        raise ValueError("the rows extend kernel at 32 rows / 4 warps with head_dim 64 is miscompiled "
                         "by Triton 3.6 (an illegal shared-memory read): use 2 or 8 warps, or 16 / 64 rows")
    return kernel, block_m, num_warps, 2 if num_stages is None else num_stages
