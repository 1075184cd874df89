"""Fused paged decode attention over a KVarN (or fp16) cache, split-K.

    out = paged_decode_attention(q, kv_fp16, records, block_tables, context_lens, cfg)
        q            fp16  [B, Hq, D]            one new token per sequence, cache frame
        kv_fp16      fp16  [2, nfp, Hkv, G, D]   sink and tail blocks (K at [0], V at [1])
        records      uint8 [nrec, Hkv, RB]       KVarN records; None with cfg=None (fp16 cache)
        block_tables int32 [B, max_blocks]       logical block -> physical id
        context_lens int32 [B]                   N, the new token included
        out          fp16  [B, Hq, D]

Semantics are ``ref_paged_decode_attention``'s; which logical blocks are records and
which fp16 follows from N alone (layout diagram: kvarn/kernels/reference.py). The
shared tile math (``_fp16_tile``, ``_record_tile``) is reused by extend_attention.py.

A record is read once, as codes, and never expanded to fp16 K/V in memory. With
K[t,d] = (ck[d,t] ks[d] + kz[d]) kt[t] and V[t,d] = (cv[t,d] vs[t] + vz[t]) vc[d]
(KVARN_FORMAT.md, Reading) there are two ways to apply the scales:

  default (``rec_deq=True``, ``_record_tile_deq``): per-channel K and per-token V scale
  and zero are applied to the unpacked codes in registers (one fp16 FMA per code pair),
  the per-token kt and per-channel vc after the dots:

    s[h,t]   = kt[t] * sum_d q[h,d] (ck[d,t] ks[d] + kz[d])          tl.dot
    o[h,d]  += vc[d] * sum_t p[h,t] (cv[t,d] vs[t] + vz[t])          tl.dot

  folded (``rec_deq=False``, ``_record_tile``; the extend kernel's path): the scales go
  into q and p and the zeros become rank-1 terms,

    s[h,t]   = kt[t] * ( sum_d (q[h,d] ks[d]) ck[d,t]  +  sum_d q[h,d] kz[d] )
    o[h,d]  += vc[d] * ( sum_t (p[h,t] vs[t]) cv[t,d]  +  sum_t p[h,t] vz[t] )

  which costs two extra cross-warp reductions per piece (H100: 1.22 vs 1.04 ms at
  B=64, N=16K; benchmarks/NOTES.md attempt 18).

  Scale fields: a record's 2-byte scale loads are too small for the pipeliner's
  cp.async, so the joint loop fetches the next record's fields while it works on this
  one (``prefetch``: an L1 prefetch hint, or registers where no register cap spills
  them; H100 1-6%, NOTES.md attempt 25).

  Softmax updates: with ``rec_joint`` (the default where a record is two pieces,
  ``_record_tile_joint``) both pieces' scores are computed first and the online softmax
  is updated once per record: one cross-warp max over max(s0, s1), and the row sums are
  kept as a per-element partial lt [HALF, 16] (lt = lt * alpha + p0 + p1) reduced once
  after the record loop, so no cross-warp sum runs per record (H100 B64 N16K 1.04 ->
  0.87 ms; NOTES.md attempt 19). Otherwise one update per piece.

Tiling (grid and work split):

    grid = (B * Hkv, num_splits)     one program: one sequence, one KV head, and all
                                     QH = Hq / Hkv query heads of that KV head, padded
                                     to BLOCK_H = 16 (the smallest wgmma N)
    logical blocks of sequence b:   0 | 1 ...... n_rec | n_rec+1 ... n_blocks-1
                                   sink   records         fp16 tail
    split s takes blocks [s*bps, (s+1)*bps), bps = cdiv(n_blocks, num_splits), computed
    in-kernel from N (ragged batches balance per sequence; splits past the end idle).
    Each split runs three loops: the sink block (if in range), the records (branch-free,
    so Triton software-pipelines their loads), the fp16 tail blocks.

    Everything is transposed so that the long side is the wgmma M dimension and the few
    query heads are N:

        fp16 piece (BLOCK_N keys)        s^T [BLOCK_N, 16] = K [BLOCK_N, D] @ q^T [D, 16]
                                         acc [D, 16]      += V^T [D, BLOCK_N] @ p [BLOCK_N, 16]
        record, per 64-token piece       s^T [64, 16]     = Kdeq^T [64, D] @ q^T [D, 16]
                                         acc [D, 16]      += Vdeq^T [D, 64] @ p [64, 16]
                                         (Kdeq, Vdeq: codes with scale and zero, fp16)

    A record's codes are unpacked 2 per int32 op into a permuted order (``_code_order``):
    score row i is token k_tok[i] and acc row c is channel v_chan[c]; scales are loaded
    in the same order, and the output store un-permutes the channels.
    With split-K each program writes (acc / l, m + log2 l) per split to fp32 scratch and
    a merge kernel combines them. Scores are kept in log2 units (q pre-scaled by
    sm_scale * log2 e).

No host synchronisation and a grid that depends only on shapes and Python ints: the
call can be captured in a CUDA graph.

On CUDA, ``kernel="auto"`` hands the records of k4v2_g128 caches (D = 64, 128, 256) to
a Gluon kernel (decode_gluon.py: codes unpacked straight into mma.sync fragments, one
warp per program; H100 B64 N16K 0.37-0.38 ms vs 0.86 for this kernel), runs the sink and
tail in chunks of keys (``_fp16_chunk_kernel``; on a second stream while a CUDA graph is
captured) and merges the partials over channel slices (``_merge_chunks_kernel``); with
``GLUON_FP16_CHUNKS`` off, this kernel covers the sink and tail (``SKIP_REC``) and
``_merge_parts_kernel`` merges.

On Hopper and later every kernel of a call is launched with programmatic dependent
launch (``PDL``, ``KVARN_PDL``): it starts with ``griddepcontrol.wait`` before its first
load, so its launch overlaps the end of the kernel before it.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kvarn.format import KVarNConfig

LOG2E = 1.4426950408889634
# Two fp16 1024.0 bit patterns; see _code_pair.
FP16_MAGIC = 0x64006400


@triton.jit
def _grid_dependency_sync():
    """Programmatic dependent launch (PDL, Hopper and later): wait until the kernel before
    this one in the stream has finished and its writes are visible, then let the kernel
    after this one start launching. Called first in a kernel launched with
    ``launch_pdl=True``, before any load, so that everything the kernel reads (q, the
    lengths, block tables, records, partials) was written before it. Emitted only under
    a PDL constexpr, never in the interpreter (it runs no PTX)."""
    tl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; // $0", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _code_pair(w, MASK: tl.constexpr, SCALE: tl.constexpr, CENTER: tl.constexpr, magic):
    """Two codes (one per 16-bit half of w, at bit offset log2(SCALE)) -> fp16 c - CENTER.

    (w & MASK) | 0x64006400 reads, per half, as the fp16 1024 + SCALE * c (mantissa
    bits; SCALE * c < 1024), so x / SCALE - (1024 / SCALE + CENTER) = c - CENTER
    exactly: integer ops and one fp16 fma, no int->float conversion. ``magic``
    (0x64006400) comes in as a run-time value so that ptxas keeps it in a register
    and fuses and+or into one LOP3. Centering the codes (CENTER = 2^(bits-1)) keeps
    the fp16 rounding of the other dot operand from scaling with the mean code.
    """
    p = (w & MASK) | magic
    lo = p.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    OFF: tl.constexpr = 1024.0 / SCALE + CENTER
    return lo * (1.0 / SCALE) - OFF, hi * (1.0 / SCALE) - OFF


@triton.jit
def _cat4(x0, x1, x2, x3):
    """[R, N] x 4 -> [R, N, 4], element [..., k] = x_k."""
    y = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(y, (x0.shape[0], x0.shape[1], 4))


@triton.jit
def _cat8(x0, x1, x2, x3, x4, x5, x6, x7):
    """[R, N] x 8 -> [R, N, 8], element [..., k] = x_k."""
    y = tl.join(_cat4(x0, x2, x4, x6), _cat4(x1, x3, x5, x7))
    return tl.reshape(y, (x0.shape[0], x0.shape[1], 8))


@triton.jit
def _unpack_words(w, BITS: tl.constexpr, magic):
    """Code words w [R, NW] (int32, P = 32/BITS codes each) -> fp16 c - 2^(BITS-1), [R, NW*P].

    Output column c holds code code_order(c) of the row (see ``_code_order``): each
    int32 yields the pair (k, k + P/2), kept adjacent so no register is repacked.
    """
    R: tl.constexpr = w.shape[0]
    NW: tl.constexpr = w.shape[1]
    C: tl.constexpr = 1 << (BITS - 1)
    if BITS == 4:
        w8 = w >> 8
        l0, h0 = _code_pair(w, 0x000F000F, 1, C, magic)
        l1, h1 = _code_pair(w, 0x00F000F0, 16, C, magic)
        l2, h2 = _code_pair(w8, 0x000F000F, 1, C, magic)
        l3, h3 = _code_pair(w8, 0x00F000F0, 16, C, magic)
        c = tl.join(_cat4(l0, l1, l2, l3), _cat4(h0, h1, h2, h3))
        return tl.reshape(c, (R, NW * 8))
    else:
        w10 = w >> 10
        l0, h0 = _code_pair(w, 0x00030003, 1, C, magic)
        l1, h1 = _code_pair(w, 0x000C000C, 4, C, magic)
        l2, h2 = _code_pair(w, 0x00300030, 16, C, magic)
        l3, h3 = _code_pair(w, 0x00C000C0, 64, C, magic)
        l4, h4 = _code_pair(w, 0x03000300, 256, C, magic)
        l5, h5 = _code_pair(w10, 0x00030003, 1, C, magic)
        l6, h6 = _code_pair(w10, 0x000C000C, 4, C, magic)
        l7, h7 = _code_pair(w10, 0x00300030, 16, C, magic)
        c = tl.join(_cat8(l0, l1, l2, l3, l4, l5, l6, l7), _cat8(h0, h1, h2, h3, h4, h5, h6, h7))
        return tl.reshape(c, (R, NW * 16))


@triton.jit
def _code_order(N: tl.constexpr, BITS: tl.constexpr):
    """[N] original index of each column ``_unpack_words`` produces.

    word j, column c = P*j + 2k + h  <-  code P*j + k + (P/2)*h   (P = 32 / BITS)
    """
    P: tl.constexpr = 32 // BITS
    c = tl.arange(0, N)
    return (c // P) * P + (c % P) // 2 + (c % 2) * (P // 2)


@triton.jit
def _online_softmax(s, m, l):
    """Scores s [keys, rows] in log2 units; running max m and sum l over keys, per row."""
    m_new = tl.maximum(m, tl.max(s, axis=0))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[None, :])
    l = l * alpha + tl.sum(p, axis=0)
    return p, alpha, m_new, l


@triton.jit
def _fp16_tile(acc, m, l, q16, k_ptr, v_ptr, t0, row_pos, n_ctx,
               G: tl.constexpr, D: tl.constexpr, V_PERM: tl.constexpr):
    """G consecutive keys [G, D] of an fp16 block (K at k_ptr, V at v_ptr), at positions t0 + [0, G).

    Transposed orientation: q16 [D, R] (query rows are columns), acc [D, R].
    Key t is visible to row r iff t <= row_pos[r] (causal; decode: row_pos = N - 1).
    V rows at or past n_ctx were never written: masked to 0 so garbage cannot turn
    p = 0 into NaN. V_PERM = P > 0: acc rows are in the channel order of P-code words
    (``_code_order``), the order a KVarN record's V codes come in.
    """
    offs_t = tl.arange(0, G)
    offs_d = tl.arange(0, D)
    key = t0 + offs_t
    tile = offs_t[:, None] * D + offs_d[None, :]
    k = tl.load(k_ptr + tile)
    s = tl.dot(k, q16)                                                   # [G, R]
    s = tl.where(key[:, None] <= row_pos[None, :], s, float("-inf"))
    p, alpha, m, l = _online_softmax(s, m, l)
    v = tl.load(v_ptr + tile, mask=(key < n_ctx)[:, None], other=0.0)
    if V_PERM > 0:   # channel P*j + (P/2)*h + k -> column P*j + 2k + h
        v = tl.reshape(tl.permute(tl.reshape(v, (G, D // V_PERM, 2, V_PERM // 2)), (0, 1, 3, 2)), (G, D))
    acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype))
    return acc, m, l


@triton.jit
def _fp16_blocks(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb, j0, j1, row_pos, n_ctx,
                 G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, V_PERM: tl.constexpr):
    """fp16 sub-tiles j0 .. j1-1 of BLOCK_N keys each (block j // (G / BLOCK_N)).

    An fp16 block is walked in BLOCK_N-key pieces so that two pipeline stages of K and
    V tiles fit in shared memory at D = 128/256 (2 * 2 * G * D * 2 bytes would not).
    """
    SUB: tl.constexpr = G // BLOCK_N
    for j in range(j0, j1):
        blk = tl.load(bt + j // SUB).to(tl.int64)
        k_ptr = fp_head + blk * stride_fb + (j % SUB) * (BLOCK_N * D)
        acc, m, l = _fp16_tile(acc, m, l, q16, k_ptr, k_ptr + stride_kv, j * BLOCK_N, row_pos, n_ctx,
                               BLOCK_N, D, V_PERM)
    return acc, m, l


@triton.jit
def _record_tile(acc, m, l, qf, rec, k_tok, v_chan, magic, G: tl.constexpr, D: tl.constexpr,
                 K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                 OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                 OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                 OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """One KVarN record, every key visible to every row; dequantization folded in.

    Transposed orientation: qf [D, R] fp32 (scaled), acc [D, R]. Codes enter the dots
    centered (c - 2^(bits-1)); the zero points absorb the shift. The record's G tokens
    go through in HALF = 64-token pieces (one wgmma M tile; Triton 3.6 miscompiles the
    shared-memory store of a [128, 16] wgmma accumulator, the p of a whole G = 128
    record). The codes come out of ``_unpack_words`` in a permuted order, which the tile
    keeps throughout: score row i of piece h is token h * HALF + k_tok[i], acc row c is
    channel v_chan[c].

        s^T [HALF, R] = codes_K^T [HALF, D] @ (q * ks)^T [D, R]     wgmma, M = 64
        o^T [D, R]    = codes_V^T [D, HALF] @ (p * vs)   [HALF, R]  wgmma, M = D
    """
    offs_d = tl.arange(0, D)
    rec16 = rec.to(tl.pointer_type(tl.float16))
    rec32 = rec.to(tl.pointer_type(tl.int32))
    HALF: tl.constexpr = k_tok.shape[0]
    KW: tl.constexpr = G * K_BITS // 32                                 # code words per K row
    KWH: tl.constexpr = HALF * K_BITS // 32
    VW: tl.constexpr = D * V_BITS // 32                                 # code words per V row
    ks = tl.load(rec16 + OFF_KS // 2 + offs_d).to(tl.float32)
    kz = tl.load(rec16 + OFF_KZ // 2 + offs_d).to(tl.float32) + (1 << (K_BITS - 1)) * ks
    qs = (qf * ks[:, None]).to(tl.float16)
    zk = tl.sum(qf * kz[:, None], axis=0)
    vch = tl.load(rec16 + OFF_VCH // 2 + v_chan).to(tl.float32)
    for h in tl.static_range(G // HALF):
        tok = h * HALF + k_tok
        kt = tl.load(rec16 + OFF_KT // 2 + tok).to(tl.float32)
        kw = tl.load(rec32 + OFF_KC // 4 + offs_d[:, None] * KW + h * KWH + tl.arange(0, KWH)[None, :])
        kc = _unpack_words(kw, K_BITS, magic)                          # [D, HALF]
        s = (tl.dot(tl.trans(kc), qs) + zk[None, :]) * kt[:, None]   # [HALF, R]
        p, alpha, m, l = _online_softmax(s, m, l)
        vs = tl.load(rec16 + OFF_VS // 2 + tok).to(tl.float32)
        vz = tl.load(rec16 + OFF_VZ // 2 + tok).to(tl.float32) + (1 << (V_BITS - 1)) * vs
        vw = tl.load(rec32 + OFF_VC // 4 + tok[:, None] * VW + tl.arange(0, VW)[None, :])
        vc = _unpack_words(vw, V_BITS, magic)                          # [HALF, D]
        o = tl.dot(tl.trans(vc), (p * vs[:, None]).to(tl.float16))     # [D, R]
        pz = tl.sum(p * vz[:, None], axis=0)
        acc = acc * alpha[None, :] + (o + pz[None, :]) * vch[:, None]
    return acc, m, l


@triton.jit
def _centered_zero(sc, z, BITS: tl.constexpr):
    """The zero of centered codes, z + 2^(BITS-1) s, from loaded fp16 s and z (fp16)."""
    return (z.to(tl.float32) + (1 << (BITS - 1)) * sc.to(tl.float32)).to(tl.float16)


@triton.jit
def _scale_zero(rec16, idx, BITS: tl.constexpr, OFF_S: tl.constexpr, OFF_Z: tl.constexpr):
    """A record's fp16 scale s[idx] and the zero of centered codes, z[idx] + C s[idx] (fp16):
    K's per-channel (k_scale, k_zero) or V's per-token (v_scale, v_zero) fields."""
    sc = tl.load(rec16 + OFF_S // 2 + idx)
    return sc, _centered_zero(sc, tl.load(rec16 + OFF_Z // 2 + idx), BITS)


@triton.jit
def _record_tile_deq(acc, m, l, q16, rec, k_tok, v_chan, magic, G: tl.constexpr, D: tl.constexpr,
                     K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                     OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                     OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                     OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """``_record_tile`` with the scale/zero of each code folded in registers instead of
    into q and the reductions: K^T [D, HALF] = (c - C) ks[d] + (kz[d] + C ks[d]) and
    V [HALF, D] = (c - C) vs[t] + (vz[t] + C vs[t]), both fp16 (what an fp16 cache would
    hold, before the per-token kt and per-channel vc factors), so per piece only the
    softmax max and sum cross warps (no sum over D for q.kz, no sum over t for p.vz)
    and q needs no per-record rescaling. q16 [D, R] fp16, already scaled.
    """
    offs_d = tl.arange(0, D)
    rec16 = rec.to(tl.pointer_type(tl.float16))
    rec32 = rec.to(tl.pointer_type(tl.int32))
    HALF: tl.constexpr = k_tok.shape[0]
    KW: tl.constexpr = G * K_BITS // 32
    KWH: tl.constexpr = HALF * K_BITS // 32
    VW: tl.constexpr = D * V_BITS // 32
    ks, kz = _scale_zero(rec16, offs_d, K_BITS, OFF_KS, OFF_KZ)
    vch = tl.load(rec16 + OFF_VCH // 2 + v_chan).to(tl.float32)
    for h in tl.static_range(G // HALF):
        tok = h * HALF + k_tok
        kt = tl.load(rec16 + OFF_KT // 2 + tok).to(tl.float32)
        kw = tl.load(rec32 + OFF_KC // 4 + offs_d[:, None] * KW + h * KWH + tl.arange(0, KWH)[None, :])
        kd = _unpack_words(kw, K_BITS, magic) * ks[:, None] + kz[:, None]         # [D, HALF] fp16
        s = tl.dot(tl.trans(kd), q16) * kt[:, None]                              # [HALF, R]
        p, alpha, m, l = _online_softmax(s, m, l)
        vs, vz = _scale_zero(rec16, tok, V_BITS, OFF_VS, OFF_VZ)
        vw = tl.load(rec32 + OFF_VC // 4 + tok[:, None] * VW + tl.arange(0, VW)[None, :])
        vd = _unpack_words(vw, V_BITS, magic) * vs[:, None] + vz[:, None]        # [HALF, D] fp16
        o = tl.dot(tl.trans(vd), p.to(tl.float16))                               # [D, R]
        acc = acc * alpha[None, :] + o * vch[:, None]
    return acc, m, l


@triton.jit
def _record_scales(rec, k_tok, v_chan, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr, OFF_KT: tl.constexpr,
                   OFF_VCH: tl.constexpr, OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr):
    """A record's fp16 scale fields as loaded, in the order the joint tile uses them:
    (ks, kz, kt0, kt1, vs0, vz0, vs1, vz1, vch); no arithmetic on them here, so that a
    caller can issue the loads one record ahead and use them a whole record later."""
    HALF: tl.constexpr = k_tok.shape[0]
    D: tl.constexpr = v_chan.shape[0]
    rec16 = rec.to(tl.pointer_type(tl.float16))
    offs_d = tl.arange(0, D)
    tok1 = HALF + k_tok
    return (tl.load(rec16 + OFF_KS // 2 + offs_d), tl.load(rec16 + OFF_KZ // 2 + offs_d),
            tl.load(rec16 + OFF_KT // 2 + k_tok), tl.load(rec16 + OFF_KT // 2 + tok1),
            tl.load(rec16 + OFF_VS // 2 + k_tok), tl.load(rec16 + OFF_VZ // 2 + k_tok),
            tl.load(rec16 + OFF_VS // 2 + tok1), tl.load(rec16 + OFF_VZ // 2 + tok1),
            tl.load(rec16 + OFF_VCH // 2 + v_chan))


@triton.jit
def _prefetch_l1(rec, OFF_KS: tl.constexpr, OFF_VCH: tl.constexpr):
    """Ask L1 for a record's two 768-byte runs of scale fields (k_scale, k_zero, k_tok and
    v_chan, v_scale, v_zero: 6 lines of 128 B each) without waiting for them: the next
    record's, so that its 2-byte field loads (which the pipeliner leaves synchronous) hit
    L1 instead of waiting on HBM. A hint only; no value is used (GPU only: PTX asm)."""
    idx = tl.arange(0, 16)
    line = tl.where(idx < 8, OFF_KS + (idx % 6) * 128, OFF_VCH + ((idx - 8) % 6) * 128)
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L1 [$1];", "=r,l", [rec + line],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _record_tile_joint(acc, m, l, lt, q16, rec, k_tok, scales, magic, G: tl.constexpr, D: tl.constexpr,
                       K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                       OFF_KC: tl.constexpr, OFF_VC: tl.constexpr):
    """``_record_tile_deq`` for a record of exactly two pieces (G = 2 * HALF), with one
    softmax update per record instead of one per piece: both pieces' scores first, one
    cross-warp max over max(s0, s1), and no cross-warp sum at all. The row sums stay
    a per-element partial ``lt`` [HALF, R] (lt = lt * alpha + p0 + p1) that the caller
    reduces once after the record loop; l (the sink's sum) is only rescaled.
    scales: the record's fields as ``_record_scales`` loaded them (the caller may load
    them a record ahead: as 2-byte loads the pipeliner leaves them synchronous).
    """
    offs_d = tl.arange(0, D)
    rec32 = rec.to(tl.pointer_type(tl.int32))
    HALF: tl.constexpr = k_tok.shape[0]
    KW: tl.constexpr = G * K_BITS // 32
    KWH: tl.constexpr = HALF * K_BITS // 32
    VW: tl.constexpr = D * V_BITS // 32
    ks, kz, kt0, kt1, vs0, vz0, vs1, vz1, vch = scales
    kz = _centered_zero(ks, kz, K_BITS)
    vz0 = _centered_zero(vs0, vz0, V_BITS)
    vz1 = _centered_zero(vs1, vz1, V_BITS)
    kt0 = kt0.to(tl.float32)
    kt1 = kt1.to(tl.float32)
    vch = vch.to(tl.float32)
    tok1 = HALF + k_tok
    kw_row = rec32 + OFF_KC // 4 + offs_d[:, None] * KW + tl.arange(0, KWH)[None, :]
    kd0 = _unpack_words(tl.load(kw_row), K_BITS, magic) * ks[:, None] + kz[:, None]
    kd1 = _unpack_words(tl.load(kw_row + KWH), K_BITS, magic) * ks[:, None] + kz[:, None]
    s0 = tl.dot(tl.trans(kd0), q16) * kt0[:, None]                               # [HALF, R]
    s1 = tl.dot(tl.trans(kd1), q16) * kt1[:, None]
    m_new = tl.maximum(m, tl.max(tl.maximum(s0, s1), axis=0))
    alpha = tl.exp2(m - m_new)
    p0 = tl.exp2(s0 - m_new[None, :])
    p1 = tl.exp2(s1 - m_new[None, :])
    lt = lt * alpha[None, :] + (p0 + p1)
    l = l * alpha
    vw_row = rec32 + OFF_VC // 4 + tl.arange(0, VW)[None, :]
    vd0 = _unpack_words(tl.load(vw_row + k_tok[:, None] * VW), V_BITS, magic) * vs0[:, None] + vz0[:, None]
    vd1 = _unpack_words(tl.load(vw_row + tok1[:, None] * VW), V_BITS, magic) * vs1[:, None] + vz1[:, None]
    o = tl.dot(tl.trans(vd0), p0.to(tl.float16))                                  # [D, R]
    o = tl.dot(tl.trans(vd1), p1.to(tl.float16), o)
    acc = acc * alpha[None, :] + o * vch[:, None]
    return acc, m_new, l, lt


@triton.jit
def _joint_records(acc, m, l, q16, bt, rec_head, stride_rb, r0, r1, k_tok, v_chan, magic,
                   G: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                   OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                   OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                   OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr, PREFETCH: tl.constexpr):
    """Records r0 .. r1-1 of a block-table row (block ids at bt) by ``_record_tile_joint``,
    every key visible to every row of q16 [D, R]; the scale fields loaded one record
    ahead (PREFETCH 1), hinted into L1 (2) or neither (0). Returns acc, m, l."""
    lt = tl.zeros([k_tok.shape[0], q16.shape[1]], tl.float32)
    if PREFETCH == 1:
        # scale fields one record ahead (a record past the last reloads the last)
        nxt = tl.load(bt + tl.minimum(r0, r1 - 1), mask=r0 < r1, other=0).to(tl.int64)
        sc = _record_scales(rec_head + nxt * stride_rb, k_tok, v_chan,
                            OFF_KS, OFF_KZ, OFF_KT, OFF_VCH, OFF_VS, OFF_VZ)
    for i in range(r0, r1):
        blk = tl.load(bt + i).to(tl.int64)
        if PREFETCH == 2:
            nxt = tl.load(bt + tl.minimum(i + 1, r1 - 1)).to(tl.int64)
            _prefetch_l1(rec_head + nxt * stride_rb, OFF_KS, OFF_VCH)
        if PREFETCH == 1:
            nxt = tl.load(bt + tl.minimum(i + 1, r1 - 1)).to(tl.int64)
            cur = sc
            sc = _record_scales(rec_head + nxt * stride_rb, k_tok, v_chan,
                                OFF_KS, OFF_KZ, OFF_KT, OFF_VCH, OFF_VS, OFF_VZ)
        else:
            cur = _record_scales(rec_head + blk * stride_rb, k_tok, v_chan,
                                 OFF_KS, OFF_KZ, OFF_KT, OFF_VCH, OFF_VS, OFF_VZ)
        acc, m, l, lt = _record_tile_joint(acc, m, l, lt, q16, rec_head + blk * stride_rb, k_tok, cur,
                                           magic, G, D, K_BITS, V_BITS, OFF_KC, OFF_VC)
    return acc, m, l + tl.sum(lt, axis=0)


@triton.jit
def _decode_kernel(q_ptr, kv_ptr, rec_ptr, bt_ptr, ctx_ptr, out_ptr, po_ptr, plse_ptr,
                   qk_scale, magic,
                   stride_qb, stride_qh, stride_kv, stride_fb, stride_fh,
                   stride_rb, stride_rh, stride_bt, stride_ob, stride_oh,
                   HKV, HQ, num_splits, part_stride, part_off,
                   QH: tl.constexpr, BLOCK_H: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                   REC_SUB: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, IS_KVARN: tl.constexpr,
                   SKIP_REC: tl.constexpr,
                   REC_DEQ: tl.constexpr, REC_JOINT: tl.constexpr, PREFETCH: tl.constexpr,
                   K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                   OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                   OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                   OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        _grid_dependency_sync()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    n_ctx = tl.load(ctx_ptr + b)
    n_blocks = tl.cdiv(n_ctx, G)
    bps = tl.cdiv(n_blocks, num_splits)
    start = split * bps
    end = tl.minimum(start + bps, n_blocks)

    rows = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    row_ok = rows < QH
    head = kvh * QH + rows
    V_PERM: tl.constexpr = 32 // V_BITS if IS_KVARN else 0
    if IS_KVARN:
        k_tok = _code_order(REC_SUB, K_BITS)
        v_chan = _code_order(D, V_BITS)
    else:
        k_tok = tl.arange(0, REC_SUB)
        v_chan = offs_d
    q = tl.load(q_ptr + b * stride_qb + head[None, :] * stride_qh + offs_d[:, None],
                mask=row_ok[None, :], other=0.0)                              # [D, BLOCK_H]
    qf = q.to(tl.float32) * qk_scale
    q16 = qf.to(q.dtype)
    row_pos = tl.zeros([BLOCK_H], tl.int32) + (n_ctx - 1)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([D, BLOCK_H], tl.float32)

    bt = bt_ptr + b.to(tl.int64) * stride_bt
    fp_head = kv_ptr + kvh.to(tl.int64) * stride_fh
    n_rec = 0
    if IS_KVARN:
        n_rec = tl.maximum((n_ctx - 1) // G - 1, 0)
    SUB: tl.constexpr = G // BLOCK_N
    last_sub = tl.cdiv(n_ctx, BLOCK_N)                               # sub-tiles holding keys
    acc, m, l = _fp16_blocks(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,      # the sink
                             start * SUB, tl.minimum(tl.minimum(end, 1) * SUB, last_sub),
                             row_pos, n_ctx, G, BLOCK_N, D, V_PERM)
    if IS_KVARN and not SKIP_REC:     # SKIP_REC: another kernel takes the records (decode_gluon.py)
        rec_head = rec_ptr + kvh.to(tl.int64) * stride_rh
        if REC_JOINT:
            acc, m, l = _joint_records(acc, m, l, q16, bt, rec_head, stride_rb,
                                       tl.maximum(start, 1), tl.minimum(end, n_rec + 1), k_tok, v_chan, magic,
                                       G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                                       OFF_VC, OFF_VCH, OFF_VS, OFF_VZ, PREFETCH)
        else:
            for i in range(tl.maximum(start, 1), tl.minimum(end, n_rec + 1)):
                blk = tl.load(bt + i).to(tl.int64)
                if REC_DEQ:
                    acc, m, l = _record_tile_deq(acc, m, l, q16, rec_head + blk * stride_rb, k_tok, v_chan,
                                                 magic, G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                                                 OFF_VC, OFF_VCH, OFF_VS, OFF_VZ)
                else:
                    acc, m, l = _record_tile(acc, m, l, qf, rec_head + blk * stride_rb, k_tok, v_chan, magic,
                                             G, D, K_BITS, V_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                                             OFF_VC, OFF_VCH, OFF_VS, OFF_VZ)
    acc, m, l = _fp16_blocks(acc, m, l, q16, bt, fp_head, stride_kv, stride_fb,      # the tail
                             tl.maximum(start, n_rec + 1) * SUB, tl.minimum(end * SUB, last_sub),
                             row_pos, n_ctx, G, BLOCK_N, D, V_PERM)

    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[None, :]                                            # [D, BLOCK_H]
    if not SPLIT:
        tl.store(out_ptr + b * stride_ob + head[None, :] * stride_oh + v_chan[:, None],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[None, :])
    else:
        part = (b * HQ + head) * part_stride + part_off + split
        live = row_ok & (start < end)
        tl.store(po_ptr + part[None, :] * D + v_chan[:, None], o, mask=live[None, :])
        tl.store(plse_ptr + part, m + tl.log2(l_safe), mask=live)


@triton.jit
def _merge_rows(po_ptr, part, ok, lse, mx, out_row, D: tl.constexpr):
    """out_row[:D] = sum_s 2^(lse_s - mx) po[part_s] / sum_s 2^(lse_s - mx) over the
    partials where ok (zeros where none is)."""
    offs_d = tl.arange(0, D)
    w = tl.where(ok, tl.exp2(lse - mx), 0.0)
    o = tl.load(po_ptr + part[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_row + offs_d, res.to(out_row.dtype.element_ty))


@triton.jit
def _merge_kernel(po_ptr, plse_ptr, ctx_ptr, out_ptr, stride_ob, stride_oh, HQ, num_splits,
                  G: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr = False):
    """out[b, h] = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the splits that ran."""
    if PDL:
        _grid_dependency_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_ctx = tl.load(ctx_ptr + b)
    n_blocks = tl.cdiv(n_ctx, G)
    bps = tl.maximum(tl.cdiv(n_blocks, num_splits), 1)
    n_used = tl.cdiv(n_blocks, bps)
    s = tl.arange(0, SPLITS_P2)
    ok = s < n_used
    part = (b * HQ + h) * num_splits + s
    lse = tl.load(plse_ptr + part, mask=ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(n_used > 0, mx, 0.0)
    _merge_rows(po_ptr, part, ok, lse, mx, out_ptr + b * stride_ob + h * stride_oh, D)


@triton.jit
def _merge_parts_kernel(po_ptr, plse_ptr, ctx_ptr, out_ptr, stride_ob, stride_oh, HQ, num_parts,
                        D: tl.constexpr, PARTS_P2: tl.constexpr, PDL: tl.constexpr = False):
    """``_merge_kernel`` for the split Gluon path: parts 0 .. num_parts-2 are the record
    splits (lse -inf where a split had no record), part num_parts-1 the fp16 blocks
    (written iff the sequence has a token)."""
    if PDL:
        _grid_dependency_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_ctx = tl.load(ctx_ptr + b)
    s = tl.arange(0, PARTS_P2)
    ok = (s < num_parts - 1) | ((s == num_parts - 1) & (n_ctx > 0))
    part = (b * HQ + h) * num_parts + s
    lse = tl.load(plse_ptr + part, mask=ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx > float("-inf"), mx, 0.0)
    _merge_rows(po_ptr, part, ok, lse, mx, out_ptr + b * stride_ob + h * stride_oh, D)


@triton.jit
def _merge_tile(po_ptr, plse_ptr, out_ptr, base, n_ok,
                D: tl.constexpr, PARTS_P2: tl.constexpr, DCH: tl.constexpr):
    """Channels [DCH * program_id(2), + DCH) of sum_s 2^(lse_s - mx) o_s / sum_s
    2^(lse_s - mx) over the partials s < n_ok at row base of po / plse, stored at out_ptr.
    A partial with lse -inf (a split with no key) adds nothing: its o (never written,
    possibly NaN) is loaded but replaced by 0.

    Every partial's load is in flight at once, the o tile's together with the lse
    values (masking o by lse made it wait for them: one more memory round trip per
    program, NOTES.md attempt 41); the channel slice keeps the tile at PARTS_P2 x DCH
    values (the one-tile merge holds a [256, 128] fp32 tile in one 4-warp program, 256
    values per thread: 3.9 us at 129 partials on the H100, NOTES.md attempt 29)."""
    s = tl.arange(0, PARTS_P2)
    ok = s < n_ok
    offs_d = tl.program_id(2) * DCH + tl.arange(0, DCH)
    o = tl.load(po_ptr + (base + s)[:, None].to(tl.int64) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    lse = tl.load(plse_ptr + base + s, mask=ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx > float("-inf"), mx, 0.0)
    live = ok & (lse > float("-inf"))
    w = tl.where(live, tl.exp2(lse - mx), 0.0)
    o = tl.where(live[:, None], o, 0.0)
    den = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + offs_d, res.to(out_ptr.dtype.element_ty))


@triton.jit
def _merge_chunks_kernel(po_ptr, plse_ptr, out_ptr, stride_ob, stride_oh, HQ, num_parts,
                         D: tl.constexpr, PARTS_P2: tl.constexpr, DCH: tl.constexpr,
                         PDL: tl.constexpr = False):
    """The merge of the Gluon path with fp16 chunks, whose partials are all written (lse
    -inf where one had no key): the record splits, then the fp16 chunks; grid (B, Hq,
    D / DCH)."""
    if PDL:
        _grid_dependency_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    _merge_tile(po_ptr, plse_ptr, out_ptr + b * stride_ob + h * stride_oh, (b * HQ + h) * num_parts,
                num_parts, D, PARTS_P2, DCH)


def merge_dch(parts_p2: int, d: int) -> int:
    """Channels per merge program: a [parts_p2, DCH] tile of at most 2,048 fp32 (16 a
    thread at 4 warps), at least 16 channels."""
    return max(16, min(d, 2048 // parts_p2))


@triton.jit
def _fp16_chunk_kernel(q_ptr, kv_ptr, bt_ptr, ctx_ptr, po_ptr, plse_ptr, qk_scale,
                       stride_qb, stride_qh, stride_kv, stride_fb, stride_fh, stride_bt,
                       HKV, HQ, num_parts, part0,
                       QH: tl.constexpr, BLOCK_H: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                       D: tl.constexpr, PDL: tl.constexpr = False):
    """The fp16 blocks of a KVarN sequence (the sink, block 0, and the tail, block
    n_rec + 1, if any) in BLOCK_N-key chunks, one program each: grid (B * Hkv, 2 G /
    BLOCK_N); chunk c < G / BLOCK_N is sink sub-tile c, the others tail sub-tiles. Each
    writes the partial (o, lse) of its QH query heads at part0 + c of po / plse (lse -inf
    where the chunk holds no key). Chunks rather than one program for both blocks: at B1
    one program's chain of sub-tile loads was 9.9 us of the 31 us (H100, NOTES.md attempt 29)."""
    if PDL:
        _grid_dependency_sync()
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    n_ctx = tl.load(ctx_ptr + b)
    n_rec = tl.maximum((n_ctx - 1) // G - 1, 0)
    SUB: tl.constexpr = G // BLOCK_N
    last_sub = tl.cdiv(n_ctx, BLOCK_N)
    j0 = tl.where(c < SUB, c, (n_rec + 1) * SUB + c - SUB)
    j1 = tl.minimum(j0 + 1, last_sub)
    rows = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    row_ok = rows < QH
    head = kvh * QH + rows
    q = tl.load(q_ptr + b * stride_qb + head[None, :] * stride_qh + offs_d[:, None],
                mask=row_ok[None, :], other=0.0)                              # [D, BLOCK_H]
    q16 = (q.to(tl.float32) * qk_scale).to(q.dtype)
    row_pos = tl.zeros([BLOCK_H], tl.int32) + (n_ctx - 1)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([D, BLOCK_H], tl.float32)
    acc, m, l = _fp16_blocks(acc, m, l, q16, bt_ptr + b.to(tl.int64) * stride_bt,
                             kv_ptr + kvh.to(tl.int64) * stride_fh, stride_kv, stride_fb,
                             j0, j1, row_pos, n_ctx, G, BLOCK_N, D, 0)
    live = j0 < j1
    l_safe = tl.where(l > 0, l, 1.0)
    part = (b * HQ + head) * num_parts + part0 + c
    tl.store(po_ptr + part[None, :].to(tl.int64) * D + offs_d[:, None], acc / l_safe[None, :],
             mask=row_ok[None, :] & live)
    tl.store(plse_ptr + part, tl.where(live, m + tl.log2(l_safe), float("-inf")), mask=row_ok)


def fp16_chunk_n(bsz: int, hkv: int, g: int, d: int, sms: int) -> int:
    """Keys per ``_fp16_chunk_kernel`` program: 32 where the batch's sequences x KV
    heads leave most SMs idle (B1: 8 chunks per sequence and head, 64 programs), else
    the fp16 path's sub-tile (``fp16_block_n``), so large batches write few partials."""
    return min(32, fp16_block_n(g, d)) if bsz * hkv * 4 <= sms else fp16_block_n(g, d)


def fp16_partials(q, kv_fp16, block_tables, context_lens, po, plse, scale, part0, block_n, pdl=False):
    """Launches ``_fp16_chunk_kernel``: the sink and tail partials at part0 .. part0 +
    2 G / block_n - 1 of po [B, Hq, parts, D] / plse [B, Hq, parts]. pdl: launched with
    programmatic dependent launch (``pdl_on``)."""
    bsz, hq, d = q.shape
    hkv, g = kv_fp16.shape[2], kv_fp16.shape[3]
    qh = hq // hkv
    _fp16_chunk_kernel[(bsz * hkv, 2 * (g // block_n))](
        q, kv_fp16, block_tables, context_lens, po, plse, scale * LOG2E,
        q.stride(0), q.stride(1), kv_fp16.stride(0), kv_fp16.stride(1), kv_fp16.stride(2), block_tables.stride(0),
        hkv, hq, po.shape[2], part0,
        QH=qh, BLOCK_H=max(16, triton.next_power_of_2(qh)), G=g, BLOCK_N=block_n, D=d, PDL=pdl,
        num_warps=4 if d <= 128 else 8, num_stages=2, **_pdl_kw(pdl))


def merge_partials(po, plse, out, pdl=False):
    """out [B, Hq, D] = the lse-weighted merge of every partial of po / plse (those with
    lse -inf skipped), ``_merge_chunks_kernel``; pdl as ``fp16_partials``."""
    bsz, hq, parts, d = po.shape
    p2 = triton.next_power_of_2(parts)
    dch = merge_dch(p2, d)
    _merge_chunks_kernel[(bsz, hq, d // dch)](po, plse, out, out.stride(0), out.stride(1), hq, parts,
                                              D=d, PARTS_P2=p2, DCH=dch, PDL=pdl, num_warps=4,
                                              **_pdl_kw(pdl))
    return out


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def fp16_block_n(g: int, d: int) -> int:
    """Keys per fp16 sub-tile: 16 KB of K (and of V) per pipeline stage."""
    return max(16, min(g, 8192 // d))


def default_num_splits(batch: int, num_kv_heads: int, max_blocks: int, device: torch.device,
                       slots_per_sm: int | None = None) -> int:
    """Split-K factor from shapes alone (>= 2 blocks per split, at most 64).

    slots_per_sm None (the fp16 path): about 8 programs per SM. H100 sweeps
    (benchmarks/NOTES.md): B=1, N=4K best at 16 splits (2 blocks each, 0.023 ms vs 0.031
    at 8); B=1, N=128K flat from 32 to 128; B=64, N=16K flat 1-4.

    slots_per_sm given (the KVarN path: programs resident per SM at its launch): the s
    minimising waves(s) * (blocks per split + 1), waves(s) = ceil(programs * s / slots),
    the 1 standing for a split's fixed cost (q, init, partial write, merge). It ranks the
    H100 sweeps of the joint-softmax kernel the way they measured (NOTES.md attempt 19):
    B16 N16K 4 < 18 < 9 splits, D=64 B64 N16K 12 < 6 < 3, B64 N16K and B128 N8K 1 split.
    """
    return _splits(max(batch * num_kv_heads, 1), max_blocks, _sm_count(device), slots_per_sm)


@functools.lru_cache(maxsize=4096)
def _splits(programs: int, max_blocks: int, sms: int, slots_per_sm: int | None) -> int:
    # cached: the search below is ~100 us of Python, which a ~20 us kernel launched
    # eagerly would wait on
    cap = max(1, min(triton.cdiv(max_blocks, 2), 64))
    if slots_per_sm is None:
        return max(1, min(triton.cdiv(8 * sms, programs), cap))
    slots = slots_per_sm * sms
    best, best_cost = 1, None
    for s in range(1, cap + 1):
        cost = triton.cdiv(programs * s, slots) * (triton.cdiv(max_blocks, s) + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def default_launch(cfg: KVarNConfig | None, g: int, d: int) -> tuple[int, int | None, int, int | None]:
    """(num_warps, maxnreg, rec_sub, slots_per_sm) for the decode kernel; H100 sweeps in
    benchmarks/NOTES.md. slots_per_sm: CTAs resident per SM at that launch (registers
    bound it), for ``default_num_splits``; None keeps the fp16 path's split rule.

    KVarN G = 128: 4 warps; at D <= 128 a 128-register cap (a few spills) lets 4 CTAs
    share an SM instead of 2: B64_N16K 1.46 -> 1.22 ms. At D = 256 the cap spills
    heavily and 4 warps uncapped is fastest (B16_N16K 0.57 ms at 8 warps -> 0.33), 2 CTAs
    per SM. G = 64 records miscompile on Triton 3.6 at 4 warps (illegal address at D = 64,
    wrong results at D = 256): 8 warps, and at D = 256 32-token record pieces (8 warps
    with 64-token pieces faults there). The fp16 path: 4 warps at D <= 128, else 8.
    """
    if cfg is None:
        return (4 if d <= 128 else 8), None, min(g, 64), None
    if g <= 64:
        return 8, None, (32 if d >= 256 else min(g, 64)), None
    return 4, (128 if d <= 128 else None), 64, (4 if d <= 128 else 2)


def default_prefetch(d: int) -> str:
    """How the joint record loop fetches the next record's scale fields (H100,
    benchmarks/NOTES.md attempt 25; all within 1-6% of not prefetching): an L1 prefetch
    hint at D <= 128, where the 128-register cap spills values loaded a record ahead
    (each spill store waits for its load), and registers at D = 256 (no cap there)."""
    return "regs" if d >= 256 else "l1"


def joint_prefetch_mode(prefetch: str | None, d: int, device: torch.device) -> int:
    """The PREFETCH constexpr of the joint record loop (``_joint_records``) for a
    prefetch setting ("auto": ``default_prefetch``): 0 none, 1 "regs", 2 "l1"; off CUDA
    at most 1 (the L1 hint is PTX, which the interpreter does not run)."""
    if prefetch == "auto":
        prefetch = default_prefetch(d)
    modes = {None: 0, "regs": 1, "l1": 2}
    if prefetch not in modes:
        raise ValueError(f"prefetch must be 'auto', 'l1', 'regs' or None, got {prefetch!r}")
    return modes[prefetch] if device.type == "cuda" else min(modes[prefetch], 1)


def check_paged_args(q, kv_fp16, records, block_tables, context_lens, cfg, q_dims: int):
    """Shared argument checks of the paged attention wrappers; returns (Hkv, G, D)."""
    if q.dim() != q_dims:
        raise ValueError(f"q must have {q_dims} dims, got {tuple(q.shape)}")
    if kv_fp16.dim() != 5 or kv_fp16.shape[0] != 2:
        raise ValueError(f"kv_fp16 must be [2, nfp, Hkv, G, D], got {tuple(kv_fp16.shape)}")
    _, _, hkv, g, d = kv_fp16.shape
    if q.shape[-1] != d:
        raise ValueError(f"q head_dim {q.shape[-1]} != cache head_dim {d}")
    if q.shape[-2] % hkv:
        raise ValueError(f"{q.shape[-2]} query heads are not a multiple of {hkv} KV heads")
    if d & (d - 1) or g & (g - 1) or d < 16 or g < 16:
        raise ValueError(f"G ({g}) and head_dim ({d}) must be powers of two >= 16")
    if kv_fp16.stride(-1) != 1 or kv_fp16.stride(-2) != d:
        raise ValueError("kv_fp16's (G, D) tiles must be contiguous")
    if q.stride(-1) != 1:
        raise ValueError("q's last dim must be contiguous")
    if cfg is None:
        if records is not None:
            raise ValueError("records given without a KVarNConfig")
        if kv_fp16.dtype not in (torch.float16, torch.bfloat16) or q.dtype != kv_fp16.dtype:
            raise TypeError(f"fp16 cache: q and kv_fp16 must share fp16/bf16, got {q.dtype} and {kv_fp16.dtype}")
    else:
        if not isinstance(cfg, KVarNConfig):
            raise TypeError(f"cfg must be a KVarNConfig or None, got {type(cfg).__name__}")
        if (g, d) != (cfg.group_size, cfg.head_dim):
            raise ValueError(f"cache blocks G={g}, head_dim={d} do not match {cfg.name} "
                             f"(G={cfg.group_size}, head_dim={cfg.head_dim})")
        if q.dtype != torch.float16 or kv_fp16.dtype != torch.float16:
            raise TypeError(f"the KVarN path computes in fp16: q and kv_fp16 must be float16, "
                            f"got {q.dtype} and {kv_fp16.dtype}")
        if (records is None or records.dtype != torch.uint8 or records.dim() != 3
                or records.shape[1] != hkv or records.shape[2] != cfg.record_bytes
                or records.stride(-1) != 1):
            raise ValueError(f"records must be uint8 [nrec, {hkv}, {cfg.record_bytes}] with "
                             f"contiguous records, got "
                             f"{None if records is None else (records.dtype, tuple(records.shape))}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must be int32 [B, max_blocks] with contiguous rows, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.dtype != torch.int32 or context_lens.dim() != 1 or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous int32 [B], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    for t, name in ((kv_fp16, "kv_fp16"), (block_tables, "block_tables"), (context_lens, "context_lens")):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return hkv, g, d


def record_constexprs(cfg: KVarNConfig | None) -> dict:
    if cfg is None:
        return dict(IS_KVARN=False, K_BITS=4, V_BITS=4, OFF_KC=0, OFF_KS=0, OFF_KZ=0, OFF_KT=0,
                    OFF_VC=0, OFF_VCH=0, OFF_VS=0, OFF_VZ=0)
    o = cfg.offsets
    return dict(IS_KVARN=True, K_BITS=cfg.k_bits, V_BITS=cfg.v_bits,
                OFF_KC=o["k_codes"], OFF_KS=o["k_scale"], OFF_KZ=o["k_zero"], OFF_KT=o["k_tok"],
                OFF_VC=o["v_codes"], OFF_VCH=o["v_chan"], OFF_VS=o["v_scale"], OFF_VZ=o["v_zero"])


def paged_decode_attention(q, kv_fp16, records, block_tables, context_lens, cfg: KVarNConfig | None,
                           sm_scale: float | None = None, num_splits: int | None = None,
                           out: torch.Tensor | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, block_h: int | None = None,
                           rec_sub: int | None = None, maxnreg: int | None = None,
                           rec_deq: bool = True, rec_joint: bool | None = None,
                           prefetch: str | None = "auto", kernel: str = "auto",
                           pdl=None, raw: bool | None = None, kall: bool | None = None,
                           qmma: bool | None = None) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] (cache frame) -> [B, Hq, D], ``ref_paged_decode_attention`` semantics.

    cfg None (records None) reads an fp16 (or bf16) cache with the same kernel.
    num_splits: split-K factor (a Python int; default from shapes and the SM count).
    out: a preallocated [B, Hq, D] output (CUDA graphs). Launch knobs for benchmarks:
    num_warps / num_stages, block_h (query-head rows, >= 16), rec_sub (record tokens
    per MMA piece, default from ``default_launch``: a whole 128-token record
    miscompiles on Triton 3.6),
    maxnreg (a register cap per thread, traded against occupancy; 0 = no cap; default
    from ``default_launch`` when num_warps is left at its default), rec_deq (records'
    scales and zeros applied to the codes in registers, ``_record_tile_deq``; False:
    folded into q and the reductions, ``_record_tile``, the extend kernel's way),
    rec_joint (default on where a record is exactly two pieces, with rec_deq: one softmax
    update per record, ``_record_tile_joint``; H100 B64 N16K 1.04 -> 0.87 ms),
    prefetch (joint path, the next record's scale fields while this one is worked on):
    "l1" a prefetch hint to L1, "regs" loaded into registers one record ahead, None
    neither, "auto" ``default_prefetch``; the interpreter runs no PTX, so there "l1" is
    None.
    kernel: "triton" (``_decode_kernel``, every preset, CPU interpreter included),
    "gluon" (decode_gluon.py: records by a one-warp Gluon kernel, CUDA only, k4v2_g128 at
    head_dim 64, 128 or 256; there prefetch is "auto"/"l2"/"l2x2"/None and maxnreg its
    register cap), or "auto": "gluon" where it applies, the head dim is in
    ``GLUON_AUTO_DIMS``, no Triton-kernel knob is given and the batch holds at least
    ``GLUON_MIN_RECORDS`` records, else "triton".
    pdl: programmatic dependent launch of the call's kernels (None: ``PDL``; see ``pdl_on``).
    raw: the Gluon kernel's code unpack (None: ``GLUON_RAW``); kall: its K words loaded in
    one batch per record (None: ``GLUON_KALL``; head_dim 128); qmma: q hoisted out of its
    record loop and the zero terms by MMA, with the centered codes' rounding (None:
    ``GLUON_QMMA``; with raw only). The Triton kernel ignores all three.
    """
    hkv, g, d = check_paged_args(q, kv_fp16, records, block_tables, context_lens, cfg, 3)
    bsz, hq, _ = q.shape
    if kernel not in ("auto", "triton", "gluon"):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'gluon', got {kernel!r}")
    if kernel == "auto":
        # the Gluon kernel where it applies, unless a Triton-kernel knob was given
        triton_knobs = (any(x is not None for x in (num_warps, num_stages, block_h, rec_sub, rec_joint))
                        or not rec_deq or prefetch in ("l1", "regs"))
        # and the batch has enough records to pay for its three launches (H100 graph replay,
        # NOTES.md attempt 26: B1 N4K, 240 records, 0.025 ms vs 0.015 for the Triton kernel;
        # B1 N32K, 2,032 records, 0.036 vs 0.040)
        many = bsz * hkv * max(block_tables.shape[1] - 2, 0) >= GLUON_MIN_RECORDS
        kernel = "gluon" if (not triton_knobs and many and gluon_supported(q, cfg, hq // hkv)
                             and q.shape[-1] in GLUON_AUTO_DIMS and gluon_available()) else "triton"
    if block_tables.shape[0] != bsz or context_lens.shape[0] != bsz:
        raise ValueError(f"batch {bsz}: block_tables {tuple(block_tables.shape)}, "
                         f"context_lens {tuple(context_lens.shape)}")
    qh = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with a contiguous last dim")
    if bsz == 0:
        return out
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    pdl = pdl_on(q.device, pdl)
    if kernel == "gluon":
        return _gluon_decode(q, kv_fp16, records, block_tables, context_lens, cfg, scale, num_splits, out,
                             prefetch, maxnreg, pdl=pdl, raw=raw, kall=kall, qmma=qmma)
    warps0, maxnreg0, rec_sub0, slots0 = default_launch(cfg, g, d)
    if num_splits is None:
        num_splits = default_num_splits(bsz, hkv, block_tables.shape[1], q.device,
                                        slots0 if (num_warps or warps0) == warps0 else None)
    num_splits = max(1, int(num_splits))
    block_h = max(16, triton.next_power_of_2(qh), block_h or 0)
    if num_splits > 1:
        po = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
        plse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out
    rec = records if records is not None else kv_fp16
    srb, srh = (records.stride(0), records.stride(1)) if records is not None else (0, 0)
    num_warps = num_warps or warps0
    if maxnreg is None and num_warps == warps0:
        maxnreg = maxnreg0
    rec_sub = rec_sub or rec_sub0
    rec_joint = (rec_joint is None or bool(rec_joint)) and rec_deq and cfg is not None and g == 2 * rec_sub
    prefetch_mode = joint_prefetch_mode(prefetch, d, q.device)
    if q.device.type != "cuda":
        maxnreg = None      # the interpreter takes no register cap
    if num_stages is None:
        num_stages = 2     # 1 stage miscompiles on Triton 3.6 (wrong outputs, H100 2026-11-23)
    _decode_kernel[(bsz * hkv, num_splits)](
        q, kv_fp16, rec, block_tables, context_lens, out, po, plse,
        scale * LOG2E, FP16_MAGIC,
        q.stride(0), q.stride(1), kv_fp16.stride(0), kv_fp16.stride(1), kv_fp16.stride(2),
        srb, srh, block_tables.stride(0), out.stride(0), out.stride(1),
        hkv, hq, num_splits, num_splits, 0,
        QH=qh, BLOCK_H=block_h, G=g, BLOCK_N=fp16_block_n(g, d), REC_SUB=rec_sub, D=d, REC_DEQ=bool(rec_deq),
        REC_JOINT=rec_joint, PREFETCH=prefetch_mode,
        SPLIT=num_splits > 1, SKIP_REC=False,
        **record_constexprs(cfg), PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        **_pdl_kw(pdl),
    )
    if num_splits > 1:
        _merge_kernel[(bsz, hq)](po, plse, context_lens, out, out.stride(0), out.stride(1), hq, num_splits,
                                 G=g, D=d, SPLITS_P2=triton.next_power_of_2(num_splits), PDL=pdl, num_warps=4,
                                 **_pdl_kw(pdl))
    return out


# kernel="auto" takes the Gluon record kernel from this many records per call (the
# batch's sequences x KV heads x record blocks its block table can hold). H100 graph
# replay, session 8 (NOTES.md attempt 30): with the chunked, side-stream fp16 part the
# Gluon path ties the Triton kernel at B1 N4K (240 records, 0.0157 ms each) and wins at
# D64 B1 N32K (762 records, 0.0120 vs 0.0167 ms). Session 11, with PDL (attempt 38): the
# Gluon path 0.0131-0.0133 ms at B1 N4K against the Triton kernel's 0.0150, so from 240
# (B1 N4K's count; fewer records were not timed)
GLUON_MIN_RECORDS = 240
# head dims kernel="auto" gives the Gluon kernel (all three since session 7: H100 D64 B64
# N16K 0.101 vs 0.171 ms for the Triton kernel, D256 B16 N16K 0.168 vs 0.240; NOTES.md
# attempt 27); KVARN_GLUON_DIMS="128" (say) keeps the others on the Triton kernel.
GLUON_AUTO_DIMS = tuple(int(x) for x in os.environ.get("KVARN_GLUON_DIMS", "64,128,256").split(",")
                        if x.strip())
# the Gluon path's fp16 sink/tail as chunked partials with a channel-sliced merge
# (``_fp16_chunk_kernel``, NOTES.md attempt 29), and that fp16 part on a second CUDA
# stream at the same time as the record kernel (both write their own partials; the merge
# waits for both; graph capture records the fork and the join; attempt 30). Verified on
# the H100 in session 8. B1 N32K graph replay: 0.0378 ms with neither, 0.0282 chunks,
# 0.0320 side stream, 0.0270 both. The side stream costs host time per eager call (D64
# B64 N16K eager 0.0988 -> 0.1162 ms, launch-bound; replayed 0.0960 -> 0.0937), so by
# default ("graph") it is used only while a CUDA graph is being captured, where that
# cost is paid once. KVARN_GLUON_SIDE_STREAM=1 / 0: always / never;
# KVARN_GLUON_FP16_CHUNKS=0: one fp16 program per sequence and KV head.
GLUON_FP16_CHUNKS = os.environ.get("KVARN_GLUON_FP16_CHUNKS", "1") == "1"
GLUON_SIDE_STREAM = os.environ.get("KVARN_GLUON_SIDE_STREAM", "graph")
# the Gluon kernel's PAIR loop (two records per iteration, two independent chains per
# warp; D 64 and 128 only, decode_gluon.LAUNCH_PAIR), aimed at small batches where the
# record kernel has few warps per SM. KVARN_GLUON_PAIR=1. GPU-tested in session 9 but
# off: the record kernel alone 5-7% faster at B1 N32K, slower at N128K and D 64, and
# under graph replay with the side stream 29% slower (NOTES.md attempt 31).
GLUON_PAIR = os.environ.get("KVARN_GLUON_PAIR", "0") == "1"
# Programmatic dependent launch (NOTES.md attempt 38): on Hopper and later every kernel of
# a decode call is launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION and
# starts with griddepcontrol.wait / launch_dependents (``_grid_dependency_sync``), so a
# kernel's launch and its programs' start overlap the end of the kernel before it instead
# of following it. KVARN_PDL=1 on (the default), 0 off. H100 graph replay, session 11
# (results/pdl_h100_s11.json, two rounds each): B1 N4K Gluon path 0.0150 -> 0.0132 ms,
# B1 N32K 0.0260 -> 0.0256, B1 N128K 0.0636 -> 0.0570, D64 B1 N32K 0.0110 -> 0.0097,
# B16 N16K 0.105 -> 0.100; outputs bit-identical (test_pdl_matches_plain_launch).
PDL = os.environ.get("KVARN_PDL", "1")
# The Gluon kernel's code unpack without the fp16 magic number (decode_gluon.K_ASM_RAW,
# NOTES.md attempt 50): the masked codes are fp16 subnormals that the tensor cores
# multiply exactly (H100, session 15: 33 GPU tests), rescaled per score / output row
# after the MMA. Offline (Triton 3.6, sm_90a) the D 128 record loop is 1,900 instructions
# instead of 2,319; H100 B1 N32K 0.0250 -> 0.0242 ms, D 64 slower (a spill). Alone it
# doubles the rounding error of the B operands (uncentered codes); QMMA restores it.
# KVARN_GLUON_RAW=1 on.
GLUON_RAW = os.environ.get("KVARN_GLUON_RAW", "0") == "1"
# Its K words of a record in one batch of loads before the score MMAs (head_dim 128;
# NOTES.md attempt 51): offline 56 loads ahead of the first MMA instead of about 30.
# KVARN_GLUON_KALL=1 on.
GLUON_KALL = os.environ.get("KVARN_GLUON_KALL", "0") == "1"
# With RAW: q loaded once per program (fp16, scaled) instead of per record, the B
# fragments q * ks by HMUL2, and the zero terms by MMA with broadcast A rows: sum_d q (kz
# + 8 ks) - 8 sum_d B, and for values -2 sum_t B, which restores the centered codes'
# rounding error (NOTES.md attempts 52, 53). H100 session 15, attempt 52 without the
# centering: B1 N32K 0.0250 -> 0.0229 ms, but twice the rounding error (one GPU test over
# its bar); attempt 53 (this code, offline 1,804 instructions per record at D 128 against
# 2,319 without RAW) is not GPU-run yet. KVARN_GLUON_QMMA=1 on.
GLUON_QMMA = os.environ.get("KVARN_GLUON_QMMA", "0") == "1"
_CAPABILITY: dict = {}


def pdl_on(device: torch.device, mode=None) -> bool:
    """Whether decode kernels on ``device`` launch with PDL: mode (None: ``PDL``) "1" /
    True on, "0" / False off; on only on CUDA devices of compute capability 9 or more."""
    mode = PDL if mode is None else mode
    if mode in (False, "0"):
        return False
    if mode not in (True, "1"):
        raise ValueError(f"KVARN_PDL / pdl takes 1 or 0, got {mode!r}")
    if device.type != "cuda" or not _triton_launches_pdl():
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)[0]
    return _CAPABILITY[idx] >= 9


@functools.lru_cache(maxsize=1)
def _triton_launches_pdl() -> bool:
    """Whether this Triton's CUDA launcher takes ``launch_pdl`` (3.4 and later)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _pdl_kw(pdl: bool) -> dict:
    """The launch option (only when on: the interpreter's launcher does not know it)."""
    return {"launch_pdl": True} if pdl else {}


def side_stream_on(mode, capturing: bool) -> bool:
    """Whether the fp16 part goes to the side stream: mode True / "1" always, False /
    "0" never, "graph" only while capturing a CUDA graph."""
    if mode in (True, "1"):
        return True
    if mode in (False, "0", None):
        return False
    if mode == "graph":
        return capturing
    raise ValueError(f"KVARN_GLUON_SIDE_STREAM / side_stream takes 1, 0 or graph, got {mode!r}")


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One side stream per device, made once (a new stream per call would cost a
    driver call each time and is not allowed while a graph is being captured)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE_STREAMS.get(idx)
    if s is None:
        s = _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return s


@functools.lru_cache(maxsize=1)
def gluon_available() -> bool:
    """Whether this Triton has the Gluon API the record kernel is written against (3.6)."""
    try:
        from kvarn.kernels import decode_gluon  # noqa: F401
        return True
    except (ImportError, AttributeError, TypeError):
        return False


def gluon_supported(q: torch.Tensor, cfg: KVarNConfig | None, qh: int) -> bool:
    """The Gluon record kernel's scope (decode_gluon.py): CUDA, k4v2 records of 128 tokens
    at head_dim 64, 128 or 256, up to 8 query heads per KV head (``kernel="auto"`` takes
    it only at the head dims of ``GLUON_AUTO_DIMS``)."""
    return (q.device.type == "cuda" and cfg is not None and cfg.k_bits == 4 and cfg.v_bits == 2
            and cfg.group_size == 128 and cfg.head_dim in (64, 128, 256) and qh <= 8)


@functools.lru_cache(maxsize=4096)
def _gluon_splits(programs: int, max_blocks: int, sms: int, programs_per_sm: int = 12) -> int:
    """The wave-count rule of ``_splits`` for the Gluon kernel's one-warp programs
    (``programs_per_sm`` resident per SM, decode_gluon.LAUNCH), up to 128 splits."""
    slots = programs_per_sm * sms
    best, best_cost = 1, None
    for s in range(1, max(1, min(triton.cdiv(max_blocks, 2), 128)) + 1):
        cost = triton.cdiv(programs * s, slots) * (triton.cdiv(max_blocks, s) + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def _gluon_decode(q, kv_fp16, records, block_tables, context_lens, cfg, scale, num_splits, out,
                  prefetch="auto", maxnreg=None, fp16_chunks=None, side_stream=None, pair=None, pdl=False,
                  raw=None, kall=None, qmma=None):
    """Records by the Gluon kernel (num_splits programs of one warp per sequence and KV
    head, one partial each), the sink and tail blocks, then a merge of the partials.

    The fp16 blocks: fp16_chunks (None: ``GLUON_FP16_CHUNKS``, on by default) True:
    ``_fp16_chunk_kernel``, a program per chunk of keys (a partial each), merged over
    channel slices by ``_merge_chunks_kernel`` (NOTES.md attempt 29); False:
    ``_decode_kernel`` with records skipped, one program per sequence and KV head (one
    more partial), merged by ``_merge_parts_kernel``. Both verified on the H100.

    prefetch: "l2" (the next record into L2 by a bulk prefetch), "l2x2" (two records
    ahead), None, or "auto" (decode_gluon.LAUNCH's per-head_dim choice); maxnreg: a
    register cap for the Gluon kernel (None: LAUNCH's). side_stream (None:
    ``GLUON_SIDE_STREAM``, by default "graph"; see ``side_stream_on``): the fp16 part
    runs on a second stream while the record kernel runs, joined before the merge. pair
    (None: ``GLUON_PAIR``; D 64 / 128 only, elsewhere ignored): two records per loop
    iteration, at decode_gluon.LAUNCH_PAIR's register cap and without the L2 prefetch.
    pdl: every kernel on the caller's stream launched with programmatic dependent launch
    (the fp16 part on the side stream, which starts after an event wait, without). raw
    (None: ``GLUON_RAW``): the subnormal code unpack. kall (None: ``GLUON_KALL``; head_dim
    128 only, elsewhere ignored): a record's K words in one batch of loads. qmma (None:
    ``GLUON_QMMA``; with raw only, else ignored): q loaded once per program, the B
    fragments q * ks in fp16, and the zero terms (sum_d q (kz + 8 ks) - 8 sum_d B; for
    values -2 sum_t B) by MMA with broadcast A rows."""
    aheads = {"l2": 1, "l2x2": 2, None: 0}
    if prefetch != "auto" and prefetch not in aheads:
        raise ValueError(f"kernel='gluon' takes prefetch 'auto', 'l2', 'l2x2' or None, got {prefetch!r}")
    bsz, hq, d = q.shape
    hkv, g = kv_fp16.shape[2], kv_fp16.shape[3]
    qh = hq // hkv
    if not gluon_supported(q, cfg, qh):
        raise ValueError(f"kernel='gluon' covers CUDA, k4v2 G=128, head_dim 64/128/256, <= 8 query heads "
                         f"per KV head; got {q.device.type}, {None if cfg is None else cfg.name}, D={d}, {qh}")
    from kvarn.kernels import decode_gluon
    maxnreg0, per_sm, ahead0 = decode_gluon.LAUNCH[d]
    pair = (GLUON_PAIR if pair is None else bool(pair)) and d in decode_gluon.LAUNCH_PAIR
    if pair:
        (maxnreg0, per_sm), ahead0 = decode_gluon.LAUNCH_PAIR[d], 0
    if num_splits is None:
        num_splits = _gluon_splits(max(bsz * hkv, 1), block_tables.shape[1], _sm_count(q.device), per_sm)
    num_splits = max(1, int(num_splits))
    if maxnreg is None:
        maxnreg = maxnreg0
    # the bulk prefetch wants 16-byte aligned records of a multiple of 16 bytes
    rec_bytes = cfg.record_bytes
    ahead = ahead0 if prefetch == "auto" else aheads[prefetch]
    if pair or rec_bytes % 16 or records.stride(0) % 16 or records.stride(1) % 16 or records.data_ptr() % 16:
        ahead = 0
    raw = GLUON_RAW if raw is None else bool(raw)
    chunks = GLUON_FP16_CHUNKS if fp16_chunks is None else bool(fp16_chunks)
    block_n = fp16_chunk_n(bsz, hkv, g, d, _sm_count(q.device)) if chunks else 0
    # the record splits, then the fp16 chunks (or the one fp16 partial)
    parts = num_splits + (2 * (g // block_n) if chunks else 1)
    po = torch.empty(bsz, hq, parts, d, dtype=torch.float32, device=q.device)
    plse = torch.empty(bsz, hq, parts, dtype=torch.float32, device=q.device)
    o = cfg.offsets
    side = q.is_cuda and side_stream_on(GLUON_SIDE_STREAM if side_stream is None else side_stream,
                                        torch.cuda.is_current_stream_capturing())
    main = torch.cuda.current_stream(q.device) if side else None
    if side:
        # po/plse/out and the inputs belong to the caller's stream, which waits for the
        # side stream before the merge, so nothing later frees or reuses them early
        stream = _side_stream(q.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            _fp16_part(q, kv_fp16, records, block_tables, context_lens, cfg, scale, out, po, plse,
                       num_splits, parts, block_n, False)
    decode_gluon.record_attention_kernel[(bsz * hkv, num_splits)](
        q, records, block_tables, context_lens, po, plse, scale * LOG2E,
        q.stride(0), q.stride(1), records.stride(0), records.stride(1), block_tables.stride(0),
        hkv, hq, num_splits, parts,
        QH=qh, G=g, D=d, AHEAD=ahead, PF_ASM=decode_gluon.prefetch_asm(rec_bytes) if ahead else "",
        OFF_KC=o["k_codes"], OFF_KS=o["k_scale"], OFF_KZ=o["k_zero"], OFF_KT=o["k_tok"],
        OFF_VC=o["v_codes"], OFF_VCH=o["v_chan"], OFF_VS=o["v_scale"], OFF_VZ=o["v_zero"], PAIR=pair,
        PDL=pdl, RAW=raw, KALL=(GLUON_KALL if kall is None else bool(kall)) and d == 128,
        QMMA=raw and (GLUON_QMMA if qmma is None else bool(qmma)), num_warps=1,
        **({"maxnreg": maxnreg} if maxnreg else {}), **_pdl_kw(pdl))
    if side:
        main.wait_stream(stream)
    else:
        _fp16_part(q, kv_fp16, records, block_tables, context_lens, cfg, scale, out, po, plse,
                   num_splits, parts, block_n, pdl)
    if block_n:
        merge_partials(po, plse, out, pdl)
        return out
    _merge_parts_kernel[(bsz, hq)](po, plse, context_lens, out, out.stride(0), out.stride(1), hq, parts,
                                   D=d, PARTS_P2=triton.next_power_of_2(parts), PDL=pdl, num_warps=4,
                                   **_pdl_kw(pdl))
    return out


def _fp16_part(q, kv_fp16, records, block_tables, context_lens, cfg, scale, out, po, plse,
               num_splits, parts, block_n, pdl=False):
    """The sink and tail blocks' partials, after the num_splits record partials: in
    chunks of block_n keys (``fp16_partials``), or, with block_n 0, one partial per
    sequence and KV head by ``_decode_kernel`` with records skipped."""
    if block_n:
        fp16_partials(q, kv_fp16, block_tables, context_lens, po, plse, scale, num_splits, block_n, pdl)
        return
    bsz, hq, d = q.shape
    hkv, g = kv_fp16.shape[2], kv_fp16.shape[3]
    qh = hq // hkv
    warps0, _, rec_sub0, _ = default_launch(cfg, g, d)
    _decode_kernel[(bsz * hkv, 1)](
        q, kv_fp16, records, block_tables, context_lens, out, po, plse,
        scale * LOG2E, FP16_MAGIC,
        q.stride(0), q.stride(1), kv_fp16.stride(0), kv_fp16.stride(1), kv_fp16.stride(2),
        records.stride(0), records.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        hkv, hq, 1, parts, num_splits,
        QH=qh, BLOCK_H=max(16, triton.next_power_of_2(qh)), G=g, BLOCK_N=fp16_block_n(g, d), REC_SUB=rec_sub0,
        D=d, REC_DEQ=True, REC_JOINT=False, PREFETCH=0, SPLIT=True, SKIP_REC=True,
        **record_constexprs(cfg), PDL=pdl, num_warps=warps0, num_stages=2, **_pdl_kw(pdl))
