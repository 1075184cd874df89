"""The store kernel: fp16 tiles (rotated frame) -> KVarN records, in one launch.

    store_tiles(kv_fp16_all, src_blocks, records_all, dst_blocks, cfg)
        kv_fp16_all  fp16  [L, 2, nfp, Hkv, G, D]   (layout: kvarn/kernels/reference.py)
        records_all  uint8 [L, nrec, Hkv, RB]
        src_blocks / dst_blocks  int [M]: fp16 block src[i] -> record slot dst[i],
        every layer and KV head at once.
    quantize_blocks_triton(k, v, cfg, rotate) -> uint8 [n, H, RB]
        dense k, v [n, G, H, D] fp16; rotate=True rotates first (the prefill export path,
        same records as kvarn.quant.quantize_blocks).

Semantics are those of ``ref_store_tiles`` / ``quantize_rotated_blocks`` (the steps of
KVARN_FORMAT.md: variance-normalize, round rows, absorb, pack). Records agree byte for
byte except where fp32 summation order, the scale update done as a product instead of
log/exp, or MUFU sqrt/rsqrt rounding moves a value across a rounding boundary: a code
one step off, an fp16 scale one ulp off, or, when two iterations' imbalance scores tie
to rounding, a tile that keeps the other iteration's (equally good) scales. Measured on
an H100, 8B shape, first 4 layers: 459 of 66.6M K codes and 8 of 66.6M V codes differ,
about 1e-4 of the fp16 scales (benchmarks/results/kernels_h100.json);
tests/kernels/test_store.py bounds the counts.

Tiling: one program per (tile, K or V), the whole tile in registers:

    grid = (M * Hkv, L, 2)          axis 2: 0 = K tile, 1 = V tile
    x = fp16 block tile [G, D] (token-major, as the cache holds it), fp32 in registers

                 K: M = x^T [D, G]                 V: M = x [G, D]
    x axis 0     tokens = columns of M (s_col)     tokens = rows of M (s_row, step, lo)
    x axis 1     channels = rows (s_row, step, lo) channels = columns (s_col)

    RA = the x axis that indexes rows of M (K: 1, V: 0); column stds reduce over RA,
    row stds over the other axis. A step never materializes M / s_col / s_row: the
    std of column j of cur = x * rc[j] * rr[i] is rc[j] * std_i(x[i, j] * rr[i]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvarn.format import KVarNConfig
from kvarn.quant.normalize import IMBALANCE_EPS, STD_CLAMP
from kvarn.quant.rtn import STEP_MIN


def _exp_f32(a: float) -> float:
    """e^a of the fp32 a, as torch computes the reference's clip bound (fp32 in, fp32 out)."""
    return float(torch.tensor(a, dtype=torch.float32).exp())


@triton.jit
def _var(x, r, AXIS: tl.constexpr, N: tl.constexpr):
    """Sample variance (n-1) along AXIS of y = x * r (r broadcast over AXIS): the mean
    first, then squared deviations (two passes, as accurate as torch's std)."""
    mean = tl.sum(x * r, axis=AXIS) * (1.0 / N)
    d = x * r - tl.expand_dims(mean, AXIS)
    return tl.sum(d * d, axis=AXIS) * (1.0 / (N - 1))


@triton.jit
def _recip(s):
    """1/s for s in [e^-0.3, e^10]: rsqrt(s^2), one MUFU op instead of a division."""
    return tl.rsqrt(s * s)


@triton.jit
def _imbalance(cstd, rstd, EPS: tl.constexpr):
    return (tl.max(cstd, axis=0) / tl.maximum(tl.min(cstd, axis=0), EPS)
            + tl.max(rstd, axis=0) / tl.maximum(tl.min(rstd, axis=0), EPS))


@triton.jit
def _quantize_tile(x, rec, RA: tl.constexpr, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                   OFF_CODES: tl.constexpr, OFF_ROWSCALE: tl.constexpr, OFF_ROWZERO: tl.constexpr,
                   OFF_COL: tl.constexpr, ITERS: tl.constexpr, E_LO: tl.constexpr,
                   E_HI: tl.constexpr, STD_LO: tl.constexpr, STD_HI: tl.constexpr,
                   EPS: tl.constexpr, STEP_EPS: tl.constexpr):
    """x [G, D] fp32 -> one half (K or V) of a record at byte pointer rec.

    M = x^T (RA = 1) or x (RA = 0) is [R, C]. Vectors over rows of M live along x axis
    RA (reduce over CA), vectors over columns along the other axis. The reference's
    log-domain update a <- clip(a + ln clip(std), lo, hi) is tracked as the scale
    itself, e^a <- clip(e^a * clip(std), e^lo, e^hi): the same numbers up to rounding,
    with no log/exp per step. Column stds of cur = x * rc * rr are rc * std(x * rr)
    (and rows alike), so the tile itself is never rescaled.
    """
    CA: tl.constexpr = 1 - RA
    # --- variance normalization (kvarn/quant/normalize.py) ------------------------
    s_col = tl.sum(x, axis=RA) * 0.0 + 1.0           # e^a, over C
    s_row = tl.sum(x, axis=CA) * 0.0 + 1.0           # e^b, over R
    rc = s_col                                       # 1 / e^a
    rr = s_row                                       # 1 / e^b
    cstd = tl.sqrt(_var(x, tl.expand_dims(rr, CA), RA, R))
    s_rows = tl.sqrt(_var(x, tl.expand_dims(rc, RA), CA, C))
    best = _imbalance(cstd, s_rows, EPS)
    best_col = s_col
    best_row = s_row
    for _ in range(ITERS):
        s_col = tl.minimum(tl.maximum(s_col * tl.minimum(tl.maximum(cstd, STD_LO), STD_HI), E_LO), E_HI)
        rc = _recip(s_col)
        s_rows = tl.sqrt(_var(x, tl.expand_dims(rc, RA), CA, C))      # row stds of x * rc
        s_row = tl.minimum(tl.maximum(s_row * tl.minimum(tl.maximum(rr * s_rows, STD_LO), STD_HI),
                                      E_LO), E_HI)
        rr = _recip(s_row)
        cstd = rc * tl.sqrt(_var(x, tl.expand_dims(rr, CA), RA, R))
        score = _imbalance(cstd, rr * s_rows, EPS)
        better = score <= best
        best = tl.where(better, score, best)
        best_col = tl.where(better, s_col, best_col)
        best_row = tl.where(better, s_row, best_row)
    # --- round each row of B = M / s_col / s_row (kvarn/quant/rtn.py) ---------------
    one_c = tl.full(best_col.shape, 1.0, tl.float32)
    one_r = tl.full(best_row.shape, 1.0, tl.float32)
    bal = x * tl.expand_dims(tl.div_rn(one_c, best_col), RA) * tl.expand_dims(tl.div_rn(one_r, best_row), CA)
    lo = tl.min(bal, axis=CA)
    hi = tl.max(bal, axis=CA)
    QMAX: tl.constexpr = (1 << BITS) - 1
    step = tl.maximum(tl.div_rn(hi - lo, one_r * QMAX), STEP_EPS)
    y = (bal - tl.expand_dims(lo, CA)) * tl.expand_dims(tl.div_rn(one_r, step), CA)
    # y + 1.5 * 2^23 rounds y (0 <= y < 2^22) half to even, as torch.round, and leaves
    # the integer in the low mantissa bits.
    codes = ((y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int32)
    codes = tl.minimum(codes, QMAX)
    # --- absorb and write the fields --------------------------------------------
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, C)
    tl.store((rec + OFF_ROWSCALE).to(tl.pointer_type(tl.float16)) + offs_r, (step * best_row).to(tl.float16))
    tl.store((rec + OFF_ROWZERO).to(tl.pointer_type(tl.float16)) + offs_r, (lo * best_row).to(tl.float16))
    tl.store((rec + OFF_COL).to(tl.pointer_type(tl.float16)) + offs_c, best_col.to(tl.float16))
    # code rows of M, packed along C: lowest index in the lowest bits
    PER: tl.constexpr = 8 // BITS
    if RA == 1:
        codes = tl.trans(codes)                      # [R, C] = [D, G]
    packed = tl.sum(tl.reshape(codes, (R, C // PER, PER))
                    << (tl.arange(0, PER) * BITS)[None, None, :], axis=2)
    offs_j = tl.arange(0, C // PER)
    tl.store(rec + OFF_CODES + offs_r[:, None] * (C // PER) + offs_j[None, :], packed.to(tl.uint8))


@triton.jit
def _store_kernel(k_ptr, v_ptr, src_ptr, rec_ptr, dst_ptr,
                  stride_xl, stride_xb, stride_xh, stride_xt,
                  stride_rl, stride_rb, stride_rh,
                  HKV,
                  G: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                  OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KZ: tl.constexpr,
                  OFF_KT: tl.constexpr, OFF_VC: tl.constexpr, OFF_VCH: tl.constexpr,
                  OFF_VS: tl.constexpr, OFF_VZ: tl.constexpr, OFF_END: tl.constexpr,
                  RB: tl.constexpr, ITERS: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr,
                  STD_LO: tl.constexpr, STD_HI: tl.constexpr, EPS: tl.constexpr,
                  STEP_EPS: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    i = pid // HKV
    h = (pid % HKV).to(tl.int64)
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    offs_t = tl.arange(0, G)
    offs_d = tl.arange(0, D)
    tile = layer * stride_xl + src * stride_xb + h * stride_xh \
        + offs_t[:, None] * stride_xt + offs_d[None, :]
    rec = rec_ptr + layer * stride_rl + dst * stride_rb + h * stride_rh
    if which == 0:
        x = tl.load(k_ptr + tile).to(tl.float32)
        _quantize_tile(x, rec, 1, D, G, K_BITS, OFF_KC, OFF_KS, OFF_KZ, OFF_KT,
                       ITERS, E_LO, E_HI, STD_LO, STD_HI, EPS, STEP_EPS)
    else:
        x = tl.load(v_ptr + tile).to(tl.float32)
        _quantize_tile(x, rec, 0, G, D, V_BITS, OFF_VC, OFF_VS, OFF_VZ, OFF_VCH,
                       ITERS, E_LO, E_HI, STD_LO, STD_HI, EPS, STEP_EPS)
        if RB > OFF_END:                             # zero the padding to 8 bytes
            offs_p = tl.arange(0, 8)
            tl.store(rec + OFF_END + offs_p, tl.zeros([8], tl.uint8), mask=offs_p < RB - OFF_END)


def _launch(k, v, src, records, dst, num_layers, strides_x, strides_r, hkv, cfg: KVarNConfig,
            num_warps: int | None = None, maxnreg: int | None = None):
    m = src.numel()
    if m == 0:
        return
    o = cfg.offsets
    iters = cfg.norm_iters if cfg.normalize else 0
    grid = (m * hkv, num_layers, 2)
    _store_kernel[grid](
        k, v, src, records, dst, *strides_x, *strides_r, hkv,
        G=cfg.group_size, D=cfg.head_dim, K_BITS=cfg.k_bits, V_BITS=cfg.v_bits,
        OFF_KC=o["k_codes"], OFF_KS=o["k_scale"], OFF_KZ=o["k_zero"], OFF_KT=o["k_tok"],
        OFF_VC=o["v_codes"], OFF_VCH=o["v_chan"], OFF_VS=o["v_scale"], OFF_VZ=o["v_zero"],
        OFF_END=o["end"], RB=cfg.record_bytes, ITERS=iters,
        E_LO=_exp_f32(cfg.log_clip[0]), E_HI=_exp_f32(cfg.log_clip[1]),
        STD_LO=STD_CLAMP[0], STD_HI=STD_CLAMP[1], EPS=IMBALANCE_EPS, STEP_EPS=STEP_MIN,
        # 4 warps up to 128 x 128 tiles: 10.4 ms vs 18.5 at 8 warps for the 8B 16K-token
        # prompt on an H100 (benchmarks/store_variants.py, NOTES.md attempt 16)
        num_warps=num_warps or (4 if cfg.group_size * cfg.head_dim <= 128 * 128 else 8),
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def _check_cfg(cfg):
    if not isinstance(cfg, KVarNConfig):
        raise TypeError(f"cfg must be a KVarNConfig, got {type(cfg).__name__}")


def store_tiles(kv_fp16_all: torch.Tensor, src_blocks: torch.Tensor, records_all: torch.Tensor,
                dst_blocks: torch.Tensor, cfg: KVarNConfig, num_warps: int | None = None,
                maxnreg: int | None = None) -> None:
    """Quantize fp16 blocks (rotated frame) into records, every layer at once, in place.

    kv_fp16_all fp16 [L, 2, nfp, Hkv, G, D]; records_all uint8 [L, nrec, Hkv, RB];
    src_blocks / dst_blocks [M] integer block ids (same semantics as ``ref_store_tiles``).
    num_warps, maxnreg: benchmark knobs (default 4 warps up to 128 x 128 tiles, else 8;
    no register cap).
    """
    _check_cfg(cfg)
    if kv_fp16_all.dim() != 6 or kv_fp16_all.shape[1] != 2:
        raise ValueError(f"kv_fp16_all must be [L, 2, nfp, Hkv, G, D], got {tuple(kv_fp16_all.shape)}")
    num_layers, _, _, hkv, g, d = kv_fp16_all.shape
    if kv_fp16_all.dtype != torch.float16:
        raise TypeError(f"kv_fp16_all must be float16, got {kv_fp16_all.dtype}")
    if (g, d) != (cfg.group_size, cfg.head_dim):
        raise ValueError(f"blocks of {g} tokens x head_dim {d} do not match {cfg.name} "
                         f"(G={cfg.group_size}, head_dim={cfg.head_dim})")
    if kv_fp16_all.stride(-1) != 1 or kv_fp16_all.stride(-2) != d:
        raise ValueError("kv_fp16_all's (G, D) tile must be contiguous")
    if (records_all.dtype != torch.uint8 or records_all.dim() != 4
            or records_all.shape[0] != num_layers or records_all.shape[2] != hkv
            or records_all.shape[3] != cfg.record_bytes or records_all.stride(-1) != 1):
        raise ValueError(f"records_all must be uint8 [{num_layers}, nrec, {hkv}, {cfg.record_bytes}] "
                         f"with contiguous records, got {records_all.dtype} {tuple(records_all.shape)}")
    if src_blocks.shape != dst_blocks.shape or src_blocks.dim() != 1:
        raise ValueError(f"src_blocks and dst_blocks must be [M], got {tuple(src_blocks.shape)} "
                         f"and {tuple(dst_blocks.shape)}")
    if src_blocks.numel() == 0:
        return
    dev = kv_fp16_all.device
    src = src_blocks.to(device=dev, dtype=torch.int32).contiguous()
    dst = dst_blocks.to(device=dev, dtype=torch.int32).contiguous()
    sx = kv_fp16_all.stride()
    sr = records_all.stride()
    _launch(kv_fp16_all[:, 0], kv_fp16_all[:, 1], src, records_all, dst, num_layers,
            (sx[0], sx[2], sx[3], sx[4]), (sr[0], sr[1], sr[2]), hkv, cfg, num_warps, maxnreg)


def quantize_blocks_triton(k: torch.Tensor, v: torch.Tensor, cfg: KVarNConfig,
                           rotate: bool = True) -> torch.Tensor:
    """Dense fp16 K/V blocks [n, G, H, D] -> records uint8 [n, H, RB].

    rotate=True: k, v are in the original frame (post-RoPE) and are rotated by H first,
    rounded to fp16 as ``kvarn.quant.quantize_blocks`` does; rotate=False: already rotated.
    """
    _check_cfg(cfg)
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must both be [n, G, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != torch.float16 or v.dtype != torch.float16:
        raise TypeError(f"k and v must be float16, got {k.dtype} and {v.dtype}")
    n, g, h, d = k.shape
    if (g, d) != (cfg.group_size, cfg.head_dim):
        raise ValueError(f"blocks of {g} tokens x head_dim {d} do not match {cfg.name} "
                         f"(G={cfg.group_size}, head_dim={cfg.head_dim})")
    if rotate and cfg.rotate:
        from kvarn.quant.hadamard import rotate as _rotate
        k, v = _rotate(k, torch.float16), _rotate(v, torch.float16)
    k = k.contiguous()
    v = v.contiguous()
    records = torch.empty(1, n, h, cfg.record_bytes, dtype=torch.uint8, device=k.device)
    ids = torch.arange(n, dtype=torch.int32, device=k.device)
    sx = k.stride()
    sr = records.stride()
    _launch(k, v, ids, records, ids, 1, (0, sx[0], sx[2], sx[1]), (sr[0], sr[1], sr[2]), h, cfg)
    return records[0]
