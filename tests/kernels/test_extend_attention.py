"""paged_extend_attention against the torch reference (kvarn/kernels/reference.py).

Varlen new tokens over a partly quantized prefix: first chunks (no prefix), chunks
that start mid-block, decode-like single tokens, prefixes with records. Tolerance as
in test_decode_attention.py (about twice the error of torch with fp16 inputs).
"""
from __future__ import annotations

import math

import pytest
import torch

from kvarn.format import KVarNConfig
import kvarn.kernels.extend_attention as ext
from kvarn.kernels.extend_attention import extend_launch, paged_extend_attention
from kvarn.kernels.reference import ref_paged_attention
from test_decode_attention import (  # noqa: E402  (same folder; pytest puts it on sys.path)
    DEVICE,
    assert_close_to_reference,
    build_paged_cache,
    fp32_and_fp16_oracles,
)


def run_case(preset, d, qh, lens, q_lens, block_m=None, hkv=2, seed=0, g_fp16=64, num_warps=None,
             num_stages=None, check_ref_op=True, kernel=None, workspace=None, rec_joint=None):
    cfg = KVarNConfig.from_name(preset, d) if preset else None
    g = cfg.group_size if cfg else g_fp16
    kv, records, bt, ctx = build_paged_cache(cfg, lens, q_lens, hkv, d, g, seed=seed)
    cu = [0]
    for t in q_lens:
        cu.append(cu[-1] + t)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q = torch.randn(cu[-1], hkv * qh, d, generator=torch.Generator().manual_seed(seed + 1)).half().to(DEVICE)
    out = paged_extend_attention(q, kv, records, bt, ctx, cu_t, cfg, block_m=block_m,
                                 max_q_len=max(q_lens) if seed % 2 else None,
                                 num_warps=num_warps, num_stages=num_stages, kernel=kernel,
                                 workspace=workspace, rec_joint=rec_joint)
    ref, t16 = fp32_and_fp16_oracles(q, kv, records, bt, ctx, cu, cfg, 1.0 / math.sqrt(d))
    assert_close_to_reference(out, ref, t16)
    if not check_ref_op:       # the reference op does not depend on the kernel's launch
        return
    ref_op = ref_paged_attention(q.cpu(), kv.cpu(), None if records is None else records.cpu(),
                                 bt.cpu(), ctx.cpu(), cu_t.cpu(), cfg)
    assert (ref_op.float() - ref).norm() <= (out.float().cpu() - ref).norm() * 4 + 1e-3


# (preset, head_dim, GQA ratio, context lengths N, new tokens T, BLOCK_M)
CASES = [
    # first chunk (prefix 0, all fp16, causal inside blocks), a chunk starting mid-block
    # after records, one token after records, a chunk exactly filling a block
    ("kvarn_k4v2_g64", 64, 3, [70, 200, 130, 128], [70, 45, 1, 64], 32),
    ("kvarn_k4v4_g64", 128, 8, [1, 66, 191], [1, 2, 60], 16),
    ("kvarn_k4v2_g128", 128, 1, [300, 129], [40, 1], None),
    ("kvarn_k4v4_g128", 256, 3, [260], [3], 16),
    (None, 64, 3, [70, 130, 5], [70, 3, 2], 32),
    (None, 128, 1, [200], [67], None),
    # the larger row tiles that extend.py --variants times (session 8): 32 tokens x 4 heads
    ("kvarn_k4v2_g128", 128, 4, [420], [70], 128),
]


@pytest.mark.parametrize("kernel", ["rows", "fa"])
@pytest.mark.parametrize("preset,d,qh,lens,q_lens,block_m", CASES)
def test_extend_matches_reference(preset, d, qh, lens, q_lens, block_m, kernel):
    run_case(preset, d, qh, lens, q_lens, block_m, seed=len(lens), kernel=kernel)
    if kernel == "fa" and block_m is not None:     # and at the fa kernel's own default tile
        run_case(preset, d, qh, lens, q_lens, None, seed=len(lens), kernel=kernel, check_ref_op=False)
    if kernel == "fa" and preset is not None:      # the records through the fp16 workspace
        run_case(preset, d, qh, lens, q_lens, block_m, seed=len(lens), kernel=kernel, check_ref_op=False,
                 workspace=True)


@pytest.mark.parametrize("preset,d", [("kvarn_k4v2_g64", 64), ("kvarn_k4v4_g128", 128),
                                      ("kvarn_k4v2_g128", 256)])
@pytest.mark.parametrize("words", [False, True])
def test_dequant_prefix_matches_reference_dequantization(preset, d, words):
    """The workspace holds every prefix record dequantized in an fp16 cache block's
    layout (natural token and channel order): against kvarn.quant's reconstruction of
    the same records, to fp16 rounding."""
    from kvarn.kernels.extend_attention import dequant_prefix
    from kvarn.quant.records import dequantize_rotated_blocks
    from test_decode_attention import build_paged_cache as build
    cfg = KVarNConfig.from_name(preset, d)
    g = cfg.group_size
    lens, q_lens = [4 * g + 5, g + 3, 3 * g], [7, 3, g]      # 2, 0 and 1 prefix records
    kv, records, bt, ctx = build(cfg, lens, q_lens, 2, d, g, seed=d)
    cu = torch.tensor([0, 7, 10, 10 + g], dtype=torch.int32, device=DEVICE)
    ws = dequant_prefix(records, bt, ctx, cu, cfg, words=words).float().cpu()
    seen = 0
    for b, (n, t) in enumerate(zip(lens, q_lens)):
        for i in range(1, max((n - t) // g - 1, 0) + 1):
            k_ref, v_ref = dequantize_rotated_blocks(records[bt[b, i].long()][None].cpu(), cfg)
            row = b * bt.shape[1] + i
            for got, ref in ((ws[0, row], k_ref[0]), (ws[1, row], v_ref[0])):   # [Hkv, G, D], [G, Hkv, D]
                torch.testing.assert_close(got, ref.transpose(0, 1).half().float(), atol=1e-3, rtol=1e-3)
            seen += 1
    assert seen == 3


# the rows kernel's records through the decode kernel's joint loop (rec_joint, NOTES.md
# attempt 43): 128-token blocks, several records before the new tokens, ragged chunks,
# a record-free sequence, 1 and 4 query heads per KV head
@pytest.mark.parametrize("preset,d,qh,lens,q_lens,block_m", [
    ("kvarn_k4v2_g128", 128, 4, [700, 300, 129], [5, 40, 1], 16),
    ("kvarn_k4v4_g128", 64, 1, [520, 260], [70, 3], 64),
    ("kvarn_k4v2_g128", 256, 3, [400], [9], 32),
])
def test_extend_rows_joint_records(preset, d, qh, lens, q_lens, block_m):
    run_case(preset, d, qh, lens, q_lens, block_m, seed=len(lens), kernel="rows", rec_joint=True)


def test_extend_rec_joint_scope():
    """rec_joint=True is refused where the joint loop does not apply."""
    from test_decode_attention import build_paged_cache as build
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    kv, records, bt, ctx = build(cfg, [200], [3], 1, 64, 64, seed=1)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 2, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="rec_joint"):
        paged_extend_attention(q, kv, records, bt, ctx, cu, cfg, kernel="rows", rec_joint=True)


def test_extend_workspace_matches_records():
    """The prefix-dequant workspace holds what the fa kernel computes from the records
    itself: outputs agree to fp32 summation order, and both match the reference."""
    from test_decode_attention import build_paged_cache as build
    cfg = KVarNConfig.from_name("kvarn_k4v2_g64", 64)
    lens, q_lens = [400, 200, 64], [70, 3, 64]
    kv, records, bt, ctx = build(cfg, lens, q_lens, 2, 64, 64, seed=5)
    cu = torch.tensor([0, 70, 73, 137], dtype=torch.int32, device=DEVICE)
    q = torch.randn(137, 4, 64, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    a = paged_extend_attention(q, kv, records, bt, ctx, cu, cfg, kernel="fa", block_m=32, workspace=False)
    b = paged_extend_attention(q, kv, records, bt, ctx, cu, cfg, kernel="fa", block_m=32, workspace=True)
    assert (a.float() - b.float()).abs().max() <= 2e-3
    with pytest.raises(ValueError, match="needs the 'fa' kernel"):
        paged_extend_attention(q, kv, records, bt, ctx, cu, cfg, kernel="rows", workspace=True)


@pytest.mark.parametrize("preset,d,qh,lens,q_lens", [
    ("kvarn_k4v2_g128", 128, 4, [300, 129], [4, 1]),       # 16 rows -> rows, 16
    ("kvarn_k4v2_g128", 128, 4, [300, 129], [8, 3]),       # 32 rows -> rows, 32
    ("kvarn_k4v2_g128", 128, 4, [400, 140], [13, 2]),      # 52 -> fa, 64
    ("kvarn_k4v2_g128", 128, 4, [640, 300], [130, 2]),     # 520 -> fa, 128, 5 programs: workspace
    (None, 128, 3, [150], [90]),                           # 270 -> fa, 128 (fp16 cache)
    ("kvarn_k4v2_g64", 64, 3, [200, 130], [5, 1]),         # unmeasured: rows, 64
])
def test_extend_auto(preset, d, qh, lens, q_lens):
    """The default launch (kernel "auto") on shapes that take each of its branches."""
    run_case(preset, d, qh, lens, q_lens, seed=3, kernel="auto", check_ref_op=False)


def test_extend_launch_choices():
    cfg = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    assert extend_launch(4, 4, 128, cfg, "auto") == ("rows", 16, 4 if ext.EXTEND_REC_JOINT != "0" else 2, 2)
    assert extend_launch(4, 4, 128, cfg, "auto", rec_joint=False) == ("rows", 16, 2, 2)
    assert extend_launch(4, 4, 128, cfg, "auto", rec_joint=True) == ("rows", 16, 4, 2)
    assert extend_launch(8, 4, 128, cfg, "auto") == ("rows", 32, 4, 2)
    assert extend_launch(16, 4, 128, cfg, "auto") == ("fa", 64, 4, 2)
    assert extend_launch(512, 4, 128, cfg, "auto") == ("fa", 128, 8, 2)
    assert extend_launch(512, 4, 128, None, "auto") == ("fa", 128, 8, 2)        # the fp16 cache
    assert extend_launch(1, 32, 128, cfg, "auto") == ("rows", 32, 4, 2)         # GQA 32, decode
    assert extend_launch(1, 64, 128, cfg, "auto") == ("fa", 64, 4, 2)
    # outside what was measured: the rows kernel's earlier default launch
    assert extend_launch(5, 3, 64, KVarNConfig.from_name("kvarn_k4v2_g64", 64), "auto") == ("rows", 64, 8, 2)
    assert extend_launch(512, 8, 256, None, "auto") == ("rows", 32, 8, 2)
    assert extend_launch(4, 4, 128, None, "auto") == ("rows", 64, 8, 2)
    # what is given is kept; the rest follows the kernel's rules
    assert extend_launch(512, 4, 128, cfg, "rows") == ("rows", 64, 4, 2)
    assert extend_launch(512, 4, 128, cfg, "fa", block_m=64, num_stages=3) == ("fa", 64, 4, 3)
    assert extend_launch(2, 4, 128, cfg, "auto", num_warps=8) == ("rows", 16, 8, 2)
    assert extend_launch(2, 4, 128, cfg, "rows", block_m=32) == ("rows", 32, 8, 2)
    # the launch Triton 3.6 miscompiles (an illegal address on the H100) is refused
    with pytest.raises(ValueError, match="miscompiled"):
        extend_launch(9, 3, 64, None, "rows", block_m=32, num_warps=4)
    assert extend_launch(9, 3, 64, None, "rows", block_m=32, num_warps=2) == ("rows", 32, 2, 2)


def test_extend_joint_and_workspace_rules(monkeypatch):
    """Where the defaults turn on the joint record loop and the fp16 workspace."""
    from kvarn.kernels.extend_attention import rec_joint_auto, use_workspace
    k4v2 = KVarNConfig.from_name("kvarn_k4v2_g128", 128)
    assert rec_joint_auto(k4v2, 128, 16) and rec_joint_auto(k4v2, 128, 32)
    assert not rec_joint_auto(k4v2, 128, 64)                                    # spills more, untimed
    assert not rec_joint_auto(KVarNConfig.from_name("kvarn_k4v4_g128", 128), 128, 16)
    assert not rec_joint_auto(KVarNConfig.from_name("kvarn_k4v2_g128", 64), 64, 16)
    assert not rec_joint_auto(None, 128, 16)
    assert rec_joint_auto(None, 128, 64, "1") and not rec_joint_auto(k4v2, 128, 16, "0")
    with pytest.raises(ValueError, match="KVARN_EXTEND_REC_JOINT"):
        rec_joint_auto(k4v2, 128, 16, "yes")
    # programs per KV head reading each record: from WS_MIN_PROGRAMS on (2) with the dequant
    # kernel's WORDS, from WS_MIN_PROGRAMS_NO_WORDS (5) without, within WS_MAX_BYTES
    for words, least in ((True, 2), (False, 5)):
        monkeypatch.setattr(ext, "DEQUANT_WORDS", words)
        assert use_workspace(k4v2, least, 1, 130, 8, 128, 128)
        assert not use_workspace(k4v2, least - 1, 1, 130, 8, 128, 128)
    monkeypatch.setattr(ext, "DEQUANT_WORDS", True)
    assert not use_workspace(None, 64, 1, 130, 8, 128, 128)                     # the fp16 cache
    assert use_workspace(KVarNConfig.from_name("kvarn_k4v2_g64", 64), 64, 1, 130, 8, 64, 64)
    assert not use_workspace(KVarNConfig.from_name("kvarn_k4v4_g128", 256), 64, 1, 130, 8, 128, 256)
    assert not use_workspace(k4v2, 64, 32, 65, 8, 128, 128)                     # 1.09 GB


@pytest.mark.parametrize("kernel", ["rows", "fa"])
def test_extend_empty_sequences(kernel):
    """Sequences with no new tokens in the batch are skipped, others unaffected."""
    run_case("kvarn_k4v2_g64", 64, 2, [130, 70, 65], [0, 6, 0], 16, seed=2, kernel=kernel)


def test_extend_kernel_name_checked():
    with pytest.raises(ValueError, match="kernel must be"):
        run_case(None, 64, 1, [5], [5], kernel="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d,qh,lens,q_lens", [
    ("kvarn_k4v2_g128", 128, 4, [4096, 9000, 300, 2049], [4096, 517, 1, 2000]),
    ("kvarn_k4v2_g64", 64, 3, [5000, 64], [1000, 64]),
    ("kvarn_k4v4_g128", 256, 8, [3000, 129], [257, 1]),
    (None, 128, 4, [4096, 777], [1024, 700]),
    # few new tokens (speculative verify, decode-like rows): "auto" takes the rows kernel
    ("kvarn_k4v2_g128", 128, 4, [9000, 4100, 300], [4, 1, 3]),
    ("kvarn_k4v2_g64", 64, 3, [5000, 700, 64], [9, 2, 7]),
    ("kvarn_k4v4_g128", 256, 8, [3000, 129], [2, 4]),
])
@pytest.mark.parametrize("launch", [None, ("rows", 64, 4, 3, None), ("rows", 32, 4, 2, None),
                                    ("rows", 16, 2, 2, None), ("fa", None, None, None, False),
                                    ("fa", None, None, None, True), ("fa", 128, 4, 2, None),
                                    ("fa", 64, 4, 2, None), ("fa", 128, 8, 3, None)],
                         ids=lambda x: "default" if x is None else "%s_m%s_w%s_s%s_ws%s" % x)
def test_extend_gpu_large(preset, d, qh, lens, q_lens, launch):
    """Large ragged batches, at the default launch and the kernels / row tiles / warps /
    stages / workspace choices that extend.py --variants times."""
    kernel, block_m, warps, stages, ws = launch or (None, None, None, None, None)
    if d == 64 and launch == ("rows", 32, 4, 2, None):
        pytest.skip("refused by extend_launch: Triton 3.6 miscompiles it (test_extend_launch_choices)")
    run_case(preset, d, qh, lens, q_lens, block_m, hkv=4, seed=7, num_warps=warps, num_stages=stages,
             check_ref_op=launch is None, kernel=kernel, workspace=ws)


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d", [("kvarn_k4v2_g128", 128), ("kvarn_k4v2_g64", 64),
                                      ("kvarn_k4v4_g128", 256), ("kvarn_k4v2_g128", 64)])
def test_dequant_words_gpu_large(preset, d, monkeypatch):
    """The dequant kernel expanding whole words (WORDS, attempt 45) writes what the
    per-code gathers write, at large ragged batches, in every record row; and the fa
    kernel over that workspace matches the reference."""
    from kvarn.kernels.extend_attention import dequant_prefix
    cfg = KVarNConfig.from_name(preset, d)
    g = cfg.group_size
    lens, q_lens = [9000, 4100, 300, 2 * g], [517, 64, 3, g]
    kv, records, bt, ctx = build_paged_cache(cfg, lens, q_lens, 4, d, g, seed=11)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    a = dequant_prefix(records, bt, ctx, cu, cfg, words=False)
    b = dequant_prefix(records, bt, ctx, cu, cfg, words=True)
    rows = [bi * bt.shape[1] + i for bi, (n, t) in enumerate(zip(lens, q_lens))
            for i in range(1, max((n - t) // g - 1, 0) + 1)]
    assert len(rows) > 50
    rows = torch.tensor(rows, device=DEVICE)
    torch.testing.assert_close(b[:, rows].float(), a[:, rows].float(), atol=1e-3, rtol=1e-3)
    monkeypatch.setattr(ext, "DEQUANT_WORDS", True)
    run_case(preset, d, 4, lens, q_lens, hkv=4, seed=11, kernel="fa", workspace=True, check_ref_op=False)


@pytest.mark.gpu
@pytest.mark.parametrize("preset,d,qh,lens,q_lens", [
    ("kvarn_k4v2_g128", 128, 4, [9000, 4100, 300], [4, 1, 3]),
    ("kvarn_k4v2_g128", 128, 4, [4096, 9000, 2049], [64, 517, 16]),
    ("kvarn_k4v4_g128", 256, 8, [3000, 129], [2, 4]),
    ("kvarn_k4v2_g128", 64, 3, [5000, 700], [9, 2]),
])
@pytest.mark.parametrize("block_m,warps,stages", [(16, 2, 2), (16, 4, 2), (32, 4, 2), (64, 4, 3)])
def test_extend_gpu_rows_joint(preset, d, qh, lens, q_lens, block_m, warps, stages):
    """The rows kernel with the decode kernel's joint record loop (rec_joint) at the
    launches extend.py --variants times it, large ragged batches."""
    if d == 64 and (block_m, warps) == (32, 4):
        pytest.skip("refused by extend_launch: Triton 3.6 miscompiles it (test_extend_launch_choices)")
    run_case(preset, d, qh, lens, q_lens, block_m, hkv=4, seed=9, num_warps=warps, num_stages=stages,
             check_ref_op=False, kernel="rows", rec_joint=True)
