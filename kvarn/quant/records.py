"""Tiles <-> records: the store pipeline of KVARN_FORMAT.md, in plain torch.

Shapes through the pipeline, for n blocks of G tokens and H KV heads:

    k_rot, v_rot [n, G, H, D] fp16 (rotated frame)
      K tiles [n*H, D, G] (channels x tokens)   V tiles [n*H, G, D] (tokens x channels)
      -> normalize (s_col, s_row) -> round rows -> absorb -> pack
    records [n, H, record_bytes] uint8

This is the slow, obviously-correct oracle the Triton store kernel is tested against.
"""
from __future__ import annotations

import torch

from kvarn.format import KVarNConfig
from kvarn.quant.normalize import normalize_tiles
from kvarn.quant.rtn import pack_codes, round_rows, unpack_codes


def _balance(tiles: torch.Tensor, cfg: KVarNConfig):
    if cfg.normalize and cfg.norm_iters > 0:
        return normalize_tiles(tiles, cfg.norm_iters, cfg.log_clip)
    n, r, c = tiles.shape
    return tiles.new_ones(n, c), tiles.new_ones(n, r)


def quantize_tiles(k_tiles: torch.Tensor, v_tiles: torch.Tensor, cfg: KVarNConfig) -> dict:
    """K tiles [N, D, G], V tiles [N, G, D] (fp32, rotated) -> dict of record fields.

    Codes are unpacked uint8; scales are fp16 (what the record stores).
    """
    k_col, k_row = _balance(k_tiles, cfg)            # per token [N, G], per channel [N, D]
    kb = k_tiles / k_col[:, None, :] / k_row[:, :, None]
    k_codes, k_step, k_lo = round_rows(kb, cfg.k_bits)
    v_col, v_row = _balance(v_tiles, cfg)            # per channel [N, D], per token [N, G]
    vb = v_tiles / v_col[:, None, :] / v_row[:, :, None]
    v_codes, v_step, v_lo = round_rows(vb, cfg.v_bits)
    return {
        "k_codes": k_codes,                          # [N, D, G]
        "k_scale": (k_step * k_row).half(),          # [N, D]
        "k_zero": (k_lo * k_row).half(),             # [N, D]
        "k_tok": k_col.half(),                       # [N, G]
        "v_codes": v_codes,                          # [N, G, D]
        "v_chan": v_col.half(),                      # [N, D]
        "v_scale": (v_step * v_row).half(),          # [N, G]
        "v_zero": (v_lo * v_row).half(),             # [N, G]
    }


def pack_record_fields(f: dict, cfg: KVarNConfig) -> torch.Tensor:
    """Record fields of N tiles -> uint8 [N, record_bytes]."""
    n = f["k_codes"].shape[0]
    parts = [
        pack_codes(f["k_codes"], cfg.k_bits).reshape(n, -1),
        f["k_scale"].contiguous().view(torch.uint8),
        f["k_zero"].contiguous().view(torch.uint8),
        f["k_tok"].contiguous().view(torch.uint8),
        pack_codes(f["v_codes"], cfg.v_bits).reshape(n, -1),
        f["v_chan"].contiguous().view(torch.uint8),
        f["v_scale"].contiguous().view(torch.uint8),
        f["v_zero"].contiguous().view(torch.uint8),
    ]
    rec = torch.cat(parts, dim=1)
    pad = cfg.record_bytes - rec.shape[1]
    if pad:
        rec = torch.cat([rec, rec.new_zeros(n, pad)], dim=1)
    return rec


def unpack_record_fields(records: torch.Tensor, cfg: KVarNConfig) -> dict:
    """uint8 [N, record_bytes] -> record fields (codes uint8 unpacked, scales fp16)."""
    d, g = cfg.head_dim, cfg.group_size
    n = records.shape[0]

    def half(name):
        return records[:, cfg.field_slice(name)].contiguous().view(torch.float16)

    return {
        "k_codes": unpack_codes(records[:, cfg.field_slice("k_codes")].reshape(n, d, cfg.k_row_bytes), cfg.k_bits),
        "k_scale": half("k_scale"),
        "k_zero": half("k_zero"),
        "k_tok": half("k_tok"),
        "v_codes": unpack_codes(records[:, cfg.field_slice("v_codes")].reshape(n, g, cfg.v_row_bytes), cfg.v_bits),
        "v_chan": half("v_chan"),
        "v_scale": half("v_scale"),
        "v_zero": half("v_zero"),
    }


def reconstruct_tiles(f: dict):
    """Record fields -> (K_rot [N, G, D], V_rot [N, G, D]) fp32 (KVARN_FORMAT.md step 5)."""
    k = (f["k_codes"].float() * f["k_scale"].float()[:, :, None] + f["k_zero"].float()[:, :, None])
    k = k * f["k_tok"].float()[:, None, :]           # [N, D, G]
    v = (f["v_codes"].float() * f["v_scale"].float()[:, :, None] + f["v_zero"].float()[:, :, None])
    v = v * f["v_chan"].float()[:, None, :]          # [N, G, D]
    return k.transpose(1, 2), v


def _check_blocks(k: torch.Tensor, v: torch.Tensor, cfg: KVarNConfig):
    if not isinstance(cfg, KVarNConfig):
        raise TypeError(f"cfg must be a KVarNConfig, got {type(cfg).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k and v must be [n, G, H, D], got {tuple(k.shape)}")
    if k.dtype != torch.float16 or v.dtype != torch.float16:
        raise TypeError(f"k and v must be float16, got {k.dtype} and {v.dtype}")
    _, g, _, d = k.shape
    if g != cfg.group_size or d != cfg.head_dim:
        raise ValueError(
            f"blocks of {g} tokens x head_dim {d} do not match {cfg.name} "
            f"(G={cfg.group_size}, head_dim={cfg.head_dim})"
        )


def quantize_rotated_blocks(k_rot: torch.Tensor, v_rot: torch.Tensor, cfg: KVarNConfig) -> torch.Tensor:
    """Already-rotated fp16 blocks [n, G, H, D] -> records uint8 [n, H, record_bytes]."""
    _check_blocks(k_rot, v_rot, cfg)
    n, g, h, d = k_rot.shape
    if n * h == 0:
        return k_rot.new_zeros((n, h, cfg.record_bytes), dtype=torch.uint8)
    k_tiles = k_rot.float().permute(0, 2, 3, 1).reshape(n * h, d, g)
    v_tiles = v_rot.float().permute(0, 2, 1, 3).reshape(n * h, g, d)
    rec = pack_record_fields(quantize_tiles(k_tiles, v_tiles, cfg), cfg)
    return rec.reshape(n, h, cfg.record_bytes)


def dequantize_rotated_blocks(records: torch.Tensor, cfg: KVarNConfig, dtype=torch.float32):
    """records uint8 [n, H, record_bytes] -> (k_rot, v_rot) [n, G, H, D] in the rotated frame."""
    if records.dtype != torch.uint8 or records.dim() != 3 or records.shape[-1] != cfg.record_bytes:
        raise ValueError(
            f"records must be uint8 [n, H, {cfg.record_bytes}] for {cfg.name} at head_dim "
            f"{cfg.head_dim}, got {records.dtype} {tuple(records.shape)}"
        )
    n, h, _ = records.shape
    k, v = reconstruct_tiles(unpack_record_fields(records.reshape(n * h, cfg.record_bytes), cfg))
    g, d = cfg.group_size, cfg.head_dim
    k = k.reshape(n, h, g, d).transpose(1, 2)
    v = v.reshape(n, h, g, d).transpose(1, 2)
    return k.to(dtype), v.to(dtype)
