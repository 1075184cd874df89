"""store_tiles / quantize_blocks_triton against the torch reference quantizer.

Records must equal the reference's byte for byte except where fp32 summation order
or exp/rsqrt rounding moves a value across a rounding boundary: a code one step off,
an fp16 scale one ulp off, or (near-tie of two iterations' imbalance) a tile whose
scales differ by rounding. The tests bound how many, and check that nothing else moves.
"""
from __future__ import annotations

import functools

import pytest
import torch

from kvarn.format import KVarNConfig
from kvarn.kernels.reference import ref_store_tiles
from kvarn.kernels.store import quantize_blocks_triton, store_tiles
from kvarn.quant import quantize_blocks
from kvarn.quant.records import quantize_rotated_blocks, unpack_record_fields

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kv_like(shape, d, gen):
    """Random fp16 with per-channel spreads and offsets, like real (rotated) K/V."""
    scale = torch.rand(d, generator=gen) * 3 + 0.1
    bias = torch.randn(d, generator=gen)
    return (torch.randn(*shape, d, generator=gen) * scale + bias).half()


def compare_records(got: torch.Tensor, ref: torch.Tensor, cfg: KVarNConfig) -> dict:
    """Per-field counts of values that differ; asserts each differs only by rounding."""
    got = got.reshape(-1, cfg.record_bytes).cpu()
    ref = ref.reshape(-1, cfg.record_bytes).cpu()
    assert (got[:, cfg.offsets["end"]:] == 0).all(), "padding bytes must be zero"
    fg, fr = unpack_record_fields(got, cfg), unpack_record_fields(ref, cfg)
    counts = {}
    for name in fg:
        a, b = fg[name], fr[name]
        diff = a != b
        counts[name] = int(diff.sum())
        if not diff.any():
            continue
        if name.endswith("codes"):
            assert (a.int() - b.int()).abs().max() <= 1, f"{name} off by more than one step"
        else:   # an fp16 scale: relative difference of a few ulp at most
            rel = ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30))[diff]
            assert rel.max() <= 4e-3, f"{name} differs by {rel.max():.2e} (relative)"
    return counts


CONFIGS = [("kvarn_k4v2_g128", 128), ("kvarn_k4v4_g64", 64), ("kvarn_k4v2_g64", 256), ("kvarn_k4v4_g128", 128)]


@pytest.mark.parametrize("preset,d", CONFIGS)
def test_store_tiles_matches_reference(preset, d):
    cfg = KVarNConfig.from_name(preset, d)
    g = cfg.group_size
    gen = torch.Generator().manual_seed(d + g)
    layers, nfp, hkv, nrec = 2, 5, 2, 6
    kv = kv_like((layers, 2, nfp, hkv, g), d, gen)
    src = torch.tensor([3, 0, 4], dtype=torch.int32)
    dst = torch.tensor([5, 1, 2], dtype=torch.int32)
    poison = torch.randint(0, 256, (layers, nrec, hkv, cfg.record_bytes), generator=gen, dtype=torch.uint8)
    ref = poison.clone()
    ref_store_tiles(kv, src, ref, dst, cfg)
    got = poison.clone().to(DEVICE)
    store_tiles(kv.to(DEVICE), src.to(DEVICE), got, dst.to(DEVICE), cfg)
    got = got.cpu()
    untouched = torch.ones(nrec, dtype=torch.bool)
    untouched[dst.long()] = False
    assert torch.equal(got[:, untouched], poison[:, untouched]), "wrote outside dst blocks"
    counts = compare_records(got[:, dst.long()], ref[:, dst.long()], cfg)
    n_codes = layers * len(dst) * hkv * g * d * 2
    assert counts["k_codes"] + counts["v_codes"] <= max(4, n_codes // 20000), counts


def test_store_tiles_layer_view_and_empty():
    """A pool's strided views work, and an empty batch is a no-op."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    gen = torch.Generator().manual_seed(1)
    kv = kv_like((3, 2, 4, 3, 64), 64, gen)[1:]          # offset view of a bigger pool
    rec = torch.zeros(3, 2, 3, cfg.record_bytes, dtype=torch.uint8)[1:]
    ref = rec.clone()
    empty = torch.empty(0, dtype=torch.int32)
    store_tiles(kv.to(DEVICE), empty.to(DEVICE), rec.to(DEVICE), empty.to(DEVICE), cfg)
    src, dst = torch.tensor([2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    ref_store_tiles(kv, src, ref, dst, cfg)
    got = rec.to(DEVICE)
    store_tiles(kv.to(DEVICE), src.to(DEVICE), got, dst.to(DEVICE), cfg)
    compare_records(got[:, 1].cpu(), ref[:, 1], cfg)


@pytest.mark.parametrize("rotate", [True, False])
def test_quantize_blocks_triton(rotate):
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 128)
    gen = torch.Generator().manual_seed(2)
    k, v = kv_like((3, 64, 2), 128, gen), kv_like((3, 64, 2), 128, gen)
    ref = quantize_blocks(k, v, cfg) if rotate else quantize_rotated_blocks(k, v, cfg)
    got = quantize_blocks_triton(k.to(DEVICE), v.to(DEVICE), cfg, rotate)
    assert got.shape == ref.shape and got.dtype == torch.uint8
    counts = compare_records(got, ref, cfg)
    assert counts["k_codes"] + counts["v_codes"] <= 4, counts


def test_store_rejects_bad_arguments():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    kv = torch.zeros(1, 2, 2, 1, 64, 64, dtype=torch.float16)
    rec = torch.zeros(1, 2, 1, cfg.record_bytes, dtype=torch.uint8)
    ids = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError):
        store_tiles(kv.float(), ids, rec, ids, cfg)
    with pytest.raises(ValueError):
        store_tiles(kv, ids, rec[..., :-8], ids, cfg)
    with pytest.raises(ValueError):
        store_tiles(kv, ids, rec, ids, KVarNConfig.from_name("kvarn_k4v2_g128", 64))
    with pytest.raises(TypeError):
        quantize_blocks_triton(kv[0, 0].float(), kv[0, 0].float(), cfg)


@functools.lru_cache(maxsize=1)
def _large_case(preset, d):
    """The large case's inputs and torch-reference records, made once per config (the
    CPU reference takes seconds; the launches of test_store_gpu_large share it)."""
    cfg = KVarNConfig.from_name(preset, d)
    gen = torch.Generator().manual_seed(11)
    layers, hkv, m = 4, 8, 24
    kv = kv_like((layers, 2, m + 3, hkv, cfg.group_size), d, gen)
    src = torch.randperm(m + 3, generator=gen)[:m].int()
    dst = torch.randperm(m + 5, generator=gen)[:m].int()
    ref = torch.zeros(layers, m + 5, hkv, cfg.record_bytes, dtype=torch.uint8)
    ref_store_tiles(kv, src, ref, dst, cfg)
    return kv, src, dst, ref


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [None, (8, 128), (16, None)], ids=lambda x: "default" if x is None else "w%s_r%s" % x)
@pytest.mark.parametrize("preset,d", CONFIGS)
def test_store_gpu_large(preset, d, launch):
    """Many tiles (an 8B-like layer stack, fewer blocks): flip counts stay rare, at the
    default launch and at the ones store_variants.py times."""
    warps, maxnreg = launch or (None, None)
    cfg = KVarNConfig.from_name(preset, d)
    g = cfg.group_size
    layers, hkv, m = 4, 8, 24
    kv, src, dst, ref = _large_case(preset, d)
    got = torch.zeros_like(ref).cuda()
    store_tiles(kv.cuda(), src.cuda(), got, dst.cuda(), cfg, num_warps=warps, maxnreg=maxnreg)
    counts = compare_records(got[:, dst.long()], ref[:, dst.long()], cfg)
    n_codes = layers * m * hkv * g * d * 2
    assert counts["k_codes"] + counts["v_codes"] <= n_codes // 20000, counts
