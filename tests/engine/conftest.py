"""Shared fixtures of the engine tests: the embedded SmolLM2 model, cached engines, HF greedy.

Engines are cached per configuration for the whole session (loading is the slow part);
a test must leave an engine idle (every request finished or aborted).
"""
from __future__ import annotations

import pydoc_data.topics

import pytest
import torch


@pytest.fixture(scope="session")
def smol_folder():
    from kvarn.models.resolve import resolve

    try:
        return resolve("smollm2-135m")
    except ModuleNotFoundError as e:
        pytest.skip(f"embedded SmolLM2 not installed: {e}")


_ENGINES: dict = {}


@pytest.fixture(scope="session")
def engine_factory(smol_folder):
    from kvarn.engine import EngineConfig, LLMEngine

    def make(**kw):
        kw.setdefault("model", "smollm2-135m")
        kw.setdefault("kv_cache_memory_bytes", 256 * 2**20)
        kw.setdefault("device", "cpu")
        key = tuple(sorted((k, repr(v)) for k, v in kw.items()))
        if key not in _ENGINES:
            _ENGINES[key] = LLMEngine(EngineConfig(**kw))
        e = _ENGINES[key]
        assert not e.has_unfinished_requests()
        return e

    yield make
    for e in _ENGINES.values():
        e.shutdown()
    _ENGINES.clear()


def run_to_end(engine, requests: dict) -> dict:
    """requests: id -> (prompt ids, params) -> id -> final RequestOutput."""
    for rid, (ids, p) in requests.items():
        engine.add_request(rid, ids, p)
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final


def english_prompts(tokenizer, n: int, num_tokens: int) -> list[list[int]]:
    """n token-id prompts of num_tokens each, cut from The Python Language Reference
    (the stdlib's pydoc_data.topics: genuine English prose, on every machine)."""
    topics = pydoc_data.topics.topics
    names = ["datamodel", "execmodel", "comparisons", "import", "objects", "types", "function", "class"]
    out = []
    for name in names:
        if name in topics:
            ids = tokenizer(topics[name])["input_ids"]
            if len(ids) >= num_tokens + 64:
                out.append(ids[64:64 + num_tokens])
        if len(out) == n:
            return out
    raise RuntimeError("not enough reference text")


_HF = {}


def hf_greedy(folder, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    if "model" not in _HF:
        _HF["model"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    m = _HF["model"]
    res = []
    with torch.inference_mode():
        for p in prompts:
            key = (tuple(p), max_new_tokens)
            if key not in _HF:
                ids = torch.tensor([p])
                out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens, pad_token_id=0)
                _HF[key] = out[0, len(p):].tolist()
            res.append(_HF[key])
    return res
