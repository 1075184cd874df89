"""Disaggregation: prefill + export on one engine, import + decode on another, must give
the tokens a single engine gives doing both (greedy, SmolLM2, fp32)."""
import numpy as np
import pytest

from conftest import english_prompts, run_to_end
from kvarn.engine import SamplingParams

NEW = 12


def prefill_export(engine, ids, kv):
    engine.add_request("export", ids, SamplingParams(temperature=0, max_tokens=NEW), export_kv=kv)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert engine.num_free_blocks == engine.num_total_blocks
    return outs[0]


def continue_from(engine, payload):
    engine.add_request_from_payload("cont", payload, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final = o
    assert engine.num_free_blocks == engine.num_total_blocks
    return final


def single(engine, ids):
    p = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    return run_to_end(engine, {"single": (ids, p)})["single"].token_ids


@pytest.fixture(scope="module")
def prompt(engine_factory):
    e = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=512)
    return english_prompts(e.tokenizer, 1, 300)[0]       # sink + 1 record + a 44-token tail


def test_kvarn_payload_continues_exactly(engine_factory, prompt):
    src = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=128)   # 3 prefill chunks
    dst = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=512)
    out = prefill_export(src, prompt, "kvarn_k4v2_g128")
    p = out.payload
    assert p.records.shape[:3] == (3, 30, 1) and p.sink.shape[3] == 128 and p.tail.shape[3] == 44
    assert p.fp16_equivalent_nbytes / p.nbytes > 1.45         # sink and tail stay fp16 at 300 tokens
    cont = continue_from(dst, p)
    assert cont.token_ids[0] == out.token_ids[0] == p.first_token_id
    assert cont.token_ids == single(src, prompt)


def test_auto_payload_continues_exactly(engine_factory, prompt):
    src = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=512)
    dst = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=256)
    p = prefill_export(src, prompt, "auto").payload
    assert p.sink.dtype == np.float32 and p.tail.shape[3] == 300 - 128 and p.records.size == 0
    assert continue_from(dst, p).token_ids == single(src, prompt)


def test_auto_payload_into_kvarn_engine_is_quantized_on_import(engine_factory, prompt):
    src = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=512)
    dst = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=512)
    p = prefill_export(src, prompt, "auto").payload
    # the KVarN engine prefilling the prompt in one chunk computes the same fp32 K/V,
    # attends exactly over them, and quantizes the same blocks: same tokens
    assert continue_from(dst, p).token_ids == single(dst, prompt)


def test_full_precision_prefill_exports_kvarn(engine_factory, prompt):
    src = engine_factory(kv_cache_dtype="auto", max_num_batched_tokens=512)
    dst = engine_factory(kv_cache_dtype="kvarn_k4v2_g128", max_num_batched_tokens=512)
    p = prefill_export(src, prompt, "kvarn_k4v2_g128").payload
    assert p.header["frame"] == "rotated" and p.records.shape[2] == 1
    assert p.nbytes < p.fp16_equivalent_nbytes / 1.45
    out = continue_from(dst, p).token_ids
    ref = single(dst, prompt)
    assert out[0] == ref[0] and sum(a == b for a, b in zip(out, ref)) >= NEW // 2
