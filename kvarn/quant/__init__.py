"""The KVarN quantizer in plain torch: the project's reference (oracle).

    records = quantize_blocks(k, v, cfg)      # k, v [n, G, H, D] fp16, post-RoPE, not rotated
    k2, v2 = dequantize_blocks(records, cfg)  # [n, G, H, D] fp16, back in the original frame

Everything stored is in the Hadamard-rotated frame; ``*_rotated_*`` variants skip the
rotation for callers (the engine, the kernels) that already hold rotated fp16 values.
"""
from __future__ import annotations

import torch

from kvarn.format import KVarNConfig
from kvarn.quant.attention import (
    assemble_context,
    dense_attention,
    reference_decode_attention,
    reference_extend_attention,
)
from kvarn.quant.hadamard import hadamard, rotate
from kvarn.quant.normalize import imbalance, normalize_tiles
from kvarn.quant.records import (
    _check_blocks,
    dequantize_rotated_blocks,
    pack_record_fields,
    quantize_rotated_blocks,
    quantize_tiles,
    reconstruct_tiles,
    unpack_record_fields,
)
from kvarn.quant.rtn import pack_codes, round_rows, unpack_codes


def to_cache_frame(x: torch.Tensor, cfg: KVarNConfig) -> torch.Tensor:
    """Original-frame fp16 [..., D] -> the cache's frame, fp16 (rotated unless cfg.rotate is off)."""
    return rotate(x, torch.float16) if cfg.rotate else x.to(torch.float16)


def from_cache_frame(x: torch.Tensor, cfg: KVarNConfig, dtype=torch.float16) -> torch.Tensor:
    return rotate(x, dtype) if cfg.rotate else x.to(dtype)


def quantize_blocks(k: torch.Tensor, v: torch.Tensor, cfg: KVarNConfig) -> torch.Tensor:
    """fp16 K/V blocks [n, G, H, D] (post-RoPE, original frame) -> uint8 [n, H, record_bytes]."""
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("k and v must be torch tensors")
    if k.dtype != torch.float16 or v.dtype != torch.float16:
        raise TypeError(f"k and v must be float16, got {k.dtype} and {v.dtype}")
    _check_blocks(k, v, cfg)    # before rotating: a bad cfg or head_dim gets its own message
    return quantize_rotated_blocks(to_cache_frame(k, cfg), to_cache_frame(v, cfg), cfg)


def dequantize_blocks(records: torch.Tensor, cfg: KVarNConfig):
    """uint8 [n, H, record_bytes] -> (k, v) fp16 [n, G, H, D] in the original frame."""
    k_rot, v_rot = dequantize_rotated_blocks(records, cfg, torch.float32)
    return from_cache_frame(k_rot, cfg), from_cache_frame(v_rot, cfg)


__all__ = [
    "KVarNConfig", "quantize_blocks", "dequantize_blocks", "quantize_rotated_blocks",
    "dequantize_rotated_blocks", "quantize_tiles", "pack_record_fields", "unpack_record_fields",
    "reconstruct_tiles", "normalize_tiles", "imbalance", "round_rows", "pack_codes",
    "unpack_codes", "hadamard", "rotate", "to_cache_frame", "from_cache_frame",
    "assemble_context", "dense_attention", "reference_decode_attention",
    "reference_extend_attention",
]
