"""Record layout and record bytes, checked against KVARN_FORMAT.md by code written here.

Nothing below uses the package's offsets, field_slice, unpack or pack helpers to
*read* or *write* a record: the layout table, the packing rule, the reconstruction
and the whole store pipeline are re-derived from the spec text, in numpy float64,
and compared with what ``kvarn.quant`` produces.

    record (uint8, little-endian)
    | K codes D*G*bK/8 | k_scale 2D | k_zero 2D | k_tok 2G | V codes G*D*bV/8 | v_chan 2D | v_scale 2G | v_zero 2G | 0-pad ->8 |
      byte(d, t) = d*(G*bK/8) + t//(8/bK)             byte(t, d) = V_base + t*(D*bV/8) + d//(8/bV)
      shift      = (t mod 8/bK)*bK                     shift      = (d mod 8/bV)*bV
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvarn.format import DEFAULT_PRESET, KV_CACHE_DTYPES, PRESETS, KVarNConfig, is_kvarn
from kvarn.quant import (
    dequantize_blocks,
    dequantize_rotated_blocks,
    quantize_blocks,
    quantize_rotated_blocks,
    rotate,
)

# The spec's preset table: name -> (K bits, V bits, G).
SPEC_PRESETS = {
    "kvarn_k4v2_g128": (4, 2, 128),
    "kvarn_k4v4_g128": (4, 4, 128),
    "kvarn_k4v2_g64": (4, 2, 64),
    "kvarn_k4v4_g64": (4, 4, 64),
}
HEAD_DIMS = (64, 128, 256)
FIELDS = ("k_codes", "k_scale", "k_zero", "k_tok", "v_codes", "v_chan", "v_scale", "v_zero")
FP16_FIELDS = FIELDS[1:4] + FIELDS[5:]


# --- the spec, re-implemented ---------------------------------------------------------

def spec_layout(d: int, g: int, kb: int, vb: int):
    """{field: (offset, nbytes)}, unpadded end, record bytes: the spec's table, in order."""
    sizes = [d * g * kb // 8, 2 * d, 2 * d, 2 * g, g * d * vb // 8, 2 * d, 2 * g, 2 * g]
    layout, pos = {}, 0
    for name, nbytes in zip(FIELDS, sizes):
        layout[name] = (pos, nbytes)
        pos += nbytes
    return layout, pos, -(-pos // 8) * 8


def spec_hadamard(d: int) -> np.ndarray:
    """Sylvester Hadamard of order d over sqrt(d), float64."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def k_code_index(d: int, g: int, kb: int):
    dd, tt = np.meshgrid(np.arange(d), np.arange(g), indexing="ij")      # [D, G]
    per = 8 // kb
    return dd * (g * kb // 8) + tt // per, (tt % per) * kb


def v_code_index(d: int, g: int, vb: int, v_base: int):
    tt, dd = np.meshgrid(np.arange(g), np.arange(d), indexing="ij")      # [G, D]
    per = 8 // vb
    return v_base + tt * (d * vb // 8) + dd // per, (dd % per) * vb


def read_record(rec: np.ndarray, d: int, g: int, kb: int, vb: int) -> dict:
    """One record (uint8 [record_bytes]) -> codes (int64) and fp16 fields (as float16)."""
    layout, _, _ = spec_layout(d, g, kb, vb)
    out = {}
    for name in FP16_FIELDS:
        off, nbytes = layout[name]
        out[name] = np.frombuffer(rec[off:off + nbytes].tobytes(), dtype="<f2")
    byte, shift = k_code_index(d, g, kb)
    out["k_codes"] = (rec[byte].astype(np.int64) >> shift) & ((1 << kb) - 1)            # [D, G]
    byte, shift = v_code_index(d, g, vb, layout["v_codes"][0])
    out["v_codes"] = (rec[byte].astype(np.int64) >> shift) & ((1 << vb) - 1)            # [G, D]
    return out


def reconstruct(f: dict):
    """Spec step 5 -> (K_rot [G, D], V_rot [G, D]) float64."""
    ks, kz, kt = (f[n].astype(np.float64) for n in ("k_scale", "k_zero", "k_tok"))
    vc, vs, vz = (f[n].astype(np.float64) for n in ("v_chan", "v_scale", "v_zero"))
    k_rot = (f["k_codes"] * ks[:, None] + kz[:, None]) * kt[None, :]                     # [D, G]
    v_rot = (f["v_codes"] * vs[:, None] + vz[:, None]) * vc[None, :]                     # [G, D]
    return k_rot.T, v_rot


def write_record(f: dict, d: int, g: int, kb: int, vb: int) -> np.ndarray:
    layout, _, record_bytes = spec_layout(d, g, kb, vb)
    rec = np.zeros(record_bytes, np.uint8)
    for name in FP16_FIELDS:
        off, nbytes = layout[name]
        rec[off:off + nbytes] = np.asarray(f[name], "<f2").view(np.uint8)
    byte, shift = k_code_index(d, g, kb)
    np.bitwise_or.at(rec, byte.ravel(), (f["k_codes"] << shift).ravel().astype(np.uint8))
    byte, shift = v_code_index(d, g, vb, layout["v_codes"][0])
    np.bitwise_or.at(rec, byte.ravel(), (f["v_codes"] << shift).ravel().astype(np.uint8))
    return rec


def spec_imbalance(x: np.ndarray) -> float:
    col, row = x.std(axis=0, ddof=1), x.std(axis=1, ddof=1)
    return col.max() / max(col.min(), 1e-8) + row.max() / max(row.min(), 1e-8)


def spec_normalize(m: np.ndarray, iters: int = 8):
    """Spec step 3 on one tile [R, C] -> (s_col [C], s_row [R]), float64."""
    r, c = m.shape
    a, b = np.zeros(c), np.zeros(r)
    best, s_col, s_row = spec_imbalance(m), np.ones(c), np.ones(r)
    for _ in range(iters):
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        a = np.clip(a + np.log(np.clip(cur.std(axis=0, ddof=1), 1e-3, 1e3)), -0.3, 10)
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        b = np.clip(b + np.log(np.clip(cur.std(axis=1, ddof=1), 1e-3, 1e3)), -0.3, 10)
        cur = m / np.exp(a)[None, :] / np.exp(b)[:, None]
        score = spec_imbalance(cur)
        if score <= best:
            best, s_col, s_row = score, np.exp(a), np.exp(b)
    return s_col, s_row


def spec_round(x: np.ndarray, bits: int):
    """Spec step 4 per row; ties to even (np.rint), as the reference's Triton rint."""
    qmax = (1 << bits) - 1
    lo, hi = x.min(axis=1), x.max(axis=1)
    step = np.maximum((hi - lo) / qmax, 1e-10)
    t = (x - lo[:, None]) / step[:, None]
    return np.clip(np.rint(t), 0, qmax).astype(np.int64), step, lo, t


def spec_store_tile(k_rot: np.ndarray, v_rot: np.ndarray, kb: int, vb: int):
    """Rotated fp16 K, V of one tile [G, D] -> (record, unrounded code positions)."""
    g, d = k_rot.shape
    m = k_rot.astype(np.float64).T                                   # [D, G]
    s_col, s_row = spec_normalize(m)
    k_codes, k_step, k_lo, k_t = spec_round(m / s_col[None, :] / s_row[:, None], kb)
    f = {"k_codes": k_codes, "k_scale": k_step * s_row, "k_zero": k_lo * s_row, "k_tok": s_col}
    m = v_rot.astype(np.float64)                                     # [G, D]
    s_col, s_row = spec_normalize(m)
    v_codes, v_step, v_lo, v_t = spec_round(m / s_col[None, :] / s_row[:, None], vb)
    f.update({"v_codes": v_codes, "v_chan": s_col, "v_scale": v_step * s_row, "v_zero": v_lo * s_row})
    return write_record(f, d, g, kb, vb), {"k_codes": k_t, "v_codes": v_t}


def fp16_ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def ordered(x):
        u = np.asarray(x, "<f2").view(np.uint16).astype(np.int64)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)
    return np.abs(ordered(a) - ordered(b))


def blocks(n, g, h, d, seed, outliers=True):
    """fp16 K/V blocks [n, G, H, D]; K with a few x50 channels (like real keys)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, g, h, d, generator=gen)
    v = torch.randn(n, g, h, d, generator=gen)
    if outliers:
        k[..., torch.randperm(d, generator=gen)[:3]] *= 50
    return k.half(), v.half()


def spec_rotate_fp16(x: torch.Tensor) -> torch.Tensor:
    """x @ H exactly (float64), rounded once to fp16: the cache frame."""
    return torch.from_numpy((x.double().numpy() @ spec_hadamard(x.shape[-1])).astype(np.float16))


ALL_CFGS = [(name, d) for name in SPEC_PRESETS for d in HEAD_DIMS]


# --- presets and sizes ----------------------------------------------------------------

def test_preset_table_is_the_spec():
    assert PRESETS == SPEC_PRESETS
    assert DEFAULT_PRESET == "kvarn_k4v2_g128"
    assert set(KV_CACHE_DTYPES) == {"auto", *SPEC_PRESETS}
    assert not is_kvarn("auto") and all(is_kvarn(n) for n in SPEC_PRESETS)
    for name, (kb, vb, g) in SPEC_PRESETS.items():
        cfg = KVarNConfig.from_name(name, 128)
        assert (cfg.k_bits, cfg.v_bits, cfg.group_size, cfg.head_dim) == (kb, vb, g, 128)
        assert (cfg.norm_iters, cfg.rotate, cfg.normalize, cfg.log_clip) == (8, True, True, (-0.3, 10.0))


@pytest.mark.parametrize("name, d, nbytes, ratio", [
    ("kvarn_k4v2_g128", 128, 13_824, 4.74),
    ("kvarn_k4v4_g128", 128, 17_920, 3.66),
    ("kvarn_k4v2_g64", 128, 7_296, 4.49),
    ("kvarn_k4v2_g128", 64, 7_296, 4.49),
])
def test_spec_sizes(name, d, nbytes, ratio):
    cfg = KVarNConfig.from_name(name, d)
    assert cfg.record_bytes == nbytes
    assert round(cfg.compression_ratio, 2) == ratio
    assert cfg.compression_ratio == pytest.approx(2 * 2 * cfg.group_size * d / nbytes)


def test_default_preset_per_token_numbers():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    assert cfg.bytes_per_token_per_head == 108
    assert cfg.bits_per_element == 3.375
    assert cfg.k_row_bytes == 64 and cfg.v_row_bytes == 32


@pytest.mark.parametrize("name, d", ALL_CFGS)
def test_layout_matches_spec_table(name, d):
    kb, vb, g = SPEC_PRESETS[name]
    layout, end, record_bytes = spec_layout(d, g, kb, vb)
    cfg = KVarNConfig.from_name(name, d)
    assert cfg.record_bytes % 8 == 0
    assert cfg.record_bytes == record_bytes
    # every field is a multiple of 8 bytes (2D, 2G >= 128; code blocks D*G*b/8), so no
    # supported preset x head_dim has padding: the spec's zero pad is always empty
    assert end == record_bytes
    assert {f: cfg.offsets[f] for f in FIELDS} == {f: off for f, (off, _) in layout.items()}
    assert cfg.offsets["end"] == end
    # the ablation knobs change contents, never the layout
    ab = cfg.with_options(rotate=False, normalize=False, norm_iters=2)
    assert (ab.record_bytes, ab.offsets) == (cfg.record_bytes, cfg.offsets)


def test_head_dim_256_pads_to_8_only():
    # the reference pads k4v4 D=256 to a power-of-two slot; the spec pads to 8 bytes only
    cfg = KVarNConfig.from_name("kvarn_k4v4_g128", 256)
    assert cfg.record_bytes == 128 * 256 // 2 * 2 + 2 * 256 * 3 + 2 * 128 * 3 == 35_072


# --- errors ---------------------------------------------------------------------------

def test_unknown_preset_lists_supported_names():
    for bad in ("kvarn_k2v2_g128", "auto", "fp8", ""):
        with pytest.raises(ValueError) as e:
            KVarNConfig.from_name(bad, 128)
        assert all(name in str(e.value) for name in SPEC_PRESETS)


@pytest.mark.parametrize("d", [32, 96, 512, 0])
def test_unsupported_head_dim_mentions_supported(d):
    with pytest.raises(ValueError, match=r"64, 128, 256"):
        KVarNConfig.from_name(DEFAULT_PRESET, d)


def test_bad_config_knobs():
    with pytest.raises(ValueError):
        KVarNConfig(name="x", k_bits=3, v_bits=2, group_size=128, head_dim=128)
    with pytest.raises(ValueError):
        KVarNConfig(name="x", k_bits=4, v_bits=2, group_size=32, head_dim=128)
    with pytest.raises(ValueError):
        KVarNConfig.from_name(DEFAULT_PRESET, 128, norm_iters=-1)


# --- reading records with the spec's reader ---------------------------------------------

@pytest.mark.parametrize("name, d", ALL_CFGS)
def test_independent_reader_equals_dequantize(name, d):
    kb, vb, g = SPEC_PRESETS[name]
    cfg = KVarNConfig.from_name(name, d)
    n, h = 2, 2
    k, v = blocks(n, g, h, d, seed=d + g)
    rec = quantize_blocks(k, v, cfg)
    assert rec.dtype == torch.uint8 and rec.shape == (n, h, cfg.record_bytes)
    k_deq, v_deq = dequantize_blocks(rec, cfg)                       # fp16, original frame
    k_rot_deq, v_rot_deq = dequantize_rotated_blocks(rec, cfg)       # fp32, rotated frame
    had = spec_hadamard(d)
    recs = rec.numpy()
    for i in range(n):
        for j in range(h):
            r = recs[i, j]
            f = read_record(r, d, g, kb, vb)
            assert f["k_codes"].max() <= (1 << kb) - 1 and f["v_codes"].max() <= (1 << vb) - 1
            # a real tile uses the whole code range of every row (lo and hi are in the row)
            assert (f["k_codes"].min(1) == 0).all() and (f["k_codes"].max(1) == (1 << kb) - 1).all()
            assert (f["v_codes"].min(1) == 0).all() and (f["v_codes"].max(1) == (1 << vb) - 1).all()
            k_rot, v_rot = reconstruct(f)
            for mine, theirs in ((k_rot, k_rot_deq[i, :, j]), (v_rot, v_rot_deq[i, :, j])):
                # both are the same products of the same fp16 numbers: fp32 rounding only
                scale = np.abs(mine).max()
                np.testing.assert_allclose(theirs.numpy(), mine, rtol=0, atol=2e-6 * scale)
            for mine, theirs in ((k_rot @ had, k_deq[i, :, j]), (v_rot @ had, v_deq[i, :, j])):
                # un-rotated in fp32 then stored as fp16: half an fp16 ulp plus fp32 noise
                err = np.abs(theirs.double().numpy() - mine)
                assert (err <= 2.0 ** -11 * np.abs(mine) + 1e-5 * np.abs(mine).max()).all()
            # and it decodes to the input, up to quantization error (test_quant bounds it
            # tightly; with x50 outlier channels on Hadamard row 0 it can reach ~0.35)
            for orig, rot in ((k[i, :, j], k_rot), (v[i, :, j], v_rot)):
                x = orig.double().numpy()
                assert np.linalg.norm(rot @ had - x) < 0.6 * np.linalg.norm(x)


def test_reader_hand_record():
    """A record written byte by byte from the spec, read back by dequantize_rotated_blocks."""
    d, g, kb, vb = 64, 64, 4, 2
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", d)
    layout, _, record_bytes = spec_layout(d, g, kb, vb)
    rec = np.zeros(record_bytes, np.uint8)
    # K: channel 3, token 5 -> byte 3*32 + 2, high nibble; code 9, k_scale 0.5, k_zero -1, k_tok 2
    rec[3 * 32 + 2] = 9 << 4
    rec[layout["k_scale"][0] + 2 * 3:][:2] = np.array([0.5], "<f2").view(np.uint8)
    rec[layout["k_zero"][0] + 2 * 3:][:2] = np.array([-1.0], "<f2").view(np.uint8)
    rec[layout["k_tok"][0] + 2 * 5:][:2] = np.array([2.0], "<f2").view(np.uint8)
    # V: token 7, channel 6 -> byte V_base + 7*16 + 1, bits 4..5; code 3, v_scale 0.25, v_chan 4
    rec[layout["v_codes"][0] + 7 * 16 + 1] = 3 << 4
    rec[layout["v_scale"][0] + 2 * 7:][:2] = np.array([0.25], "<f2").view(np.uint8)
    rec[layout["v_chan"][0] + 2 * 6:][:2] = np.array([4.0], "<f2").view(np.uint8)
    k_rot, v_rot = dequantize_rotated_blocks(torch.from_numpy(rec).reshape(1, 1, -1), cfg)
    k_exp = np.zeros((g, d))
    k_exp[5, 3] = (9 * 0.5 - 1.0) * 2.0                             # other tokens have k_tok 0
    v_exp = np.zeros((g, d))
    v_exp[7, 6] = 3 * 0.25 * 4.0
    np.testing.assert_array_equal(k_rot[0, :, 0].numpy(), k_exp)
    np.testing.assert_array_equal(v_rot[0, :, 0].numpy(), v_exp)


# --- writing records with the spec's pipeline -----------------------------------------

def compare_records(mine: np.ndarray, theirs: np.ndarray, d, g, kb, vb, t_mine=None):
    """Byte differences, classified per field. Returns the number of differing bytes."""
    fm, ft = read_record(mine, d, g, kb, vb), read_record(theirs, d, g, kb, vb)
    for name in FP16_FIELDS:
        # float64 vs fp32 arithmetic before the fp16 cast: at most one fp16 ulp apart
        assert fp16_ulp_distance(fm[name], ft[name]).max() <= 1, name
    for name in ("k_codes", "v_codes"):
        diff = fm[name] != ft[name]
        assert (np.abs(fm[name] - ft[name]) <= 1).all(), name
        if t_mine is not None and diff.any():
            # a code may only flip where (x - lo)/step sits on a rounding tie
            frac = t_mine[name][diff] % 1.0
            assert (np.abs(frac - 0.5) < 1e-4).all(), (name, frac)
    return int((mine != theirs).sum())


STORE_CASES = [(name, d) for name in SPEC_PRESETS for d in (64, 128)] + [(DEFAULT_PRESET, 256)]


def test_store_pipeline_byte_identical_from_rotated_frame():
    """The spec's store pipeline in float64 vs quantize_rotated_blocks (fp32) on 27 tiles.

    Measured (these seeds): 24 of 27 records byte-identical; three differ in one byte
    each (a v_scale, two k_tok). Over a sweep of 288 tiles: 277 identical, at most 2
    bytes per record. Every difference is an fp16 scale one ulp apart (the float64 and
    fp32 values land on different sides of an fp16 rounding boundary) or a code off by
    one at a rounding tie. Expected rate: each of the 3D+3G fp16 values is within fp32
    noise (~1e-7 relative) of an fp16 rounding boundary (spacing 2^-11 relative) with
    probability ~1e-4, i.e. ~0.1 flipped byte pairs per record. The bound asserted
    leaves room for a different fp32 reduction order (another CPU, thread count); a
    change of method (e.g. a lost best-so-far selection) moves hundreds of bytes and
    more than one ulp, which compare_records rejects.
    """
    total_diff, identical, tiles = 0, 0, 0
    for ci, (name, d) in enumerate(STORE_CASES):
        kb, vb, g = SPEC_PRESETS[name]
        cfg = KVarNConfig.from_name(name, d)
        k, v = blocks(1, g, 3, d, seed=100 + ci)
        k_rot, v_rot = spec_rotate_fp16(k), spec_rotate_fp16(v)
        rec = quantize_rotated_blocks(k_rot, v_rot, cfg).numpy()
        for j in range(3):
            mine, t = spec_store_tile(k_rot[0, :, j].numpy(), v_rot[0, :, j].numpy(), kb, vb)
            assert mine.shape == (cfg.record_bytes,)
            nd = compare_records(mine, rec[0, j], d, g, kb, vb, t)
            assert nd <= 2
            total_diff += nd
            identical += nd == 0
            tiles += 1
    assert tiles == 27
    assert identical >= 20 and total_diff <= 10, (identical, total_diff)


def test_store_pipeline_from_original_frame():
    """quantize_blocks (rotation in fp32, then fp16) vs the spec: exact x@H rounded once.

    The package's fp32 matmul rounds twice (fp32, then fp16): about 0.1% of the rotated
    fp16 values differ by one ulp from the exactly rounded product (more with x50 outlier
    channels, whose large partial sums carry larger fp32 error). Records still agree up to
    a few one-ulp scales or off-by-one codes. Measured: 14 of 18 records identical, 5
    differing bytes in all (k_zero, k_scale, k_zero, one V code, one K code).
    """
    total_diff, identical = 0, 0
    for ci, (name, d) in enumerate(STORE_CASES):
        kb, vb, g = SPEC_PRESETS[name]
        cfg = KVarNConfig.from_name(name, d)
        k, v = blocks(1, g, 2, d, seed=200 + ci)
        rec = quantize_blocks(k, v, cfg).numpy()
        k_rot, v_rot = spec_rotate_fp16(k), spec_rotate_fp16(v)
        for src, mine, theirs in ((k, k_rot, rotate(k, torch.float16)), (v, v_rot, rotate(v, torch.float16))):
            # fp16(fp32 sum) vs fp16(exact): two half-ulps plus the fp32 sum's error,
            # bounded by D * 2^-24 * sum_i |x_i| / sqrt(D) (large only where outliers cancel)
            x, y, z = mine.double().numpy(), theirs.double().numpy(), src.double().numpy()
            e32 = d * 2.0 ** -24 * np.abs(z).sum(-1, keepdims=True) / np.sqrt(d)
            assert (np.abs(x - y) <= 2.0 ** -10 * np.abs(x) + e32).all()
            ulps = fp16_ulp_distance(mine.numpy(), theirs.numpy())
            assert (ulps > 0).mean() < 0.005 and (ulps > 1).mean() < 0.0005
        for j in range(2):
            mine, _ = spec_store_tile(k_rot[0, :, j].numpy(), v_rot[0, :, j].numpy(), kb, vb)
            nd = compare_records(mine, rec[0, j], d, g, kb, vb)
            assert nd <= 4
            total_diff += nd
            identical += nd == 0
    assert identical >= 12 and total_diff <= 12, (identical, total_diff)


def test_store_pipeline_detects_a_wrong_field():
    """The comparison above is not vacuous: a swapped pair of fp16 fields is caught."""
    name, d = DEFAULT_PRESET, 64
    kb, vb, g = SPEC_PRESETS[name]
    k, v = blocks(1, g, 1, d, seed=7)
    k_rot, v_rot = spec_rotate_fp16(k), spec_rotate_fp16(v)
    mine, _ = spec_store_tile(k_rot[0, :, 0].numpy(), v_rot[0, :, 0].numpy(), kb, vb)
    layout, _, _ = spec_layout(d, g, kb, vb)
    bad = mine.copy()
    (o1, n1), (o2, _) = layout["k_scale"], layout["k_zero"]
    bad[o1:o1 + n1], bad[o2:o2 + n1] = mine[o2:o2 + n1], mine[o1:o1 + n1]
    with pytest.raises(AssertionError):
        compare_records(mine, bad, d, g, kb, vb)
