"""KVarN record attention in Gluon: codes unpacked straight into mma.sync fragments.

GPU only (Gluon has no CPU interpreter). The record loop of the Triton kernel
(decode_attention.py) for the k4v2_g128 preset at head_dim 64, 128 and 256: one warp per
program, so nothing in the record loop crosses warps (no barrier, no shared memory).

Why: the Triton kernel unpacks codes in a blocked layout and Triton moves them into the
tensor-core operand layout through shared memory (STS, barrier, LDSM), and its softmax
reduces across 4 warps per record (benchmarks/NOTES.md, session 4 profile). Here the
word loads are laid out so that each lane already holds the words its mma fragments
need, and a PRMT + LOP3 + HFMA2 sequence per word pair produces fragment registers
(``gl.convert_layout(..., assert_trivial=True)`` proves at compile time that no data
moves).

Orientation (one record, G = 128 tokens, D = 128 channels, up to 8 query heads as N):

    s^T [128 r, 8 h] = Kc [128 r, 128 ch] @ (q * ks)^T [128 ch, 8 h]      m16n8k16, A = codes
    o^T [128 c, 8 h] = Vc^T [128 c, 128 u] @ (p * vs)^T [128 u, 8 h]     A = codes, B = p

    Row r of s^T is token 16 (r % 8) + r // 8 (so a lane's 16 tokens are two adjacent
    K words per channel); the PV contraction index u is the same token order, and p^T
    gets there from s^T's accumulator layout by one movmatrix (8x8 transpose) per
    register. Row c of o^T is channel 16 (c % 8) + c // 8 (a lane's 16 channels are one
    V word per token).

Other head dims (session 6, verified on the H100 in session 7, NOTES.md attempt 27): K
takes D / 16 channel chunks. At D 256, o^T runs twice, over channels 0..127 and 128..255
(the V words 0..7 and 8..15 of each token), into two accumulators. At D 64, o^T is [64
c, 8 h] with row c channel 8 (c % 8) + c // 8: a lane's 8 channels are one V half-word
per token, loaded as int16 and unpacked by the first half of V_ASM.

Scales are folded (as ``_record_tile``): codes enter centered (c - 8, c - 2); ks into q
(per record), kz' = kz + 8 ks as a per-head constant sum_d q kz', kt on the score rows,
vs into p, vz' = vz + 2 vs as the per-head sum_t p vz', vch on the output rows.

Session 15 options (opt-in until GPU-measured; decode_attention.GLUON_RAW / _QMMA / _KALL,
NOTES.md attempts 50-53): RAW masks each code field in place and leaves it as the fp16
subnormal x * 2^-24, which the MMA multiplies exactly; the power of two per score row
(token parity) and per output row (the channel's position in its V byte) is applied to the
fp32 accumulators, and the codes enter uncentered (kz' = kz, vz' = vz), which doubles the
effect of each fp16 rounding of the B operands. QMMA (with RAW) loads q * qk_scale once
per program as fp16, forms the B fragments q * ks by HMUL2, and computes the zero terms
by MMA with A broadcast over its rows, restoring the centered rounding: sum_d q (kz + 8 ks)
- 8 sum_d B for the scores, -2 sum_t B (with vz' = vz + 2 vs) for the values. KALL
(head_dim 128) loads a record's K words in one batch before its score MMAs.

With PAIR (opt-in, session 8; off, as slower in session 9's GPU runs) the loop takes two
records per iteration: both score tiles, one joint softmax update, both value products,
so one warp holds two independent chains (for small batches, where few warps share an
SM).

The kernel covers the records of a (sequence, KV head, split) and writes a partial
(o, lse) like the Triton kernel's splits (lse -inf where a split holds no record); the
fp16 sink and tail blocks go to ``_fp16_chunk_kernel`` in chunks of keys, a partial each
(or, with ``decode_attention.GLUON_FP16_CHUNKS`` off, to the Triton kernel with records
skipped, as one more partial); a merge combines them.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


def _flat_layout(shape, reg, lane):
    """A 1-warp linear layout of the flat (row-major) index of ``shape``: reg / lane are
    lists of (dim, power) bases; a None lane basis broadcasts (lane bit ignored)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    flat = lambda b: [0] if b is None else [b[1] * strides[b[0]]]
    n = 1
    for s in shape:
        n *= s
    return gl.DistributedLinearLayout(reg_bases=[flat(b) for b in reg], lane_bases=[flat(b) for b in lane],
                                      warp_bases=[], block_bases=[], shape=[n])


# Launch defaults per head_dim: (register cap, one-warp programs resident per SM, records
# prefetched ahead into L2 by prefetch="auto"). H100 sweeps (benchmarks/NOTES.md
# attempts 26, 27). D 128: 168 registers (193 uncapped at Triton 3.6, sm_90a; no spill in
# the loop at 168) let 12 programs share an SM; one record ahead. D 64 (B64 N16K): 128
# registers, 16 programs, 0.101 ms (96: 0.108, 112: 0.103, 144: 0.114, 168: 0.114; at 128
# the offline sm_90a loop spills 9 stores per record at 3 query heads, none at 144, and
# still wins); one record ahead (none: 0.108). D 256 (two 128-channel accumulators, B16
# N16K): 255 registers, 8 programs (232: 0.174 ms, 200: 0.182, 168: 0.193 with the
# prefetch); no prefetch, 0.154 ms against 0.166 with one record ahead.
LAUNCH = {64: (128, 16, 1), 128: (168, 12, 1), 256: (255, 8, 0)}
# PAIR=True (two records per loop iteration; session 8, GPU-tested in session 9 and left
# off: slower under graph replay, NOTES.md attempt 31): (register
# cap, programs per SM). Offline sm_90a with the JIT's alignment hints
# (benchmarks/gluon_sass.py --pair): D 128 245 registers without a spill at a 255 cap
# (4,448 instructions per two records against 2 x 2,319), D 64 168 without a spill. At
# D 256 the pair spills at 255 registers, so it is not offered there.
LAUNCH_PAIR = {64: (168, 12), 128: (255, 8)}

MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
A_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
B_L = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
# K words of one 16-channel chunk, [16 c16, 16 w] flat: channel c16 = 2q + e + 8f, word w = 2g + wsel
KW_L = gl.constexpr(_flat_layout([16, 16], reg=[(1, 1), (0, 1), (0, 8)],
                                 lane=[(0, 2), (0, 4), (1, 2), (1, 4), (1, 8)]))
# all 8 chunks of a head_dim-128 record's K words at once (KALL), [8 chunk, 16 c16, 16 w]
# flat: KW_L with the chunk in three more register bits
KALL_L = gl.constexpr(_flat_layout([8, 16, 16], reg=[(2, 1), (1, 1), (1, 8), (0, 1), (0, 2), (0, 4)],
                                   lane=[(1, 2), (1, 4), (2, 2), (2, 4), (2, 8)]))
# the query heads' q of all D / 16 channel chunks, hoisted out of the record loop (QMMA),
# [D, 8 h]: B_L's bases (channel bits 0 and 3 in registers, 1 and 2 and the head in
# lanes) plus the chunk bits in registers


def _q_all_layout(d: int):
    reg = [[1, 0], [8, 0]] + [[16 << i, 0] for i in range((d // 16).bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
                                      warp_bases=[], block_bases=[], shape=[d, 8])


QALL64_L = gl.constexpr(_q_all_layout(64))
QALL128_L = gl.constexpr(_q_all_layout(128))
QALL256_L = gl.constexpr(_q_all_layout(256))
# V words of one 16-token chunk, [4 q, 2 f, 8 g, 2 e] flat: token 32q + 16e + 2k + f, word g
VW_L = gl.constexpr(_flat_layout([4, 2, 8, 2], reg=[(3, 1), (1, 1)],
                                 lane=[(0, 1), (0, 2), (2, 1), (2, 2), (2, 4)]))
# per-token / per-channel fields of the rows a lane holds, [8 g, 16 j] flat (16 g + j)
ROW_L = gl.constexpr(_flat_layout([8, 16], reg=[(1, 1), (1, 2), (1, 4), (1, 8)],
                                  lane=[None, None, (0, 1), (0, 2), (0, 4)]))
# the same for a 64-row accumulator (head_dim 64: channel 8 (r % 8) + r // 8), [8 g, 8 j] flat
ROW64_L = gl.constexpr(_flat_layout([8, 8], reg=[(1, 1), (1, 2), (1, 4)],
                                    lane=[None, None, (0, 1), (0, 2), (0, 4)]))

# one lane per element, for the L2 prefetch of a record's 32 slices
LANE_L = gl.constexpr(gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[1],
                                       order=[0]))


def prefetch_asm(record_bytes: int) -> str:
    """sm_90 bulk prefetch of a whole record (``record_bytes``, a multiple of 16) into L2."""
    if record_bytes % 16:
        raise ValueError(f"a bulk prefetch takes a multiple of 16 bytes, got {record_bytes}")
    return f"cp.async.bulk.prefetch.L2.global [$1], {record_bytes};\n\tmov.u32 $0, 0;"


# two K words (channels c, c+1; 8 tokens each) -> 8 registers, each the fp16 pair
# (c - 8 of channel c, of channel c+1) for one token: PRMT pairs byte b of both words,
# the masks take the low / high nibble, OR 0x6400 makes fp16 1024 + x (x = c or 16 c)
K_ASM = gl.constexpr("""{
.reg .b32 t<4>, ka, kb, kc;
mov.b32 ka, 0x64086408;
mov.b32 kb, 0x2C002C00;
mov.b32 kc, 0xD480D480;
prmt.b32 t0, $8, $9, 0x4400;
prmt.b32 t1, $8, $9, 0x5511;
prmt.b32 t2, $8, $9, 0x6622;
prmt.b32 t3, $8, $9, 0x7733;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $2, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $4, t2, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $5, t2, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $6, t3, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $7, t3, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 $0, $0, ka;
fma.rn.f16x2 $1, $1, kb, kc;
sub.f16x2 $2, $2, ka;
fma.rn.f16x2 $3, $3, kb, kc;
sub.f16x2 $4, $4, ka;
fma.rn.f16x2 $5, $5, kb, kc;
sub.f16x2 $6, $6, ka;
fma.rn.f16x2 $7, $7, kb, kc;
}""")

# RAW (session 15): the same fragments without the OR / subtract: masking the nibble in
# place leaves an fp16 subnormal, x * 2^-24 (x = c for even tokens, 16 c for odd ones),
# which the tensor cores multiply exactly; the per-token factor 2^24 (2^20) is applied to
# the score rows after the MMA (``_scores``) and the codes enter uncentered (kz' = kz).
# 8 instructions per word pair fewer than K_ASM.
K_ASM_RAW = gl.constexpr("""{
.reg .b32 t<4>;
prmt.b32 t0, $8, $9, 0x4400;
prmt.b32 t1, $8, $9, 0x5511;
prmt.b32 t2, $8, $9, 0x6622;
prmt.b32 t3, $8, $9, 0x7733;
and.b32 $0, t0, 0x000F000F;
and.b32 $1, t0, 0x00F000F0;
and.b32 $2, t1, 0x000F000F;
and.b32 $3, t1, 0x00F000F0;
and.b32 $4, t2, 0x000F000F;
and.b32 $5, t2, 0x00F000F0;
and.b32 $6, t3, 0x000F000F;
and.b32 $7, t3, 0x00F000F0;
}""")


def _v_unpack_asm(n_bytes: int, raw: bool = False) -> str:
    """PTX for the first n_bytes (4, or 2 at head_dim 64) bytes of two V words (tokens a,
    b; 2-bit codes) -> 4 n_bytes registers, each the fp16 pair (c - 2 of token a, of
    token b) for channel 4 * byte + position: PRMT pairs byte k of both words, the masks
    take one 2-bit field (x = c * 4^position), OR 0x6400 makes fp16 1024 + x, and one
    FMA scales by 4^-position and subtracts 1024 / 4^position + 2. raw: the masked field
    alone, the fp16 subnormal x * 2^-24 (``_values`` applies 2^24 / 4^position per
    channel row after the MMA; codes uncentered)."""
    n = 4 * n_bytes
    sel = ("0x4400", "0x5511", "0x6622", "0x7733")
    masks = ("0x00030003", "0x000C000C", "0x00300030", "0x00C000C0")
    if raw:
        lines = ["{", f".reg .b32 t<{n_bytes}>;"]
        lines += [f"prmt.b32 t{k}, ${n}, ${n + 1}, {sel[k]};" for k in range(n_bytes)]
        lines += [f"and.b32 ${4 * k + j}, t{k}, {masks[j]};" for k in range(n_bytes) for j in range(4)]
        return "\n".join(lines + ["}"])
    lines = ["{", f".reg .b32 t<{n_bytes}>, s1, s4, s16, s64, c4, c16, c64, mg;",
             "mov.b32 mg, 0x64006400;", "mov.b32 s1, 0x64026402;", "mov.b32 s4, 0x34003400;",
             "mov.b32 s16, 0x2C002C00;", "mov.b32 s64, 0x24002400;", "mov.b32 c4, 0xDC08DC08;",
             "mov.b32 c16, 0xD420D420;", "mov.b32 c64, 0xCC80CC80;"]
    lines += [f"prmt.b32 t{k}, ${n}, ${n + 1}, {sel[k]};" for k in range(n_bytes)]
    lines += [f"lop3.b32 ${4 * k + j}, t{k}, {masks[j]}, mg, 0xEA;" for k in range(n_bytes) for j in range(4)]
    for k in range(n_bytes):
        r = 4 * k
        lines += [f"sub.f16x2 ${r}, ${r}, s1;", f"fma.rn.f16x2 ${r + 1}, ${r + 1}, s4, c4;",
                  f"fma.rn.f16x2 ${r + 2}, ${r + 2}, s16, c16;", f"fma.rn.f16x2 ${r + 3}, ${r + 3}, s64, c64;"]
    return "\n".join(lines + ["}"])


# two V words (tokens a, b; 16 channels each) -> 16 registers; head_dim 64: two V
# half-words (8 channels each) -> 8 registers
V_ASM = gl.constexpr(_v_unpack_asm(4))
V64_ASM = gl.constexpr(_v_unpack_asm(2))
V_ASM_RAW = gl.constexpr(_v_unpack_asm(4, raw=True))
V64_ASM_RAW = gl.constexpr(_v_unpack_asm(2, raw=True))
# the RAW row factors: 2^24 for even tokens (low nibble), 2^20 for odd ones; V channel
# position j in its byte (channel % 4): 2^24 / 4^j
RAW_K_EVEN = gl.constexpr(16777216.0)
RAW_K_ODD = gl.constexpr(1048576.0)


@gluon.jit
def _j2(a, b):
    return gl.join(a, b)


@gluon.jit
def _pair_to_f16(p):
    """int32 [..] holding fp16 pairs -> fp16 [.., 2] (no instruction: a register view)."""
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p],
                                       dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
    return gl.join(lo, hi)


@gluon.jit
def _f16_to_pair(x):
    """fp16 [.., 2] -> int32 [..] (the pair in one register)."""
    lo, hi = gl.split(x)
    return gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _rows(ptr, idx, N: gl.constexpr = 128):
    """fp16 fields at ptr[idx(r)] for the N rows of an mma accumulator (row r is
    token / channel (N / 8) (r % 8) + r // 8), fp32 in SliceLayout(1, MMA)."""
    x = gl.load(ptr + idx).to(gl.float32)                      # [8 g * (N/8) j] flat, (N/8) g + j
    x = gl.reshape(gl.permute(gl.reshape(x, [8, N // 8]), [1, 0]), [N])
    return gl.convert_layout(x, gl.SliceLayout(1, MMA), assert_trivial=True)


@gluon.jit
def _k_chunk(kw_ptr, kidx, RAW: gl.constexpr = False):
    """Codes of channels 16k .. 16k+15 of a record as the [128 r, 16] A fragment
    (RAW: the uncentered codes as subnormals, times 2^-24 / 2^-20 by token parity)."""
    return _k_frag(gl.load(kw_ptr + kidx), RAW)                # [16 c16 * 16 w] flat


@gluon.jit
def _k_pick(kw_all, K: gl.constexpr):
    """Chunk K's 256 words (KW_L) of a record's K words loaded at once ([8 chunk * 256]
    flat, KALL_L; head_dim 128): no data moves, the chunk bits are registers."""
    x = gl.permute(gl.reshape(kw_all, [2, 2, 2, 256]), [3, 0, 1, 2])   # [w, b2, b1, b0]
    x0, x1 = gl.split(x)
    x = x1 if (K % 2) == 1 else x0
    x0, x1 = gl.split(x)
    x = x1 if ((K // 2) % 2) == 1 else x0
    x0, x1 = gl.split(x)
    x = x1 if (K // 4) == 1 else x0
    return gl.convert_layout(x, KW_L, assert_trivial=True)


@gluon.jit
def _k_frag(wk, RAW: gl.constexpr = False):
    """[256] K words of one 16-channel chunk (KW_L) -> the [128 r, 16] A fragment."""
    wk = gl.permute(gl.reshape(wk, [8, 2, 16]), [0, 2, 1])     # [cp, w, e]  (c16 = 2 cp + e)
    wa, wb = gl.split(wk)
    o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
        K_ASM_RAW if RAW else K_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wa, wb], dtype=(gl.int32,) * 8,
        is_pure=True, pack=1)
    a = _j2(_j2(_j2(o0, o1), _j2(o2, o3)), _j2(_j2(o4, o5), _j2(o6, o7)))   # [cp, w, n0, n1, n2]
    a = gl.reshape(gl.permute(a, [0, 1, 4, 3, 2]), [8, 8, 16])  # [cp, g, j]  (token 8 w + n = 16 g + j)
    a = gl.reshape(gl.permute(a, [2, 1, 0]), [128, 8])          # [r = 8 j + g, cp]
    a = gl.reshape(_pair_to_f16(a), [128, 16])                  # [r, c16]
    return gl.convert_layout(a, A_L, assert_trivial=True)


@gluon.jit
def _v_chunk(vw_ptr, vidx, RAW: gl.constexpr = False):
    """Codes of the 16 tokens of chunk k (u = 16k + 2q + e + 8f) as the [128 c, 16] A fragment."""
    wv = gl.reshape(gl.load(vw_ptr + vidx), [4, 2, 8, 2])      # [q, f, g, e]
    wa, wb = gl.split(wv)
    o = gl.inline_asm_elementwise(
        V_ASM_RAW if RAW else V_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wa, wb],
        dtype=(gl.int32,) * 16, is_pure=True, pack=1)
    a = _j2(_j2(_j2(_j2(o[0], o[1]), _j2(o[2], o[3])), _j2(_j2(o[4], o[5]), _j2(o[6], o[7]))),
            _j2(_j2(_j2(o[8], o[9]), _j2(o[10], o[11])), _j2(_j2(o[12], o[13]), _j2(o[14], o[15]))))
    # a [q, f, g, j0, j1, j2, j3]: channel 16 g + j, j = j0 + 2 j1 + 4 j2 + 8 j3
    a = gl.reshape(gl.permute(a, [6, 5, 4, 3, 2, 1, 0]), [128, 8])   # [c = 8 j + g, up = 4 f + q]
    a = gl.reshape(_pair_to_f16(a), [128, 16])                  # [c, u16 = 2 up + e]
    return gl.convert_layout(a, A_L, assert_trivial=True)


@gluon.jit
def _v_chunk64(vw_ptr, vidx, RAW: gl.constexpr = False):
    """head_dim 64: the codes of the 16 tokens of chunk k as the [64 c, 16] A fragment
    (vw_ptr int16: a token's 8 half-words; row c is channel 8 (c % 8) + c // 8)."""
    wv = gl.reshape(gl.load(vw_ptr + vidx).to(gl.int32), [4, 2, 8, 2])   # [q, f, g, e]
    wa, wb = gl.split(wv)
    o = gl.inline_asm_elementwise(
        V64_ASM_RAW if RAW else V64_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wa, wb], dtype=(gl.int32,) * 8,
        is_pure=True, pack=1)
    a = _j2(_j2(_j2(o[0], o[1]), _j2(o[2], o[3])), _j2(_j2(o[4], o[5]), _j2(o[6], o[7])))
    # a [q, f, g, j0, j1, j2]: channel 8 g + j, j = j0 + 2 j1 + 4 j2
    a = gl.reshape(gl.permute(a, [5, 4, 3, 2, 1, 0]), [64, 8])   # [c = 8 j + g, up = 4 f + q]
    a = gl.reshape(_pair_to_f16(a), [64, 16])                   # [c, u16 = 2 up + e]
    return gl.convert_layout(a, A_L, assert_trivial=True)


@gluon.jit
def _p_chunk(t, K: gl.constexpr):
    """Chunk K (tokens u = 16K + [0, 16)) of the transposed p: B fragment [16, 8]."""
    # t [128, 4] int32 after movmatrix: t[g + 8 j, q] = pair (u = 8 j + 2 q + e, head g)
    x = gl.reshape(t, [8, 2, 8, 4])                             # [k, f, g, q]  (j = 2k + f)
    x = gl.permute(x, [1, 3, 2, 0])                             # [f, q, g, k]
    x = gl.reshape(x, [2, 4, 8, 2, 2, 2])                       # k = 4 k2 + 2 k1 + k0
    x0, x1 = gl.split(x)
    x = x1 if (K % 2) == 1 else x0
    x0, x1 = gl.split(x)
    x = x1 if ((K // 2) % 2) == 1 else x0
    x0, x1 = gl.split(x)
    x = x1 if (K // 4) == 1 else x0                             # [f, q, g]
    x = gl.reshape(x, [8, 8])                                   # [up = 4 f + q, h = g]
    x = gl.permute(_pair_to_f16(x), [0, 2, 1])                  # [up, e, h]
    return gl.convert_layout(gl.reshape(x, [16, 8]), B_L, assert_trivial=True)


@gluon.jit
def _q_chunk(q_ptr, stride_qh, K: gl.constexpr, ks_ptr, kz_ptr, QH, qk_scale, RAW: gl.constexpr = False):
    """(q * ks) of channels 16K .. 16K+15 as the B fragment, and sum_d q kz' over them
    (kz' = kz + 8 ks for centered codes, kz for RAW's uncentered ones)."""
    c = 16 * K + gl.arange(0, 16, layout=gl.SliceLayout(1, B_L))
    h = gl.arange(0, 8, layout=gl.SliceLayout(0, B_L))
    q = gl.load(q_ptr + h[None, :] * stride_qh + c[:, None], mask=(h < QH)[None, :], other=0.0)
    qf = q.to(gl.float32) * qk_scale
    ks = gl.load(ks_ptr + c).to(gl.float32)
    kz = gl.load(kz_ptr + c).to(gl.float32)
    if not RAW:
        kz = kz + 8.0 * ks
    return (qf * ks[:, None]).to(gl.float16), qf * kz[:, None]


@gluon.jit
def _q_all(q_base, stride_qh, QH, qk_scale, D: gl.constexpr):
    """q * qk_scale of the program's query heads as fp16 [D, 8] (QALL layout; heads >= QH
    zero), loaded once per program (QMMA)."""
    if D == 64:
        L: gl.constexpr = QALL64_L
    elif D == 128:
        L: gl.constexpr = QALL128_L
    else:
        L: gl.constexpr = QALL256_L
    c = gl.arange(0, D, layout=gl.SliceLayout(1, L))
    h = gl.arange(0, 8, layout=gl.SliceLayout(0, L))
    q = gl.load(q_base + h[None, :] * stride_qh + c[:, None], mask=(h < QH)[None, :], other=0.0)
    return (q.to(gl.float32) * qk_scale).to(gl.float16)


@gluon.jit
def _q_pick(q_all, K: gl.constexpr, D: gl.constexpr):
    """Chunk K (channels 16K .. 16K+15) of the hoisted q as a [16, 8] B fragment: the
    chunk bits are registers, so no data moves."""
    if D == 64:
        x = gl.permute(gl.reshape(q_all, [2, 2, 16, 8]), [2, 3, 0, 1])          # [k, h, b1, b0]
    elif D == 128:
        x = gl.permute(gl.reshape(q_all, [2, 2, 2, 16, 8]), [3, 4, 0, 1, 2])    # [k, h, b2, b1, b0]
    else:
        x = gl.permute(gl.reshape(q_all, [2, 2, 2, 2, 16, 8]), [4, 5, 0, 1, 2, 3])
    x0, x1 = gl.split(x)
    x = x1 if (K % 2) == 1 else x0
    x0, x1 = gl.split(x)
    x = x1 if ((K // 2) % 2) == 1 else x0
    if D >= 128:
        x0, x1 = gl.split(x)
        x = x1 if ((K // 4) % 2) == 1 else x0
    if D == 256:
        x0, x1 = gl.split(x)
        x = x1 if (K // 8) == 1 else x0
    return gl.convert_layout(x, B_L, assert_trivial=True)


@gluon.jit
def _grid_dependency_sync():
    """decode_attention._grid_dependency_sync in Gluon (programmatic dependent launch):
    griddepcontrol.wait, then launch_dependents, once per lane, before any load."""
    lane = gl.arange(0, 32, layout=LANE_L)
    gl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; // $0 $1", "=r,r",
                              [lane], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _prefetch_record_l2(rec, PF_ASM: gl.constexpr):
    """Ask L2 for a whole record (one bulk prefetch with the same address in every lane, so
    ptxas issues it once; no registers held): the record AHEAD iterations on, so that
    its loads hit L2."""
    lane = gl.arange(0, 32, layout=LANE_L)
    gl.inline_asm_elementwise(PF_ASM, "=r,l", [rec + lane * 0], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _v_half(vw_ptr, vidx, t, D: gl.constexpr, RAW: gl.constexpr = False):
    """o^T over one record for the 128 channels (64 at head_dim 64) that vidx addresses:
    Vc^T @ (p vs)^T in 8 chunks of 16 tokens."""
    o = gl.zeros([128 if D >= 128 else 64, 8], gl.float32, layout=MMA)
    for k in gl.static_range(8):
        # chunk k's tokens are vidx's + 2k: 2k tokens of D / 16 words (8 half-words at D 64)
        if D == 64:
            o = mma_v2(_v_chunk64(vw_ptr + 2 * 8 * k, vidx, RAW), _p_chunk(t, k), o)
        else:
            o = mma_v2(_v_chunk(vw_ptr + 2 * (D // 16) * k, vidx, RAW), _p_chunk(t, k), o)
    return o


@gluon.jit
def _store_partial(po_ptr, part, acc, l_safe, live, dead, C0: gl.constexpr, D: gl.constexpr):
    """Rows of acc / l to po[part, C0 + channel(row)] (zeros where the split is empty)."""
    N: gl.constexpr = 128 if D >= 128 else 64
    cc = gl.arange(0, N, layout=gl.SliceLayout(1, MMA))
    ch = C0 + (cc % 8) * (N // 8) + cc // 8
    gl.store(po_ptr + part[None, :] * D + ch[:, None], acc / l_safe[None, :], mask=live[None, :])
    gl.store(po_ptr + part[None, :] * D + ch[:, None], gl.zeros([N, 8], gl.float32, layout=MMA),
             mask=dead[None, :])


@gluon.jit
def _scores(rec, q_base, stride_qh, kidx, rflat, QH, qk_scale, D: gl.constexpr,
            OFF_KC: gl.constexpr, OFF_KS: gl.constexpr, OFF_KZ: gl.constexpr, OFF_KT: gl.constexpr,
            kf, RAW: gl.constexpr = False, KALL: gl.constexpr = False, kall_idx=None,
            QMMA: gl.constexpr = False, q_all=None):
    """s^T [128 r, 8 h] of one record (log2 units): Kc @ (q ks)^T in D / 16 chunks of 16
    channels (RAW: times the row factors kf [128 r], undoing the subnormal scaling), plus
    the per-head sum_d q kz', times k_tok per row."""
    rec16 = rec.to(gl.pointer_type(gl.float16))
    kw_ptr = (rec + OFF_KC).to(gl.pointer_type(gl.int32))
    s = gl.zeros([128, 8], gl.float32, layout=MMA)
    zq = gl.zeros([16, 8], gl.float32, layout=B_L)
    z = gl.zeros([16, 8], gl.float32, layout=MMA)
    zero_a = gl.zeros([16, 16], gl.float16, layout=A_L)
    if KALL:
        kw_all = gl.load(kw_ptr + kall_idx)                      # every K word, one batch of loads
    for k in gl.static_range(D // 16):
        if QMMA:
            # q hoisted (fp16, scaled): the B fragment is q * ks in fp16. The per-head
            # zero term by two more MMAs into z, whose 16 rows are equal: A = kz + 8 ks
            # (fp16) broadcast over the rows times q, and A = -8 times the B fragment
            # itself. So the sum is (c - 8) B + q (kz + 8 ks), the centered codes'
            # rounding (uncentered, each fp16 rounding of B is multiplied by c, about
            # twice the error: NOTES.md attempt 53, benchmarks/raw_numerics.py)
            gl.static_assert(RAW, "QMMA takes the uncentered (RAW) codes")
            qc = _q_pick(q_all, k, D)
            ks = gl.load(rec16 + OFF_KS // 2 + 16 * k + gl.arange(0, 16, layout=gl.SliceLayout(1, B_L)))
            qk = qc * ks[:, None]
            ca = 16 * k + gl.arange(0, 16, layout=gl.SliceLayout(0, A_L))
            kzc = gl.load(rec16 + OFF_KZ // 2 + ca) + 8.0 * gl.load(rec16 + OFF_KS // 2 + ca)
            kz_a, _ = gl.broadcast(kzc[None, :], zero_a)
            z = mma_v2(kz_a, qc, z)
            z = mma_v2(gl.full([16, 16], -8.0, gl.float16, layout=A_L), qk, z)
        else:
            qk, zk = _q_chunk(q_base, stride_qh, k, rec16 + OFF_KS // 2, rec16 + OFF_KZ // 2, QH, qk_scale, RAW)
            zq = zq + zk
        if KALL:
            s = mma_v2(_k_frag(_k_pick(kw_all, k), RAW), qk, s)
        else:
            s = mma_v2(_k_chunk(kw_ptr + k * 256, kidx, RAW), qk, s)
    if QMMA:
        zqh = gl.max(z, axis=0)                                  # the 16 rows are equal
    else:
        zqh = gl.convert_layout(gl.sum(zq, axis=0), gl.SliceLayout(0, MMA))
    kt = _rows(rec16 + OFF_KT // 2, rflat)
    if RAW:
        s = s * kf[:, None]
    return (s + zqh[None, :]) * kt[:, None]


@gluon.jit
def _values(rec, p, vidx, rflat, cflat, D: gl.constexpr, OFF_VC: gl.constexpr, OFF_VCH: gl.constexpr,
            OFF_VS: gl.constexpr, OFF_VZ: gl.constexpr, vf, RAW: gl.constexpr = False,
            QMMA: gl.constexpr = False):
    """One record's (o^T + sum_t p vz') * v_chan for probabilities p [128 r, 8 h]: the
    channels 0..127 (0..63 at D 64), and at D 256 also channels 128..255 (else zeros).
    RAW: o^T times the channel-row factors vf [VN], and vz' = vz (uncentered codes);
    with QMMA the centering is restored as in ``_scores``: minus 2 sum_t B by MMA, and
    vz' = vz + 2 vs."""
    VN: gl.constexpr = 128 if D >= 128 else 64
    rec16 = rec.to(gl.pointer_type(gl.float16))
    vs = _rows(rec16 + OFF_VS // 2, rflat)
    vz = _rows(rec16 + OFF_VZ // 2, rflat)
    if QMMA or not RAW:
        vz = vz + 2.0 * vs
    zv = gl.sum(p * vz[:, None], axis=0)
    pv = (p * vs[:, None]).to(gl.float16)                       # [128 r, 8 h]
    pp = _f16_to_pair(gl.reshape(pv, [128, 4, 2]))              # [128 r, 4 hp]
    t = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [pp],
                                  dtype=gl.int32, is_pure=True, pack=1)
    if QMMA:
        w = gl.zeros([16, 8], gl.float32, layout=MMA)
        for k in gl.static_range(8):
            w = mma_v2(gl.full([16, 16], -2.0, gl.float16, layout=A_L), _p_chunk(t, k), w)
        zv = zv + gl.max(w, axis=0)                              # the 16 rows are equal
    if D == 64:
        vw_ptr = (rec + OFF_VC).to(gl.pointer_type(gl.int16))
    else:
        vw_ptr = (rec + OFF_VC).to(gl.pointer_type(gl.int32))
    o = _v_half(vw_ptr, vidx, t, D, RAW)
    if RAW:
        o = o * vf[:, None]
    vch = _rows(rec16 + OFF_VCH // 2, cflat, VN)
    c1 = (o + zv[None, :]) * vch[:, None]
    if D == 256:
        o2 = _v_half(vw_ptr + 8, vidx, t, D, RAW)
        if RAW:
            o2 = o2 * vf[:, None]
        vch2 = _rows(rec16 + OFF_VCH // 2 + 128, cflat, VN)
        c2 = (o2 + zv[None, :]) * vch2[:, None]
    else:
        c2 = gl.zeros([VN, 8], gl.float32, layout=MMA)
    return c1, c2


@gluon.jit
def record_attention_kernel(q_ptr, rec_ptr, bt_ptr, ctx_ptr, po_ptr, plse_ptr, qk_scale,
                            stride_qb, stride_qh, stride_rb, stride_rh, stride_bt,
                            HKV, HQ, num_splits, part_stride,
                            QH: gl.constexpr, G: gl.constexpr, D: gl.constexpr, AHEAD: gl.constexpr,
                            PF_ASM: gl.constexpr,
                            OFF_KC: gl.constexpr, OFF_KS: gl.constexpr, OFF_KZ: gl.constexpr,
                            OFF_KT: gl.constexpr, OFF_VC: gl.constexpr, OFF_VCH: gl.constexpr,
                            OFF_VS: gl.constexpr, OFF_VZ: gl.constexpr, PAIR: gl.constexpr = False,
                            PDL: gl.constexpr = False, RAW: gl.constexpr = False,
                            KALL: gl.constexpr = False, QMMA: gl.constexpr = False):
    # D 64: one 64-row V accumulator (half-word V loads); 128: one 128-row; 256: two
    # 128-row halves (channels 0..127, 128..255), each the head_dim-128 V path
    VN: gl.constexpr = 128 if D >= 128 else 64
    if PDL:     # launched with programmatic dependent launch (decode_attention.PDL)
        _grid_dependency_sync()
    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    n_ctx = gl.load(ctx_ptr + b)
    n_rec = gl.maximum((n_ctx - 1) // G - 1, 0)
    rps = gl.cdiv(n_rec, num_splits)
    r0 = 1 + split * rps
    r1 = gl.minimum(r0 + rps, n_rec + 1)

    q_base = q_ptr + b.to(gl.int64) * stride_qb + (kvh * QH).to(gl.int64) * stride_qh
    rec_head = rec_ptr + kvh.to(gl.int64) * stride_rh
    bt = bt_ptr + b.to(gl.int64) * stride_bt

    # loop-invariant index tensors
    kidx = gl.arange(0, 256, layout=KW_L)                      # [c16, w]: word c16 * 16 + w of the chunk
    if KALL:
        kall_idx = gl.arange(0, 2048, layout=KALL_L)           # [chunk, c16, w] (D 128)
    else:
        kall_idx = kidx
    if QMMA:
        q_all = _q_all(q_base, stride_qh, QH, qk_scale, D)
    else:
        q_all = kidx
    vflat = gl.arange(0, 128, layout=VW_L)                     # [q, f, g, e]
    vq = vflat // 32
    vf = (vflat // 16) % 2
    vg = (vflat // 2) % 8
    ve = vflat % 2
    vtok = 32 * vq + 16 * ve + vf                              # + 2k per chunk
    # word (half-word at D 64) g of the token's first 8: D / 16 words per token
    vidx = vtok * (8 if D == 64 else D // 16) + vg
    rflat = gl.arange(0, 128, layout=ROW_L)                    # 16 g + j
    if D == 64:
        cflat = gl.arange(0, 64, layout=ROW64_L)               # 8 g + j
    else:
        cflat = rflat

    # RAW's row factors: score row r is token 16 (r % 8) + r // 8 (odd tokens' codes sit
    # 4 bits up); o^T row c is a channel with c // 8 = channel (mod 8 at D 64, mod 16
    # else), whose position in its V byte is (c // 8) % 4
    r_s = gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))
    kf = gl.where((r_s // 8) % 2 == 0, RAW_K_EVEN, RAW_K_ODD)
    c_v = gl.arange(0, VN, layout=gl.SliceLayout(1, MMA))
    vf = gl.exp2(24.0 - 2.0 * ((c_v // 8) % 4).to(gl.float32))
    hh = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    m = gl.full([8], -1.0e30, gl.float32, layout=gl.SliceLayout(0, MMA))
    l = gl.zeros([8], gl.float32, layout=gl.SliceLayout(0, MMA))
    acc = gl.zeros([VN, 8], gl.float32, layout=MMA)
    acc2 = gl.zeros([VN, 8], gl.float32, layout=MMA)          # D 256: channels 128..255

    for k in gl.static_range(AHEAD):
        nxt = gl.load(bt + gl.minimum(r0 + k, r1 - 1), mask=r0 < r1, other=0).to(gl.int64)
        _prefetch_record_l2(rec_head + nxt * stride_rb, PF_ASM)
    if PAIR:
        # two records per iteration, two independent chains for the scheduler to overlap
        # (for launches with few programs per SM, which can afford the registers); the
        # second record of an odd tail is the first again with its scores at -inf
        for i in range(r0, r1, 2):
            blk = gl.load(bt + i).to(gl.int64)
            ok2 = i + 1 < r1
            blk2 = gl.load(bt + gl.minimum(i + 1, r1 - 1)).to(gl.int64)
            rec = rec_head + blk * stride_rb
            rec2 = rec_head + blk2 * stride_rb
            s = _scores(rec, q_base, stride_qh, kidx, rflat, QH, qk_scale, D, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                        kf, RAW, KALL, kall_idx, QMMA, q_all)
            s2 = _scores(rec2, q_base, stride_qh, kidx, rflat, QH, qk_scale, D, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                        kf, RAW, KALL, kall_idx, QMMA, q_all)
            s2 = s2 + gl.where(ok2, 0.0, float("-inf"))
            m_new = gl.maximum(m, gl.maximum(gl.max(s, axis=0), gl.max(s2, axis=0)))
            alpha = gl.exp2(m - m_new)
            p = gl.exp2(s - m_new[None, :])
            p2 = gl.exp2(s2 - m_new[None, :])
            l = l * alpha + gl.sum(p, axis=0) + gl.sum(p2, axis=0)
            m = m_new
            c1, c2 = _values(rec, p, vidx, rflat, cflat, D, OFF_VC, OFF_VCH, OFF_VS, OFF_VZ, vf, RAW, QMMA)
            d1, d2 = _values(rec2, p2, vidx, rflat, cflat, D, OFF_VC, OFF_VCH, OFF_VS, OFF_VZ, vf, RAW, QMMA)
            acc = acc * alpha[None, :] + (c1 + d1)
            if D == 256:
                acc2 = acc2 * alpha[None, :] + (c2 + d2)
    else:
        for i in range(r0, r1):
            blk = gl.load(bt + i).to(gl.int64)
            if AHEAD > 0:
                nxt = gl.load(bt + gl.minimum(i + AHEAD, r1 - 1)).to(gl.int64)
                _prefetch_record_l2(rec_head + nxt * stride_rb, PF_ASM)
            rec = rec_head + blk * stride_rb
            s = _scores(rec, q_base, stride_qh, kidx, rflat, QH, qk_scale, D, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                        kf, RAW, KALL, kall_idx, QMMA, q_all)
            # ---- online softmax (per warp: no cross-warp step)
            m_new = gl.maximum(m, gl.max(s, axis=0))
            alpha = gl.exp2(m - m_new)
            p = gl.exp2(s - m_new[None, :])
            l = l * alpha + gl.sum(p, axis=0)
            m = m_new
            c1, c2 = _values(rec, p, vidx, rflat, cflat, D, OFF_VC, OFF_VCH, OFF_VS, OFF_VZ, vf, RAW, QMMA)
            acc = acc * alpha[None, :] + c1
            if D == 256:
                acc2 = acc2 * alpha[None, :] + c2

    # partial (acc / l, m + log2 l) per head
    l_safe = gl.where(l > 0, l, 1.0)
    head = kvh * QH + hh
    part = (b * HQ + head) * part_stride + split
    live = (hh < QH) & (r0 < r1)
    dead = (hh < QH) & (r0 >= r1)
    _store_partial(po_ptr, part, acc, l_safe, live, dead, 0, D)
    if D == 256:
        _store_partial(po_ptr, part, acc2, l_safe, live, dead, 128, D)
    lse = gl.where(r0 < r1, m + gl.log2(l_safe), float("-inf"))
    gl.store(plse_ptr + part, lse, mask=hh < QH)
