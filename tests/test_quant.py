"""The torch reference quantizer (kvarn.quant): packing, rounding, variance normalization,
round-trip error, the reference attention, and input checking.

Record *bytes* are checked against the spec in test_format.py; here the reference's
numbers are checked against quantities derived in the test (quantization noise of a
Gaussian row, an iteration of the normalization written out, a plain softmax).

    cache of one sequence (rotated frame):  | sink fp16 | record 0 | ... | record nb-1 | tail fp16 |
    attention here (original frame):        q . K^T over the same positions, K/V = cache @ H
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvarn.format import PRESETS, KVarNConfig
from kvarn.quant import (
    dense_attention,
    dequantize_blocks,
    dequantize_rotated_blocks,
    imbalance,
    normalize_tiles,
    pack_codes,
    quantize_blocks,
    quantize_rotated_blocks,
    quantize_tiles,
    reference_decode_attention,
    reference_extend_attention,
    round_rows,
    unpack_codes,
)

HEAD_DIMS = (64, 128, 256)
LOG_CLIP = (-0.3, 10.0)


def spec_hadamard(d: int) -> np.ndarray:
    """Sylvester Hadamard of order d over sqrt(d), float64 (KVARN_FORMAT.md step 1)."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian_blocks(n, g, h, d, seed):
    g_ = gen(seed)
    return torch.randn(n, g, h, d, generator=g_), torch.randn(n, g, h, d, generator=g_)


def outlier_channels(d):
    # a few fixed channels, none on Hadamard row 0 (see test_outlier_channels_*)
    return [5, 21, 38, 50] if d == 64 else [5, 37, 70, 101]


def rel_err(x_hat, x):
    return ((x_hat.double() - x.double()).norm() / x.double().norm()).item()


# --- packing ----------------------------------------------------------------------------

def test_pack_hand_examples():
    # lowest index in the lowest bits
    two = pack_codes(torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8), 2)
    assert two.tolist() == [[0b00_11_10_01, 0xFF]]                  # 0x39, 0xFF
    four = pack_codes(torch.tensor([0xA, 0x3, 0x0, 0xF], dtype=torch.uint8), 4)
    assert four.tolist() == [0x3A, 0xF0]
    assert unpack_codes(torch.tensor([0x39], dtype=torch.uint8), 2).tolist() == [1, 2, 3, 0]
    assert unpack_codes(torch.tensor([0x3A, 0xF0], dtype=torch.uint8), 4).tolist() == [0xA, 0x3, 0x0, 0xF]
    assert two.dtype == torch.uint8 and four.dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    for seed in range(5):
        codes = torch.randint(0, 1 << bits, (3, 7, 64), generator=gen(seed), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.shape == (3, 7, 64 * bits // 8) and packed.dtype == torch.uint8
        assert torch.equal(unpack_codes(packed, bits), codes)
        # the same bytes by the rule written out: code i at byte i//per, shift (i%per)*bits
        per = 8 // bits
        want = np.zeros((3, 7, 64 // per), np.int64)
        for i in range(64):
            want[..., i // per] |= codes[..., i].numpy().astype(np.int64) << ((i % per) * bits)
        np.testing.assert_array_equal(packed.numpy(), want)
    # every byte value decodes and re-encodes to itself
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(every, bits), bits), every)


def test_pack_rejects_ragged_rows():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 6, dtype=torch.uint8), 2)             # 2-bit: 4 per byte
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4)


# --- rounding ---------------------------------------------------------------------------

def test_round_rows_hand_example():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0]])
    codes, step, lo = round_rows(x, 2)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 1, 2, 3], [0, 0, 3, 2], [0, 0, 0, 0]]
    torch.testing.assert_close(step, torch.tensor([1.0, 2.0, 1e-10]), rtol=1e-6, atol=0)  # clamp
    assert lo.tolist() == [0.0, -1.0, 7.0]                               # zero point = float min
    codes, step, lo = round_rows(torch.tensor([[0.0, 15.0, 7.4, 7.6]]), 4)
    assert codes.tolist() == [[0, 15, 7, 8]] and step.item() == 1.0


def test_round_rows_ties_to_even():
    # (x - lo)/step = 0.5, 1.5, 2.5 exactly: rint (Triton, the reference kernel) -> 0, 2, 2
    codes, _, _ = round_rows(torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0]]), 2)
    assert codes.tolist() == [[0, 0, 2, 2, 3]]


def test_round_rows_error_bound():
    for bits in (2, 4):
        x = torch.randn(50, 128, generator=gen(bits))
        codes, step, lo = round_rows(x, bits)
        assert int(codes.max()) == (1 << bits) - 1 and int(codes.min()) == 0
        x_hat = codes.float() * step[:, None] + lo[:, None]
        assert ((x_hat - x).abs() <= step[:, None] / 2 * (1 + 1e-5)).all()


# --- variance normalization ----------------------------------------------------------------

def spec_imbalance(x: np.ndarray) -> float:
    col, row = x.std(axis=0, ddof=1), x.std(axis=1, ddof=1)
    return col.max() / max(col.min(), 1e-8) + row.max() / max(row.min(), 1e-8)


def spec_iterates(m: np.ndarray, iters=8, log_clip=LOG_CLIP):
    """[(imbalance, s_col, s_row)] for the identity and every iteration (spec step 3)."""
    r, c = m.shape
    a, b = np.zeros(c), np.zeros(r)
    out = [(spec_imbalance(m), np.ones(c), np.ones(r))]
    for _ in range(iters):
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        a = np.clip(a + np.log(np.clip(cur.std(axis=0, ddof=1), 1e-3, 1e3)), *log_clip)
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        b = np.clip(b + np.log(np.clip(cur.std(axis=1, ddof=1), 1e-3, 1e3)), *log_clip)
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        out.append((spec_imbalance(cur), np.exp(a), np.exp(b)))
    return out


def balanced(m, s_col, s_row):
    return m / s_col[:, None, :] / s_row[:, :, None]


def skewed_tile(seed, r=64, c=128, lo=0.0, hi=3.0):
    g_ = gen(seed)
    rows = torch.empty(r).uniform_(lo, hi, generator=g_).exp()
    cols = torch.empty(c).uniform_(lo, hi, generator=g_).exp()
    return torch.randn(r, c, generator=g_) * rows[:, None] * cols[None, :]


def tile_zoo():
    """Tiles [R, C] of several kinds, fp32."""
    tiles = []
    for s in range(3):
        g_ = gen(1000 + s)
        tiles += [
            torch.randn(64, 128, generator=g_),                                # balanced
            skewed_tile(s),                                                     # skewed up
            skewed_tile(s, lo=-2.0, hi=2.0),                                    # skewed both ways
            torch.randn(128, 64, generator=g_) * 1e-3,                          # tiny values
            torch.distributions.StudentT(1.5).sample((64, 128)),                # heavy tails
            torch.randn(64, 128, generator=g_) * torch.tensor([100.0] + [1.0] * 63)[:, None],
        ]
    return tiles


def test_imbalance_formula():
    tiles = tile_zoo()
    got = imbalance(torch.stack([t for t in tiles if t.shape == (64, 128)]))
    want = [spec_imbalance(t.double().numpy()) for t in tiles if t.shape == (64, 128)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # a tile with equal row stds and equal column stds: the minimum, 2
    circ = torch.tensor([[float((i + j) % 4) for j in range(4)] for i in range(4)])
    assert imbalance(circ[None]).item() == pytest.approx(2.0, abs=1e-6)


def test_normalize_reduces_imbalance_on_skewed_tiles():
    tiles = torch.stack([skewed_tile(s) for s in range(4)])            # rows, cols x e^[0, 3]
    before = imbalance(tiles)
    s_col, s_row = normalize_tiles(tiles)
    after = imbalance(balanced(tiles, s_col, s_row))
    assert (before > 40).all()
    assert (after < 4).all() and (after < 0.1 * before).all(), (before, after)


def test_normalize_never_increases_imbalance_and_keeps_the_best_iterate():
    for m in tile_zoo():
        s_col, s_row = normalize_tiles(m[None])
        got = imbalance(balanced(m[None], s_col, s_row)).item()
        its = spec_iterates(m.double().numpy())
        assert got <= its[0][0] * (1 + 1e-5), "worse than the input"
        assert got <= min(score for score, _, _ in its) * (1 + 1e-4), "worse than some iterate"


# Found by search over small integer tiles, checked below with the spec's own iteration:
# rows of std < e^-0.3 cannot be scaled up far enough (the log-clip's lower end), so
# every iterate is worse than leaving the tile alone.
IDENTITY_BEST = [[1.0, -2.0, -1.0, 0.0],
                 [0.04, 0.01, -0.02, -0.04],
                 [4.0, 2.0, 4.0, 4.0],
                 [-0.1, 0.2, -0.4, -0.4]]
# Iterate 1 is the best; later iterates drift away (the last is 32% worse).
FIRST_ITERATE_BEST = [[0.04, 0.04, -0.03, -0.04],
                      [4.0, 2.0, 2.0, 3.0],
                      [-1.0, 3.0, 1.0, 1.0],
                      [-0.1, -0.1, -0.1, 0.2]]


def test_normalize_returns_identity_when_no_iterate_improves():
    m = torch.tensor(IDENTITY_BEST)
    its = spec_iterates(m.double().numpy())
    assert all(score > its[0][0] * 1.05 for score, _, _ in its[1:])     # the construction holds
    s_col, s_row = normalize_tiles(m[None])
    assert torch.equal(s_col, torch.ones(1, 4)) and torch.equal(s_row, torch.ones(1, 4))


def test_normalize_keeps_best_so_far_not_last():
    m = torch.tensor(FIRST_ITERATE_BEST)
    its = spec_iterates(m.double().numpy())
    scores = [score for score, _, _ in its]
    assert int(np.argmin(scores)) == 1 and scores[-1] > 1.3 * scores[1]  # the construction holds
    s_col, s_row = normalize_tiles(m[None])
    np.testing.assert_allclose(s_col[0].numpy(), its[1][1], rtol=1e-5)
    np.testing.assert_allclose(s_row[0].numpy(), its[1][2], rtol=1e-5)
    assert imbalance(balanced(m[None], s_col, s_row)).item() == pytest.approx(scores[1], rel=1e-5)


def test_normalize_log_clip():
    lo, hi = math.exp(LOG_CLIP[0]), math.exp(LOG_CLIP[1])
    for m in tile_zoo():
        for s in normalize_tiles(m[None]):
            assert (s >= lo * (1 - 1e-6)).all() and (s <= hi * (1 + 1e-6)).all()
    # tiny values: every step wants ln(1e-3) ~ -6.9, the clip holds it at -0.3
    tiny = torch.randn(2, 64, 128, generator=gen(1)) * 1e-4
    s_col, s_row = normalize_tiles(tiny)
    torch.testing.assert_close(s_col, torch.full_like(s_col, lo))
    torch.testing.assert_close(s_row, torch.full_like(s_row, lo))
    # huge values: two steps of ln(1e3) (the std clamp) pass 10, the clip holds it at 10
    huge = skewed_tile(3)[None] * 1e8
    s_col, s_row = normalize_tiles(huge)
    assert s_col.max().item() == pytest.approx(hi, rel=1e-5)
    assert (s_col <= hi * (1 + 1e-6)).all() and (s_row <= hi * (1 + 1e-6)).all()
    # one iteration: a step moves a log scale by at most ln(1e3) (std clamped to [1e-3, 1e3])
    s_col, s_row = normalize_tiles(skewed_tile(2, lo=-2.0, hi=2.0)[None] * 1e5, iters=1)
    assert s_col.max().item() == pytest.approx(1e3, rel=1e-5)
    assert s_row.max().item() == pytest.approx(1e3, rel=1e-5)
    # the clip is a parameter
    s_col, s_row = normalize_tiles(tiny, log_clip=(-1.0, 2.0))
    torch.testing.assert_close(s_col, torch.full_like(s_col, math.exp(-1.0)))
    s_col, _ = normalize_tiles(huge, log_clip=(-1.0, 2.0))
    assert s_col.max().item() == pytest.approx(math.exp(2.0), rel=1e-5)


def test_normalize_off_gives_unit_scales():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    k = skewed_tile(0, 64, 64)[None]
    v = skewed_tile(1, 64, 64)[None]
    on = quantize_tiles(k, v, cfg)
    assert (on["k_tok"] != 1).any() and (on["v_chan"] != 1).any()
    for off in (cfg.with_options(normalize=False), cfg.with_options(norm_iters=0)):
        f = quantize_tiles(k, v, off)
        assert (f["k_tok"] == 1).all() and (f["v_chan"] == 1).all()
        # then k_scale/k_zero are the plain per-channel RTN step and minimum
        codes, step, lo = round_rows(k, 4)
        torch.testing.assert_close(f["k_scale"], step.half())
        torch.testing.assert_close(f["k_zero"], lo.half())
        assert torch.equal(f["k_codes"], codes)


# --- round-trip error ----------------------------------------------------------------------

def gaussian_rtn_error(bits: int, length: int) -> float:
    """RMS error / sigma of min-max RTN on a row of `length` N(0,1) values.

    Uniform quantization noise: step^2/12 with step = E[range]/(2^bits - 1); E[range]
    of `length` normals estimated here (about 4.8 for 64, 5.2 for 128, 5.6 for 256).
    """
    x = np.random.default_rng(0).standard_normal((4000, length))
    e_range = (x.max(1) - x.min(1)).mean()
    return e_range / ((1 << bits) - 1) / math.sqrt(12)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("d", [64, 128])
def test_round_trip_error_gaussian(name, d):
    """Rotation keeps Gaussian data Gaussian, so each row is plain RTN: error = theory.

    K rows are channels over G tokens (bK bits); V rows are tokens over D channels (bV).
    E.g. G=128, 4 bits: 5.2/15/sqrt(12) = 0.100; D=128, 2 bits: 0.50.
    """
    cfg = KVarNConfig.from_name(name, d)
    g = cfg.group_size
    k, v = gaussian_blocks(2, g, 2, d, seed=d + g)
    k_hat, v_hat = dequantize_blocks(quantize_blocks(k.half(), v.half(), cfg), cfg)
    ek, ev = rel_err(k_hat, k.half()), rel_err(v_hat, v.half())
    tk, tv = gaussian_rtn_error(cfg.k_bits, g), gaussian_rtn_error(cfg.v_bits, d)
    assert 0.85 * tk < ek < 1.1 * tk, (ek, tk)
    assert 0.85 * tv < ev < 1.1 * tv, (ev, tv)


@pytest.mark.parametrize("name, d", [("kvarn_k4v2_g128", 128), ("kvarn_k4v4_g64", 64),
                                     ("kvarn_k4v2_g64", 128), ("kvarn_k4v4_g128", 128)])
def test_outlier_channels_rotation_and_normalization_help(name, d):
    """Four x50 channels in K and in V (like real keys).

    Plain per-token RTN of V lets the outliers set every token's range: the other
    channels round to a level ~20 sigma wide and the error exceeds the signal (~1.2 at
    D=128, 2 bits). Rotation spreads the outliers over all channels and the
    normalization rescales tokens: the error drops below the Gaussian figure. For K
    (per-channel rows) the x50 channels hurt less, but the default still wins.
    """
    cfg = KVarNConfig.from_name(name, d)
    plain = cfg.with_options(rotate=False, normalize=False)
    g = cfg.group_size
    for seed in range(2):
        k, v = gaussian_blocks(2, g, 2, d, seed=seed)
        k[..., outlier_channels(d)] *= 50
        v[..., outlier_channels(d)] *= 50
        k, v = k.half(), v.half()
        k1, v1 = dequantize_blocks(quantize_blocks(k, v, cfg), cfg)
        k0, v0 = dequantize_blocks(quantize_blocks(k, v, plain), plain)
        ek1, ev1, ek0, ev0 = rel_err(k1, k), rel_err(v1, v), rel_err(k0, k), rel_err(v0, v)
        assert ek1 < 1.1 * gaussian_rtn_error(cfg.k_bits, g)
        assert ev1 < 1.1 * gaussian_rtn_error(cfg.v_bits, d)
        assert ek1 < 0.92 * ek0, (ek1, ek0)
        assert ev1 < 0.5 * ev0, (ev1, ev0)


def test_outlier_tokens_normalization_helps():
    """Two x30 tokens per tile: per-channel K rows see them as range outliers; the
    per-token scale k_tok absorbs them (K error 0.24 -> 0.10 at G=128)."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    k, v = gaussian_blocks(2, 128, 2, 128, seed=5)
    k[:, [0, 77]] *= 30
    v[:, [0, 77]] *= 30
    k, v = k.half(), v.half()
    errs = {}
    for label, c in (("default", cfg), ("plain", cfg.with_options(rotate=False, normalize=False))):
        k_hat, _ = dequantize_blocks(quantize_blocks(k, v, c), c)
        errs[label] = rel_err(k_hat, k)
    assert errs["default"] < 1.1 * gaussian_rtn_error(4, 128)
    assert errs["default"] < 0.6 * errs["plain"], errs


# --- properties over presets x head dims x sizes -------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_shapes_dtypes_determinism(name, d):
    cfg = KVarNConfig.from_name(name, d)
    g = cfg.group_size
    for n, h in ((1, 1), (3, 5)):
        for seed in range(2):
            k, v = gaussian_blocks(n, g, h, d, seed=seed)
            k, v = (3 * k).half(), v.half()
            rec = quantize_blocks(k, v, cfg)
            assert rec.dtype == torch.uint8 and rec.shape == (n, h, cfg.record_bytes)
            assert rec.is_contiguous()
            assert torch.equal(rec, quantize_blocks(k.clone(), v.clone(), cfg))   # deterministic
            k_hat, v_hat = dequantize_blocks(rec, cfg)
            assert k_hat.dtype == v_hat.dtype == torch.float16
            assert k_hat.shape == v_hat.shape == (n, g, h, d)
            assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
            kr, vr = dequantize_rotated_blocks(rec, cfg)
            assert kr.dtype == vr.dtype == torch.float32 and kr.shape == (n, g, h, d)
            assert rel_err(k_hat, k) < 0.12 and rel_err(v_hat, v) < 0.6
            # tiles are independent: one block and one head alone give the same record
            assert torch.equal(quantize_blocks(k[-1:, :, -1:], v[-1:, :, -1:], cfg), rec[-1:, -1:])
            # a non-contiguous view of the same values gives the same records
            kt = k.transpose(0, 2).contiguous().transpose(0, 2)
            assert not kt.is_contiguous() or n == h == 1
            assert torch.equal(quantize_blocks(kt, v, cfg), rec)


def test_zero_blocks_and_zero_heads():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 128)
    for n, h in ((0, 2), (2, 0)):
        k = torch.zeros(n, 64, h, 128, dtype=torch.float16)
        rec = quantize_blocks(k, k, cfg)
        assert rec.shape == (n, h, cfg.record_bytes) and rec.dtype == torch.uint8
        k_hat, v_hat = dequantize_blocks(rec, cfg)
        assert k_hat.shape == v_hat.shape == (n, 64, h, 128) and k_hat.dtype == torch.float16


def test_rotated_entry_points_agree():
    cfg = KVarNConfig.from_name("kvarn_k4v4_g64", 128)
    k, v = gaussian_blocks(2, 64, 3, 128, seed=9)
    k, v = k.half(), v.half()
    had = torch.from_numpy(spec_hadamard(128)).float()
    k_rot, v_rot = (k.float() @ had).half(), (v.float() @ had).half()
    rec = quantize_blocks(k, v, cfg)
    assert torch.equal(quantize_rotated_blocks(k_rot, v_rot, cfg), rec)
    kr, vr = dequantize_rotated_blocks(rec, cfg)
    k_hat, v_hat = dequantize_blocks(rec, cfg)
    torch.testing.assert_close(k_hat.float(), (kr @ had).half().float(), rtol=0, atol=0)
    torch.testing.assert_close(v_hat.float(), (vr @ had).half().float(), rtol=0, atol=0)
    # without rotation the cache frame is the original frame
    plain = cfg.with_options(rotate=False)
    assert torch.equal(quantize_blocks(k, v, plain), quantize_rotated_blocks(k, v, plain))


# --- reference attention ---------------------------------------------------------------------

def build_cache(cfg, hkv, ls, nb, lt, seed, empty_as_none=False):
    """Rotated-frame sink/records/tail, and the same context in the original frame (float64)."""
    d, g = cfg.head_dim, cfg.group_size
    g_ = gen(seed)
    had = spec_hadamard(d)
    rot = lambda x: torch.from_numpy((x.double().numpy() @ had).astype(np.float16))   # noqa: E731
    sink_k = rot(torch.randn(ls, hkv, d, generator=g_) * 2)
    sink_v = rot(torch.randn(ls, hkv, d, generator=g_))
    tail_k = rot(torch.randn(lt, hkv, d, generator=g_) * 2)
    tail_v = rot(torch.randn(lt, hkv, d, generator=g_))
    kb = (torch.randn(nb, g, hkv, d, generator=g_) * 2).half()
    vb = torch.randn(nb, g, hkv, d, generator=g_).half()
    records = quantize_blocks(kb, vb, cfg)
    # original frame, float64: fp16 sink/tail and the records' exact decode, times H
    kr, vr = dequantize_rotated_blocks(records, cfg, torch.float64)
    k_all = torch.cat([sink_k.double(), kr.reshape(-1, hkv, d), tail_k.double()]) @ torch.from_numpy(had)
    v_all = torch.cat([sink_v.double(), vr.reshape(-1, hkv, d), tail_v.double()]) @ torch.from_numpy(had)
    if empty_as_none:
        records = records if nb else None
        tail_k, tail_v = (tail_k, tail_v) if lt else (None, None)
    return (sink_k, sink_v, records, tail_k, tail_v), (k_all, v_all)


def plain_attention(q, k, v, sm_scale=None):
    """q [Lq, Hq, D], k/v [N, Hkv, D] float64; query i at position N-Lq+i, causal, GQA."""
    lq, hq, d = q.shape
    n, hkv, _ = k.shape
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(lq, hq, d, dtype=torch.float64)
    for i in range(lq):
        pos = n - lq + i
        for h in range(hq):
            kv = h // (hq // hkv)                     # consecutive query heads share a KV head
            s = (k[: pos + 1, kv] @ q[i, h].double()) * scale
            p = torch.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[: pos + 1, kv]
    return out


ATTN_CASES = [  # (preset, D, sink, records, tail)
    ("kvarn_k4v2_g64", 64, 5, 0, 0),      # first block, still partial: sink only
    ("kvarn_k4v2_g64", 64, 64, 0, 0),     # a full sink
    ("kvarn_k4v2_g64", 64, 64, 0, 9),     # sink + 0 records + tail
    ("kvarn_k4v2_g64", 64, 64, 2, 1),     # sink + 2 records + tail of 1
    ("kvarn_k4v4_g64", 64, 64, 1, 63),    # tail of G-1
    ("kvarn_k4v2_g64", 64, 64, 3, 0),     # records, no tail
    ("kvarn_k4v2_g128", 128, 128, 1, 7),
]


@pytest.mark.parametrize("hq, hkv", [(6, 2), (2, 2)])
@pytest.mark.parametrize("name, d, ls, nb, lt", ATTN_CASES)
def test_reference_decode_attention(name, d, ls, nb, lt, hq, hkv):
    cfg = KVarNConfig.from_name(name, d)
    for empty_as_none in (False, True):
        cache, (k_all, v_all) = build_cache(cfg, hkv, ls, nb, lt, seed=ls + nb + lt,
                                            empty_as_none=empty_as_none)
        assert k_all.shape[0] == ls + nb * cfg.group_size + lt
        q = torch.randn(hq, d, generator=gen(hq)) * 2
        got = reference_decode_attention(q, *cache, cfg)
        assert got.shape == (hq, d) and got.dtype == torch.float32
        want = plain_attention(q[None], k_all, v_all)[0]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * v_all.abs().max().item())


def test_reference_decode_attention_sm_scale_and_gqa_grouping():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    cache, (k_all, v_all) = build_cache(cfg, 2, 64, 1, 3, seed=11)
    q = torch.randn(6, 64, generator=gen(3))
    got = reference_decode_attention(q, *cache, cfg, sm_scale=0.37)
    torch.testing.assert_close(got.double(), plain_attention(q[None], k_all, v_all, 0.37)[0],
                               rtol=0, atol=2e-5 * v_all.abs().max().item())
    # head 2 reads KV head 0 and head 3 reads KV head 1, not h % Hkv
    swapped = plain_attention(q[None], k_all.flip(1), v_all.flip(1), 0.37)[0]
    assert (got[2:4].double() - swapped[2:4]).abs().max() > 1e-2


@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("ls, nb, lt", [(5, 0, 0), (64, 0, 2), (64, 1, 5), (64, 2, 0)])
def test_reference_extend_attention_causal(ls, nb, lt, hq, hkv):
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    cache, (k_all, v_all) = build_cache(cfg, hkv, ls, nb, lt, seed=ls + nb + lt)
    q = torch.randn(3, hq, 64, generator=gen(7)) * 2
    # queries 0 and 1 point at the last token, which the causal mask hides from them
    rep = hq // hkv
    q[:2] += 0.5 * k_all[-1].float().repeat_interleave(rep, dim=0)
    got = reference_extend_attention(q, *cache, cfg)
    assert got.shape == (3, hq, 64) and got.dtype == torch.float32
    want = plain_attention(q, k_all, v_all)
    atol = 2e-5 * v_all.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
    # the mask matters: unmasked (as if at position N-1), the first two queries differ
    for i in range(2):
        no_mask = plain_attention(q[i:i + 1], k_all, v_all)[0]
        assert (no_mask - got[i].double()).abs().max() > 0.1
    # the last query equals a decode step over the whole context
    torch.testing.assert_close(got[2], reference_decode_attention(q[2], *cache, cfg), rtol=0, atol=1e-5)


def test_dense_attention_errors():
    k = torch.zeros(4, 3, 64)
    with pytest.raises(ValueError):
        dense_attention(torch.zeros(1, 4, 64), k, k)          # 4 query heads over 3 KV heads
    with pytest.raises(ValueError):
        dense_attention(torch.zeros(5, 3, 64), k, k)          # 5 queries, 4 context tokens


# --- input checking ------------------------------------------------------------------------

def test_quantize_rejects_bad_inputs():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    k = torch.zeros(1, 64, 2, 64, dtype=torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(TypeError):
            quantize_blocks(k.to(dtype), k.to(dtype), cfg)
        with pytest.raises(TypeError):
            quantize_blocks(k, k.to(dtype), cfg)
        with pytest.raises(TypeError):
            quantize_rotated_blocks(k.to(dtype), k, cfg)
    with pytest.raises(TypeError):
        quantize_blocks(k.numpy(), k, cfg)
    with pytest.raises(TypeError):
        quantize_blocks(k, k, "kvarn_k4v2_g64")
    bad_shapes = [
        (k, torch.zeros(1, 64, 1, 64, dtype=torch.float16)),             # k and v differ
        (torch.zeros(1, 128, 2, 64, dtype=torch.float16),) * 2,          # G = 128, preset G = 64
        (torch.zeros(1, 32, 2, 64, dtype=torch.float16),) * 2,           # G = 32
        (torch.zeros(1, 64, 2, 128, dtype=torch.float16),) * 2,          # D = 128, config D = 64
        (torch.zeros(1, 64, 2, 96, dtype=torch.float16),) * 2,           # D = 96
        (torch.zeros(64, 2, 64, dtype=torch.float16),) * 2,              # 3-D
    ]
    for kk, vv in bad_shapes:
        with pytest.raises(ValueError):
            quantize_blocks(kk, vv, cfg)
        if kk.shape[-1] == 64 or kk.dim() != 4:
            with pytest.raises(ValueError):
                quantize_rotated_blocks(kk, vv, cfg)


def test_dequantize_rejects_bad_records():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    good = torch.zeros(2, 3, cfg.record_bytes, dtype=torch.uint8)
    dequantize_blocks(good, cfg)                                          # the baseline works
    bad = [
        torch.zeros(2, 3, cfg.record_bytes + 8, dtype=torch.uint8),
        torch.zeros(2, 3, KVarNConfig.from_name("kvarn_k4v4_g128", 128).record_bytes, dtype=torch.uint8),
        good.to(torch.int8),
        good.to(torch.float16),
        good[0],                                                          # 2-D
        good[None],                                                       # 4-D
    ]
    for records in bad:
        with pytest.raises(ValueError, match="record"):
            dequantize_blocks(records, cfg)
        with pytest.raises(ValueError):
            dequantize_rotated_blocks(records, cfg)


def test_normalize_tiles_rejects_2d():
    with pytest.raises(ValueError):
        normalize_tiles(torch.zeros(64, 64))
