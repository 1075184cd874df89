"""Tensor-parallel decode through Serve: RayExecutor ranks in the replica's placement group.

SmolLM2 has 9 query / 3 KV heads, so TP=3 gives every rank one KV head (and 3 query
heads). The decode deployment gets a STRICT_PACK placement group of 1 + 3 bundles
(0.4 CPU for the replica, 0.2 per rank); the prefill replica stays TP=1, so the
payload's heads are split across the ranks on import (each reads its slice of the
same object-store buffer). Greedy text must equal a single in-process TP=1 engine.
"""

from __future__ import annotations

import time

import pytest

APP = "kvarn-tp"
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is",
           " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(40))]


@pytest.fixture(scope="module")
def tp_app(ray_cluster, deploy_app, kvarn_args):
    from ray import serve

    args = {**kvarn_args, "decode_tensor_parallel_size": 3}
    deploy_app(args, name=APP, route_prefix="/tp")
    yield {"base_url": f"{ray_cluster}/tp", "args": args}
    serve.delete(APP)


def test_tp3_decode_matches_single_engine(tp_app):
    import openai
    from ray import serve
    from ray.util import placement_group_table

    from kvarn import LLM, SamplingParams

    client = openai.OpenAI(base_url=f"{tp_app['base_url']}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    a = tp_app["args"]
    served = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
              for p in PROMPTS]

    decode = serve.get_deployment_handle("DecodeServer", app_name=APP)
    stats = decode.stats.remote().result(timeout_s=60)
    assert stats["executor"] == "RayExecutor" and stats["tensor_parallel_size"] == 3
    pgs = [pg for pg in placement_group_table().values()
           if pg["state"] == "CREATED" and len(pg["bundles"]) == 4]
    assert pgs and pgs[0]["strategy"] == "STRICT_PACK"
    assert sorted(b.get("CPU") for b in pgs[0]["bundles"].values()) == [0.2, 0.2, 0.2, 0.4]

    with LLM(model=a["model"], kv_cache_dtype=a["kv_cache_dtype"], max_model_len=a["max_model_len"],
             max_num_batched_tokens=a["max_num_batched_tokens"],
             kv_cache_memory_bytes=64 * 2**20, device="cpu") as llm:
        tok = llm.get_tokenizer()
        for prompt, r in zip(PROMPTS, served):
            (ref,) = llm.generate([tok(prompt).input_ids],
                                  SamplingParams(temperature=0.0, max_tokens=6))
            assert r.choices[0].text == ref.outputs[0].text, prompt
            assert r.model_extra["kvarn"]["payload_bytes"] > 0

    deadline = time.monotonic() + 30
    while True:
        s = decode.stats.remote().result(timeout_s=60)
        if s["num_free_blocks"] == s["baseline_free_blocks"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert s["num_free_blocks"] == s["baseline_free_blocks"]
