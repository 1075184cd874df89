"""The Gluon record kernel (kvarn/kernels/decode_gluon.py, ``kernel="gluon"``) against the
torch reference, GPU only: Gluon has no CPU interpreter, so these tests cannot run in
CPU CI (the Triton kernel, which covers every preset, is the one the interpreter tests).

Same oracle and tolerance as test_decode_attention.py: within twice the error of the
computation done in torch with fp16 inputs.
"""
from __future__ import annotations

import pytest
import torch

from kvarn.format import KVarNConfig
from kvarn.kernels.decode_attention import gluon_supported, paged_decode_attention

from test_decode_attention import build_paged_cache, run_case  # noqa: E402  (same folder)

# lengths: 1 (sink only), G-1, G, G+1 (tail), 2G+1 (the first record), 2G+2, many records,
# ragged; splits: default, 1, more splits than some sequences have records
GLUON_CASES = [
    (4, [1, 127, 128, 129, 257, 258, 4096, 16385], None),
    (1, [300, 5000, 129], 1),
    (3, [9999, 2000, 1, 640], 7),
    (8, [8192, 257], 3),
    (7, [3000], 64),
]


# head_dim 64 (half-word V loads, a 64-row accumulator) and 256 (two 128-channel halves)
GLUON_DIM_CASES = [
    (64, 3, [1, 129, 257, 4000, 16385], None),
    (64, 1, [2000, 300], 5),
    (64, 8, [9999, 640], None),
    (256, 4, [1, 129, 257, 4000, 16385], None),
    (256, 2, [3000, 300], 6),
    (256, 7, [5000], None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("qh,lens,splits", GLUON_CASES)
def test_gluon_decode_matches_reference(qh, lens, splits):
    run_case("kvarn_k4v2_g128", 128, qh, lens, splits, hkv=4, seed=11, kernel="gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("d,qh,lens,splits", GLUON_DIM_CASES)
def test_gluon_decode_other_head_dims(d, qh, lens, splits):
    run_case("kvarn_k4v2_g128", d, qh, lens, splits, hkv=3, seed=13, kernel="gluon")


# the fp16 sink/tail as chunked partials (GLUON_FP16_CHUNKS, NOTES.md attempt 29): 32-key
# chunks at small batches; 12 x 4 sequences x KV heads take the fp16 sub-tile instead
CHUNK_CASES = [
    (128, 4, [1, 127, 128, 129, 256, 257, 4096, 16385], None),
    (128, 8, [9999, 2000, 1, 640] * 3, 5),
    (64, 3, [1, 129, 257, 4000, 16385], None),
    (256, 4, [3000, 300, 129], 6),
]


@pytest.mark.gpu
@pytest.mark.parametrize("d,qh,lens,splits", CHUNK_CASES)
def test_gluon_decode_fp16_chunks(d, qh, lens, splits, monkeypatch):
    from kvarn.kernels import decode_attention
    monkeypatch.setattr(decode_attention, "GLUON_FP16_CHUNKS", True)
    run_case("kvarn_k4v2_g128", d, qh, lens, splits, hkv=4, seed=17, kernel="gluon")


# the code unpack with and without the fp16 magic number (GLUON_RAW, NOTES.md attempt 50:
# subnormal codes into the MMA, rescaled per row after it), both ways whatever the
# default; every head dim, the PAIR loop at D 128, odd and even tokens / all four V
# channel positions (every length covers them)
RAW_CASES = [
    (128, 4, [1, 129, 257, 258, 4096, 16385], None, False),
    (128, 8, [9999, 2000, 1, 640], 3, False),
    (128, 1, [5000, 385], 1, True),
    (64, 3, [1, 257, 4000, 16385], None, False),
    (64, 3, [3000, 385], 5, True),
    (256, 4, [1, 129, 257, 4000, 16385], None, False),
    (256, 7, [3000, 300], 6, False),
]


# the record loop's variants: (GLUON_RAW, GLUON_QMMA) — attempt 52's hoisted q and
# sum_d q kz by MMA need the raw codes
UNPACKS = {"centered": (False, False), "raw": (True, False), "raw_qmma": (True, True)}


def _set_unpack(monkeypatch, unpack, pair, kall=False):
    from kvarn.kernels import decode_attention
    raw, qmma = UNPACKS[unpack]
    monkeypatch.setattr(decode_attention, "GLUON_RAW", raw)
    monkeypatch.setattr(decode_attention, "GLUON_QMMA", qmma)
    monkeypatch.setattr(decode_attention, "GLUON_KALL", kall)
    monkeypatch.setattr(decode_attention, "GLUON_PAIR", pair)


@pytest.mark.gpu
@pytest.mark.parametrize("unpack", list(UNPACKS))
@pytest.mark.parametrize("d,qh,lens,splits,pair", RAW_CASES)
def test_gluon_decode_raw_codes(d, qh, lens, splits, pair, unpack, monkeypatch):
    _set_unpack(monkeypatch, unpack, pair)
    run_case("kvarn_k4v2_g128", d, qh, lens, splits, hkv=3, seed=29, kernel="gluon")


# a record's K words in one batch of loads (GLUON_KALL, attempt 51; head_dim 128 only)
@pytest.mark.gpu
@pytest.mark.parametrize("unpack", list(UNPACKS))
@pytest.mark.parametrize("d,qh,lens,splits,pair", [c for c in RAW_CASES if c[0] == 128])
def test_gluon_decode_raw_kall(d, qh, lens, splits, pair, unpack, monkeypatch):
    _set_unpack(monkeypatch, unpack, pair, kall=True)
    run_case("kvarn_k4v2_g128", d, qh, lens, splits, hkv=3, seed=37, kernel="gluon")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gluon_raw_agrees_with_centered_codes(d, monkeypatch):
    """The unpacks compute the same sums in fp32 from fp16 operands (QMMA rounds q * ks
    once more: fp16 q * qk_scale, then the fp16 product), so the outputs agree far inside
    the reference bound."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", d)
    lens = [1, 300, 4097, 20000]
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * len(lens), 2, d, 128, seed=31)
    q = torch.randn(len(lens), 8, d, generator=torch.Generator().manual_seed(32)).half().cuda()
    outs = []
    for unpack in UNPACKS:
        _set_unpack(monkeypatch, unpack, False)
        outs.append(paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="gluon").float())
    scale = outs[0].abs().max().item()
    for o in outs[1:]:
        assert torch.isfinite(o).all()
        assert (o - outs[0]).abs().max().item() <= 2e-3 * scale


def _captured(lens, seed):
    """A k4v2_g128 D-128 cache of these lengths (4 KV heads, 16 query heads) and a CUDA
    graph of one kernel="gluon" decode call into out (run once before the capture)."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * len(lens), 4, 128, 128, seed=seed)
    q = torch.randn(len(lens), 16, 128, device="cuda").half()
    out = torch.empty_like(q)
    paged_decode_attention(q, kv, records, bt, ctx, cfg, out=out, kernel="gluon")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, kv, records, bt, ctx, cfg, out=out, kernel="gluon")
    return cfg, q, kv, records, bt, ctx, out, graph


# the PAIR loop (GLUON_PAIR, session 8): two records per iteration, the second masked when
# a split holds an odd count (lengths 257: one record, 385: two, 513: three); D 256 falls
# back to the one-record loop
PAIR_CASES = [
    (128, 4, [1, 129, 257, 385, 513, 4096, 16385], None),
    (128, 8, [9999, 2000, 1, 640], 3),
    (128, 1, [5000, 385], 1),
    (64, 3, [1, 257, 385, 513, 4000, 16385], None),
    (64, 3, [3000, 300], 5),
    (256, 4, [3000, 385], None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("d,qh,lens,splits", PAIR_CASES)
def test_gluon_decode_pair(d, qh, lens, splits, monkeypatch):
    from kvarn.kernels import decode_attention
    monkeypatch.setattr(decode_attention, "GLUON_PAIR", True)
    run_case("kvarn_k4v2_g128", d, qh, lens, splits, hkv=3, seed=23, kernel="gluon")


# the fp16 part on a second stream (GLUON_SIDE_STREAM=True: always, also eagerly; session 8),
# with either fp16 path: against the reference, and captured in a CUDA graph (the fork
# and the join) and replayed with new q and lengths, bit-equal to the one-stream result
@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [False, True])
def test_gluon_decode_side_stream(chunks, monkeypatch):
    from kvarn.kernels import decode_attention
    monkeypatch.setattr(decode_attention, "GLUON_SIDE_STREAM", True)
    monkeypatch.setattr(decode_attention, "GLUON_FP16_CHUNKS", chunks)
    run_case("kvarn_k4v2_g128", 128, 4, [1, 129, 257, 4096, 16385], None, hkv=4, seed=19, kernel="gluon")
    cfg, q, kv, records, bt, ctx, out, graph = _captured([3000, 129, 5000, 1, 40000], seed=6)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        ctx.copy_(torch.tensor([3000 - step, 129, 5000, 0, 40000 - 7 * step], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(decode_attention, "GLUON_SIDE_STREAM", False)
        expect = paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="gluon")
        monkeypatch.setattr(decode_attention, "GLUON_SIDE_STREAM", True)
        assert torch.equal(out, expect), step
        assert (out[3] == 0).all()


@pytest.mark.gpu
def test_gluon_decode_agrees_with_triton_kernel():
    """Both kernels on one cache: the same attention up to fp16 rounding order."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    lens = [5000, 129, 1, 12000]
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * 4, 8, 128, 128, seed=2)
    q = torch.randn(4, 32, 128, device="cuda").half()
    a = paged_decode_attention(q, kv, records, bt, ctx, cfg).float()
    b = paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="gluon").float()
    assert (a - b).norm() <= 2e-3 * a.norm()


@pytest.mark.gpu
def test_gluon_decode_cuda_graph_replay_and_padding_rows():
    """Captures in a CUDA graph; a context-0 padding row comes out as zeros."""
    cfg, q, kv, records, bt, ctx, out, graph = _captured([3000, 129, 5000, 1], seed=5)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([2999, 129, 0, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expect = paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="gluon")
    assert torch.equal(out, expect)
    assert (out[2] == 0).all() and torch.isfinite(out).all()


def test_gluon_scope_is_checked():
    """Outside its scope the Gluon path refuses with a ValueError (CPU, other presets)."""
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    kv, records, bt, ctx = build_paged_cache(cfg, [70], [1], 1, 64, 64)
    q = torch.randn(1, 2, 64).half().to(kv.device)
    assert not gluon_supported(q, cfg, 2)
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="gluon")
    with pytest.raises(ValueError):
        paged_decode_attention(q, kv, records, bt, ctx, cfg, kernel="cuda")


def test_side_stream_modes():
    """KVARN_GLUON_SIDE_STREAM: 1 / True always, 0 / False never, graph (the default) only
    while a CUDA graph is being captured; anything else is refused."""
    from kvarn.kernels.decode_attention import GLUON_SIDE_STREAM, side_stream_on
    assert GLUON_SIDE_STREAM in ("graph", "1", "0")
    for mode, expect in [("1", (True, True)), (True, (True, True)), ("0", (False, False)),
                         (False, (False, False)), ("graph", (False, True))]:
        assert (side_stream_on(mode, False), side_stream_on(mode, True)) == expect, mode
    with pytest.raises(ValueError):
        side_stream_on("yes", False)


def _chained(cfg, q0, kv, records, bt, ctx, steps, kernel, pdl, graph):
    """``steps`` decode calls, each one's output the next one's query (so a kernel that
    read q before the previous call finished would read stale values), eagerly or as one
    captured CUDA graph replayed once; returns every step's output."""
    outs = [torch.empty_like(q0) for _ in range(steps)]
    q = q0.clone()

    def run():
        src = q
        for o in outs:
            paged_decode_attention(src, kv, records, bt, ctx, cfg, out=o, kernel=kernel, pdl=pdl)
            src = o
    run()                                    # compiles outside any capture
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        for o in outs:
            o.zero_()
        g.replay()
    torch.cuda.synchronize()
    return torch.stack(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,d,chunks,side", [("gluon", 128, True, "graph"), ("gluon", 128, True, "1"),
                                                  ("gluon", 64, False, "0"), ("gluon", 256, True, "0"),
                                                  ("triton", 128, None, None)])
def test_pdl_matches_plain_launch(kernel, d, chunks, side, monkeypatch):
    """Programmatic dependent launch (KVARN_PDL) changes when kernels start, never what
    they compute: eight chained calls (each output the next query) with and without it,
    eagerly and replayed from a CUDA graph, bit for bit."""
    from kvarn.kernels import decode_attention
    if not decode_attention.pdl_on(torch.device("cuda"), True):
        pytest.skip("PDL needs compute capability 9 or more")
    if chunks is not None:
        monkeypatch.setattr(decode_attention, "GLUON_FP16_CHUNKS", chunks)
    if side is not None:
        monkeypatch.setattr(decode_attention, "GLUON_SIDE_STREAM", side)
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", d)
    lens = [3000, 129, 40000, 1, 700]
    kv, records, bt, ctx = build_paged_cache(cfg, lens, [1] * len(lens), 4, d, 128, seed=23)
    q0 = torch.randn(len(lens), 16, d, device="cuda").half()
    plain = _chained(cfg, q0, kv, records, bt, ctx, 8, kernel, False, graph=False)
    assert torch.isfinite(plain).all()
    for graph in (False, True):
        got = _chained(cfg, q0, kv, records, bt, ctx, 8, kernel, True, graph=graph)
        assert torch.equal(got, plain), graph


def test_pdl_modes():
    """KVARN_PDL: 1 / True on (CUDA, compute capability 9+, a Triton whose launcher takes
    launch_pdl), 0 / False off; anything
    else is refused; on the CPU a decode call with pdl=True runs the plain launch."""
    from kvarn.kernels.decode_attention import PDL, _triton_launches_pdl, pdl_on
    assert PDL in ("0", "1")
    cpu = torch.device("cpu")
    assert not pdl_on(cpu, "1") and not pdl_on(cpu, True) and not pdl_on(cpu, "0")
    with pytest.raises(ValueError):
        pdl_on(cpu, "yes")
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        assert pdl_on(torch.device("cuda"), "1") == (major >= 9 and _triton_launches_pdl())
        assert not pdl_on(torch.device("cuda"), False)
    if not torch.cuda.is_available():
        cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
        kv, records, bt, ctx = build_paged_cache(cfg, [70, 200], [1, 1], 1, 64, 64)
        q = torch.randn(2, 2, 64).half()
        a = paged_decode_attention(q, kv, records, bt, ctx, cfg, num_splits=2, pdl=True)
        b = paged_decode_attention(q, kv, records, bt, ctx, cfg, num_splits=2, pdl=False)
        assert torch.equal(a, b)
