"""Tensor parallelism on CPU (gloo, spawned ranks): TP=t greedy tokens == TP=1.

The tiny dummy Llama (4 q / 2 KV heads) runs TP=2; SmolLM2 (9 q / 3 KV heads) runs
TP=3. Each rank's KVarN cache holds only its KV heads; payloads cross TP sizes.
"""
import pytest

from conftest import english_prompts, run_to_end
from kvarn.engine import EngineConfig, LLMEngine, SamplingParams

TINY = dict(model="dummy:tiny-llama", load_format="dummy", device="cpu", max_model_len=1024,
            kv_cache_memory_bytes=16 * 2**20, max_num_batched_tokens=256)


def greedy(engine, prompts, n=8):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = run_to_end(engine, {f"p{i}": (ids, p) for i, ids in enumerate(prompts)})
    assert engine.num_free_blocks == engine.num_total_blocks
    return [outs[f"p{i}"].token_ids for i in range(len(prompts))]


def export(engine, ids, to=None):
    engine.add_request("x", ids, SamplingParams(temperature=0, max_tokens=8),
                       export_kv=to or engine.config.kv_cache_dtype)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs[-1].payload


def cont(engine, payload, n=8):
    engine.add_request_from_payload("c", payload, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            last = o
    return last.token_ids


@pytest.mark.parametrize("kv", ["kvarn_k4v2_g128", "auto"])
def test_tiny_tp2_equals_tp1_and_payloads_cross_tp_sizes(kv):
    prompts = [list(range(5, 5 + n)) for n in (300, 40, 7)]
    one = LLMEngine(EngineConfig(kv_cache_dtype=kv, **TINY))
    two = LLMEngine(EngineConfig(kv_cache_dtype=kv, tensor_parallel_size=2, **TINY))
    try:
        assert two.sizing["num_fp16_blocks"] > one.sizing["num_fp16_blocks"]    # half the heads per rank
        ref = greedy(one, prompts)
        assert greedy(two, prompts) == ref
        ex = two.executor
        print(f"TP=2 driver overhead per step: {1e3 * ex.step_overhead_s / ex.num_steps:.3f} ms")
        p2 = export(two, prompts[0])                    # both ranks' heads, head-major
        assert p2.sink.shape[0] == 2
        assert cont(one, p2) == ref[0]
        assert cont(two, export(one, prompts[0])) == ref[0]
        if kv == "auto":    # full-precision prefill packed to KVarN by each rank, on its device
            import numpy as np
            import torch
            from kvarn.cache.kvarn_pool import quantize_tokens
            from kvarn.format import KVarNConfig
            q1, q2 = export(one, prompts[0], "kvarn_k4v2_g128"), export(two, prompts[0], "kvarn_k4v2_g128")
            assert q2.header["kv_dtype"] == "kvarn_k4v2_g128" and q2.records.shape[2] == 1
            # per-rank packing == packing TP=2's own full-precision K/V in one place, byte for byte
            toks = torch.from_numpy(np.concatenate([p2.sink, p2.tail], axis=3))
            central = quantize_tokens(toks, KVarNConfig.from_name("kvarn_k4v2_g128", toks.shape[-1]))
            for name, ref_t in zip(("records", "sink", "tail"), central):
                assert np.array_equal(getattr(q2, name), ref_t.numpy()), name
            # across TP sizes the K/V differ only by the GEMMs' summation order (oneDNN blocks
            # a sharded weight differently), so the fp16 sink/tail agree to rounding
            for name in ("sink", "tail"):
                assert np.allclose(getattr(q1, name), getattr(q2, name), rtol=0, atol=2e-3), name
    finally:
        one.shutdown()
        two.shutdown()


def test_smollm2_tp3_equals_tp1(engine_factory):
    one = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=256)
    prompts = english_prompts(one.tokenizer, 2, 300)
    ref = greedy(one, prompts, 12)
    three = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_dtype="kvarn_k4v2_g128", tensor_parallel_size=3,
                                   device="cpu", kv_cache_memory_bytes=96 * 2**20, max_num_batched_tokens=256))
    try:
        assert three.info["num_kv_heads_local"] == 1
        assert greedy(three, prompts, 12) == ref
    finally:
        three.shutdown()
