"""The accuracy benchmark's machinery (benchmarks/accuracy.py) on a tiny random Llama."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("kvarn_bench_accuracy", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(acc):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=1024, initializer_range=0.08,
    )
    model = LlamaForCausalLM(cfg).float()
    acc.prepare_model(model)
    ids = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_parse_spec(acc):
    s = acc.parse_spec("kvarn_k4v2_g128:kivi")
    assert s.kind == "kvarn" and s.options == {"rotate": False, "normalize": False}
    s = acc.parse_spec("kvarn_k4v4_g64:clip=-2,iters=16")
    assert s.options == {"log_clip": (-2.0, 10.0), "norm_iters": 16}
    assert s.kvarn_config(64).log_clip == (-2.0, 10.0)
    s = acc.parse_spec("kvarn_k4v2_g64:fp16_v,no_sink")
    assert s.bench == {"fp16_v", "no_sink"} and s.options == {}
    assert acc.parse_spec("auto").kind == "auto"
    assert acc.parse_spec("fp8_e4m3").kind == "fp8_e4m3"
    for bad in ("kvarn_k3v2_g128", "auto:kivi", "kvarn_k4v2_g128:bogus", "kvarn_k4v2_g64:fp16_k,fp16_v"):
        with pytest.raises(ValueError):
            acc.parse_spec(bad)


def test_auto_matches_a_plain_forward(acc, tiny):
    """Chunked evaluation over the fp16 view ~ one full-sequence sdpa forward (RoPE, mask)."""
    model, ids = tiny
    res, lps = acc.run_one(model, ids, acc.parse_spec("auto"), chunk=64, keep_logprobs=True)
    mine = torch.cat(lps)
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            full = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
    finally:
        acc.prepare_model(model)
    assert mine.shape == full.shape == (ids.numel() - 1, 512)
    assert (mine - full).abs().max().item() < 1e-2


def test_evaluate_two_configs(acc, tiny):
    model, ids = tiny
    res = acc.evaluate(model, ids, ["auto", "kvarn_k4v2_g64"], chunk=64, progress=False)
    assert [r["kv_cache_dtype"] for r in res] == ["auto", "kvarn_k4v2_g64"]
    auto, kv = res
    for r in res:
        assert r["num_tokens"] == 300 and r["num_predictions"] == 299
    assert auto["kl"] == pytest.approx(0.0, abs=1e-9)
    assert auto["top1_agreement"] == 1.0
    assert auto["ppl_rel_to_fp16"] == 0.0
    assert math.isfinite(auto["perplexity"]) and auto["perplexity"] > 1
    assert math.isfinite(kv["perplexity"]) and kv["perplexity"] > 1
    assert kv["kl"] > 0 and math.isfinite(kv["kl"])
    assert 0.0 <= kv["top1_agreement"] <= 1.0


def test_single_config_still_gets_a_reference(acc, tiny):
    model, ids = tiny
    (r,) = acc.evaluate(model, ids[:200], ["fp8_e4m3"], chunk=50, progress=False)
    assert r["kv_cache_dtype"] == "fp8_e4m3" and r["kl"] > 0 and math.isfinite(r["perplexity"])


def test_chunk_larger_than_tile_is_refused(acc, tiny):
    model, ids = tiny
    with pytest.raises(ValueError, match="chunk"):
        acc.evaluate(model, ids, ["kvarn_k4v2_g64"], chunk=128, progress=False)


def test_cache_view_sink_records_tail(acc):
    """The view: fp16 sink, dequantized records for full blocks, fp16 tail; diagnostics."""
    torch.manual_seed(2)
    n, g = 300, 64
    k = torch.randn(1, 2, n, 64) * 3
    v = torch.randn(1, 2, n, 64)
    views = {}
    for label in ("kvarn_k4v2_g64", "kvarn_k4v2_g64:fp16_k", "kvarn_k4v2_g64:no_sink"):
        att = acc.KVarNEvalAttention(acc.parse_spec(label), 1, 2, 64, n)
        att.k[:, :, :n], att.v[:, :, :n] = k, v
        att.view_k[:, :, :n], att.view_v[:, :, :n] = acc._fp16_rt(k), acc._fp16_rt(v)
        att.length = [n]
        att._freeze_full_blocks(n)
        assert att.frozen == n // g * g == 256
        views[label] = att.past_view(0)
    fk, fv = acc._fp16_rt(k[0]), acc._fp16_rt(v[0])
    vk, vv = views["kvarn_k4v2_g64"]
    assert torch.equal(vk[:, :g], fk[:, :g]) and torch.equal(vv[:, 256:], fv[:, 256:])   # sink, tail
    assert not torch.equal(vk[:, g:256], fk[:, g:256]) and not torch.equal(vv[:, g:256], fv[:, g:256])
    err = (vk[:, g:256] - fk[:, g:256]).norm() / fk[:, g:256].norm()
    assert 0 < err < 0.2
    k1, v1 = views["kvarn_k4v2_g64:fp16_k"]
    assert torch.equal(k1, fk) and torch.equal(v1, vv)
    k0, _ = views["kvarn_k4v2_g64:no_sink"]
    assert not torch.equal(k0[:, :g], fk[:, :g]) and torch.equal(k0[:, g:], vk[:, g:])
