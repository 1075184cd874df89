"""End to end on SmolLM2-135M (fp32, CPU): our greedy tokens vs Hugging Face transformers'.

'auto': token-identical to HF. KVarN k4v2_g128: prompts of 448 tokens, so three full
non-sink blocks are quantized during prefill (and chunked prefill reads them back);
the agreement asserted is just under what was measured (see the numbers below): two
prompts identical over all 32 tokens, the others diverging after 11 and 6 (greedy
decoding amplifies one flipped near-tie into a different continuation).
"""
import math

import pytest
import torch

from conftest import english_prompts, hf_greedy, run_to_end
from kvarn.attention.torch_backend import batched_decode_attention
from kvarn.engine import SamplingParams
from kvarn.format import KVarNConfig
from kvarn.kernels.reference import ref_paged_decode_attention, ref_store_tiles

NUM_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 448, 32


@pytest.mark.parametrize("preset", [None, "kvarn_k4v2_g64", "kvarn_k4v4_g64"])
def test_cpu_batched_decode_equals_reference(preset):
    """The CPU backend's one-SDPA decode == ref_paged_decode_attention at awkward lengths."""
    torch.manual_seed(0)
    g, d, hkv, hq = 64, 64, 2, 6
    cfg = KVarNConfig.from_name(preset, d) if preset else None
    kv = torch.randn(2, 40, hkv, g, d).half()
    records = None
    if cfg:
        records = torch.zeros(20, hkv, cfg.record_bytes, dtype=torch.uint8)
        ref_store_tiles(kv[None], torch.arange(10, 20), records[None], torch.arange(0, 10), cfg)
    lens = [1, 63, 64, 65, 128, 129, 200, 300]
    # Slots no sequence wrote hold garbage, here NaN: the table padding of the shorter
    # sequences (block 39) and the unwritten rows of the 1-token sequence's block 20.
    kv[:, 39] = float("nan")
    kv[:, 20, :, 1:] = float("nan")
    tables = torch.full((len(lens), 6), 39, dtype=torch.int32)
    for b, n in enumerate(lens):
        nrec = max((n - 1) // g - 1, 0) if cfg else 0
        nb = math.ceil(n / g)
        row = [20 + 2 * b] + list(range(b, b + nrec)) + [21 + 2 * b] * (nb - 1 - nrec)
        tables[b, :nb] = torch.tensor(row[:nb], dtype=torch.int32)
    q = torch.randn(len(lens), hq, d).half()
    ctx = torch.tensor(lens, dtype=torch.int32)
    ref = ref_paged_decode_attention(q, kv, records, tables, ctx, cfg).float()
    out = batched_decode_attention(q, kv, records, tables, ctx, lens, cfg).float()
    assert (out - ref).abs().max().item() <= 2e-3        # fp16 output rounding: one ulp near 1


@pytest.fixture(scope="module")
def prompts(engine_factory):
    e = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=256)
    return english_prompts(e.tokenizer, NUM_PROMPTS, PROMPT_TOKENS)


@pytest.fixture(scope="module")
def reference(smol_folder, prompts):
    return hf_greedy(smol_folder, prompts, NEW_TOKENS)


def greedy(engine, prompts, n=NEW_TOKENS):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = run_to_end(engine, {f"g{i}": (ids, p) for i, ids in enumerate(prompts)})
    assert engine.num_free_blocks == engine.num_total_blocks
    return [outs[f"g{i}"].token_ids for i in range(len(prompts))]


def test_auto_matches_transformers_greedy(engine_factory, prompts, reference):
    # chunked prefill (256-token chunks): the second chunk reads the paged cache
    e = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=256)
    assert greedy(e, prompts) == reference


def agreement(ours, ref):
    first_div = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(ours, ref)]
    match = sum(a == b for o, r in zip(ours, ref) for a, b in zip(o, r)) / sum(len(r) for r in ref)
    return first_div, match


def test_kvarn_k4v2_g128_agreement(engine_factory, prompts, reference):
    e = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=256)
    ours = greedy(e, prompts)
    first_div, match = agreement(ours, reference)
    print(f"kvarn_k4v2_g128 vs HF fp32 greedy: first divergence {first_div}, position-wise match {match:.3f}")
    # measured (CPU, fp32 model, fp16 KVarN cache): first divergence [32, 32, 11, 6] of 32,
    # position-wise match 0.656 (tokens after a divergence rarely line up again)
    assert min(first_div) >= 5 and sum(first_div) >= 70
    assert match >= 0.6


@pytest.mark.slow
def test_triton_backend_matches_torch_backend(engine_factory, prompts):
    """The CUDA path (Triton store / extend / decode kernels, here under TRITON_INTERPRET=1)
    gives the torch reference path's greedy tokens."""
    short = [p[:300] for p in prompts[:2]]
    ref = greedy(engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=256), short, 8)
    tri = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=256, attention_backend="triton")
    assert tri.info["attention_backend"] == "triton"
    first_div, match = agreement(greedy(tri, short, 8), ref)
    print(f"triton vs torch backend (kvarn_k4v2_g128): first divergence {first_div}, match {match:.3f}")
    assert match >= 0.9
