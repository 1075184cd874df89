"""paged_decode_attention against the torch reference (kvarn/kernels/reference.py).

CPU: the Triton interpreter at awkward small sizes (each program instance costs about
a millisecond there, so batches are small and blocks few). GPU (-m gpu): large shapes,
split-K, and capture in a CUDA graph.

Tolerance (STYLE.md): the kernel's error against an fp32 reference of the same paged
semantics must stay within about twice the error of the same computation done in
torch with fp16 inputs (q, K, V and P rounded to fp16, fp32 accumulation, fp16 output).
"""
from __future__ import annotations

import math

import pytest
import torch

from kvarn.format import KVarNConfig
from kvarn.kernels.decode_attention import paged_decode_attention
from kvarn.kernels.reference import gather_context, num_record_blocks, ref_paged_decode_attention
from kvarn.quant.attention import dense_attention
from kvarn.quant.records import quantize_rotated_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_paged_cache(cfg, lens, q_lens, hkv, d, g, seed=0, device=DEVICE, dtype=torch.float16):
    """A paged cache with shuffled physical ids: sequence b has lens[b] tokens, the last
    q_lens[b] of them new (fp16 blocks), full committed non-sink blocks as records."""
    gen = torch.Generator().manual_seed(seed)
    nb = [triton_cdiv(n, g) for n in lens]
    nfp, nrec = sum(nb) + 3, sum(nb) + 2
    # Per-channel offsets and spreads, like real K: exercises the zero points.
    chan_scale = torch.rand(d, generator=gen) * 2 + 0.2
    chan_bias = torch.randn(d, generator=gen)
    kv = (torch.randn(2, nfp, hkv, g, d, generator=gen) * chan_scale + chan_bias).to(dtype)
    records = None
    if cfg is not None:
        records = torch.randint(0, 256, (nrec, hkv, cfg.record_bytes), generator=gen, dtype=torch.uint8)
    width = max(nb) + 2
    bt = torch.randint(0, 7, (len(lens), width), generator=gen, dtype=torch.int32)
    fp_ids, rec_ids = torch.randperm(nfp, generator=gen), torch.randperm(nrec, generator=gen)
    fi = ri = 0
    for b, (n, t) in enumerate(zip(lens, q_lens)):
        n_rec = num_record_blocks(n - t, g) if cfg is not None else 0
        for i in range(nb[b]):
            if 1 <= i <= n_rec:
                k = (torch.randn(1, g, hkv, d, generator=gen) * chan_scale + chan_bias).half()
                v = torch.randn(1, g, hkv, d, generator=gen).half()
                records[rec_ids[ri]] = quantize_rotated_blocks(k, v, cfg)[0]
                bt[b, i] = rec_ids[ri]
                ri += 1
            else:
                bt[b, i] = fp_ids[fi]
                fi += 1
    ctx = torch.tensor(lens, dtype=torch.int32)
    to = (lambda x: None if x is None else x.to(device))
    return to(kv), to(records), to(bt), to(ctx)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def fp32_and_fp16_oracles(q, kv, records, bt, ctx, cu, cfg, scale):
    """(fp32 reference, fp16-input torch version) of ref_paged_attention's semantics."""
    ref = torch.empty(q.shape, dtype=torch.float32)
    t16 = torch.empty(q.shape, dtype=torch.float32)
    q, kv, bt = q.cpu(), kv.cpu(), bt.cpu()
    records = records.cpu() if records is not None else None
    for b in range(len(ctx)):
        qb = q[cu[b]:cu[b + 1]].float()
        k, v = gather_context(kv, records, bt[b], int(ctx[b]), qb.shape[0], cfg)
        ref[cu[b]:cu[b + 1]] = dense_attention(qb, k, v, scale)
        r16 = lambda x: x.half().float()                       # noqa: E731
        lq, hq, _ = qb.shape
        rep = hq // k.shape[1]
        s = torch.einsum("qhd,nhd->hqn", r16(qb * scale), r16(k).repeat_interleave(rep, 1))
        n = k.shape[0]
        mask = torch.arange(n)[None, :] > torch.arange(n - lq, n)[:, None]
        p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        t16[cu[b]:cu[b + 1]] = r16(torch.einsum("hqn,nhd->qhd", r16(p), r16(v).repeat_interleave(rep, 1)))
    return ref, t16


def assert_close_to_reference(out, ref, t16, factor=2.0):
    out = out.float().cpu()
    assert torch.isfinite(out).all()
    norm = ref.norm()
    err = (out - ref).norm() / norm
    err16 = (t16 - ref).norm() / norm
    assert err <= factor * err16 + 1e-5, f"kernel rel err {err:.3e} vs fp16 torch {err16:.3e}"


def run_case(preset, d, qh, lens, num_splits, hkv=2, seed=0, g_fp16=64, **launch):
    cfg = KVarNConfig.from_name(preset, d) if preset else None
    g = cfg.group_size if cfg else g_fp16
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * len(lens), hkv, d, g, seed=seed)
    q = torch.randn(len(lens), hkv * qh, d, generator=torch.Generator().manual_seed(seed + 1)).half().to(DEVICE)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention(q, kv, records, bt, ctx, cfg, num_splits=num_splits, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    cu = list(range(len(lens) + 1))
    ref, t16 = fp32_and_fp16_oracles(q, kv, records, bt, ctx, cu, cfg, 1.0 / math.sqrt(d))
    assert_close_to_reference(out, ref, t16)
    # ...and the reference op itself (fp16 output) agrees as closely
    ref_op = ref_paged_decode_attention(q.cpu(), kv.cpu(), None if records is None else records.cpu(),
                                        bt.cpu(), ctx.cpu(), cfg)
    assert (ref_op.float() - ref).norm() <= (out.float().cpu() - ref).norm() * 4 + 1e-3


# (preset, head_dim, GQA ratio, context lengths, num_splits). G=64 presets keep the
# interpreter fast; lengths cover 1, G-1, G, G+1, G+2 (the first record), several blocks.
CASES = [
    ("kvarn_k4v2_g64", 64, 3, [1, 63, 64, 65, 130, 200], 1),
    ("kvarn_k4v2_g64", 128, 1, [66, 129, 257], 3),
    ("kvarn_k4v4_g64", 128, 8, [2, 64, 195], 2),
    ("kvarn_k4v2_g128", 128, 3, [127, 128, 129, 258, 300], 2),
    ("kvarn_k4v4_g128", 64, 1, [390], 4),
    ("kvarn_k4v2_g64", 256, 3, [1, 131], 1),
    (None, 64, 3, [1, 63, 64, 65, 200], 1),
    (None, 128, 8, [130, 7], 3),
    (None, 256, 1, [65], 1),
]


@pytest.mark.parametrize("preset,d,qh,lens,splits", CASES)
def test_decode_matches_reference(preset, d, qh, lens, splits):
    run_case(preset, d, qh, lens, splits)


@pytest.mark.parametrize("preset,d,qh,lens,splits", [c for c in CASES if c[0]][:6:2] + [CASES[3]])
def test_decode_folded_scales_variant(preset, d, qh, lens, splits):
    """rec_deq=False (the default is True): scales and zeros folded into q and the
    reductions instead of applied to the codes in registers; the same accuracy bar."""
    run_case(preset, d, qh, lens, splits, rec_deq=False)


@pytest.mark.parametrize("preset,d,qh,lens,splits,rec_sub", [
    CASES[3] + (None,), CASES[4] + (None,), CASES[0] + (32,), CASES[5] + (32,)])
@pytest.mark.parametrize("prefetch", ["regs", None])
def test_decode_joint_record_softmax_variant(preset, d, qh, lens, splits, rec_sub, prefetch):
    """rec_joint=True: one softmax update per two-piece record, the row sums kept as a
    per-element partial until after the record loop; the same accuracy bar. prefetch:
    the next record's scale fields loaded into registers a record ahead, or not at all
    (the default "l1" hint is PTX, GPU only: test_decode_gpu_large_joint_flag)."""
    run_case(preset, d, qh, lens, splits, rec_joint=True, rec_sub=rec_sub, prefetch=prefetch)


def test_decode_zero_length_rows_are_zero():
    """CUDA-graph padding rows (context 0) come out finite (zeros), not garbage."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    kv, records, bt, ctx = build_paged_cache(cfg, [70, 1], [1, 1], 1, 64, 64)
    ctx[1] = 0
    q = torch.randn(2, 2, 64).half().to(DEVICE)
    for splits in (1, 2):
        out = paged_decode_attention(q, kv, records, bt, ctx, cfg, num_splits=splits)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_decode_rejects_bad_arguments():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    kv, records, bt, ctx = build_paged_cache(cfg, [70], [1], 1, 64, 64)
    q = torch.randn(1, 2, 64).half().to(DEVICE)
    with pytest.raises(TypeError):
        paged_decode_attention(q.float(), kv, records, bt, ctx, cfg)
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, records, bt.long(), ctx, cfg)
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, None, bt, ctx, cfg)
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, records, bt, ctx, None)
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, records, bt, ctx, KVarNConfig.from_name("kvarn_k4v2_g128", 64))


# --- GPU: large shapes, split-K, CUDA graphs -----------------------------------------

GPU_CASES = [
    ("kvarn_k4v2_g128", 128, 4, [4096, 1, 127, 128, 129, 16385, 3000, 9999], None),
    ("kvarn_k4v4_g128", 128, 4, [8192, 5000], 7),
    ("kvarn_k4v2_g64", 64, 3, [4095, 64, 65, 12345], None),
    ("kvarn_k4v4_g64", 256, 4, [3333, 8192], None),
    ("kvarn_k4v2_g128", 256, 8, [20000, 1], 16),
    (None, 128, 4, [16384, 1, 129, 7777], None),
    (None, 64, 3, [4096, 65], 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d,qh,lens,splits", GPU_CASES)
def test_decode_gpu_large(preset, d, qh, lens, splits):
    run_case(preset, d, qh, lens, splits, hkv=4, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d,qh,lens,splits", [c for c in GPU_CASES if c[0]])
def test_decode_gpu_large_folded_scales(preset, d, qh, lens, splits):
    run_case(preset, d, qh, lens, splits, hkv=4, seed=3, rec_deq=False)


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d,qh,lens,splits", [c for c in GPU_CASES if c[0]])
@pytest.mark.parametrize("joint,prefetch", [(True, "l1"), (True, "regs"), (True, None), (False, "l1")])
def test_decode_gpu_large_joint_flag(preset, d, qh, lens, splits, joint, prefetch):
    """Both settings of rec_joint at large shapes (it applies where a record is two pieces),
    the joint path under each prefetch mode of the next record's scale fields."""
    run_case(preset, d, qh, lens, splits, hkv=4, seed=5, rec_joint=joint, prefetch=prefetch)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """No host sync inside: the call captures in a CUDA graph and replays on new inputs."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    lens = [3000, 129, 5000, 1]
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * 4, 4, 128, 128, seed=5)
    q = torch.randn(4, 16, 128, device="cuda").half()
    out = torch.empty_like(q)
    paged_decode_attention(q, kv, records, bt, ctx, cfg, out=out)     # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, kv, records, bt, ctx, cfg, out=out)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([2999, 129, 4000, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expect = paged_decode_attention(q, kv, records, bt, ctx, cfg)
    assert torch.equal(out, expect)
