"""The kvarn app end to end: real Ray, real HTTP, the official openai client.

One app (deployments/kvarn.yaml's args through the builder) serves the whole module.
Greedy outputs are compared with a single in-process engine (``kvarn.LLM``) running
the same model and KVarN preset: the P/D path (fp32 prefill replica -> KVarN payload ->
decode replica) must give the same text.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time

import httpx
import pytest

from serve_stats import decode_stats, wait_for_baseline

APP_NAME = "kvarn"

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name three colors."}]
# Enough tokens for several full KVarN tiles (G=128) between the fp16 sink and tail.
LONG_PROMPT = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(160))


# --------------------------------------------------------------------------- helpers


def _decode_handle():
    from ray import serve

    return serve.get_deployment_handle("DecodeServer", app_name=APP_NAME)


def _prefill_handle():
    from ray import serve

    return serve.get_deployment_handle("PrefillServer", app_name=APP_NAME)




def object_store_bytes_used() -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return int(get_memory_info_reply(get_state_from_address()).store_stats.object_store_bytes_used)


def expected_payload_nbytes(num_tokens: int, preset: str) -> tuple[int, int]:
    """(KVarN payload bytes, records-only fp16/KVarN ratio) for SmolLM2: L=30, Hkv=3, D=64."""
    from kvarn.format import KVarNConfig

    cfg = KVarNConfig.from_name(preset, 64)
    g, layers_heads = cfg.group_size, 30 * 3
    ns = min(num_tokens, g)
    nrec = max(num_tokens // g - 1, 0)
    nt = num_tokens - ns - nrec * g
    fp16_token = 2 * 64 * 2  # K and V, D halves
    nbytes = layers_heads * ((ns + nt) * fp16_token + nrec * cfg.record_bytes)
    return nbytes, g * fp16_token / cfg.record_bytes


@pytest.fixture(scope="module")
def base_url(kvarn_app):
    return kvarn_app["base_url"]


@pytest.fixture(scope="module")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference_llm(kvarn_app):
    """The same model and preset in one in-process engine (no P/D)."""
    from kvarn import LLM

    a = kvarn_app["args"]
    llm = LLM(model=a["model"], kv_cache_dtype=a["kv_cache_dtype"], max_model_len=a["max_model_len"],
              max_num_batched_tokens=a["max_num_batched_tokens"],
              kv_cache_memory_bytes=a["kv_cache_memory_bytes"], device="cpu")
    yield llm
    llm.shutdown() if hasattr(llm, "shutdown") else None


def reference_text(llm, prompt_token_ids: list[int], max_tokens: int) -> str:
    from kvarn import SamplingParams

    (out,) = llm.generate([list(prompt_token_ids)],
                          SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return out.outputs[0].text


@pytest.fixture(scope="module")
def tokenizer(kvarn_app):
    from transformers import AutoTokenizer

    from kvarn.models import resolve

    return AutoTokenizer.from_pretrained(str(resolve(MODEL)))


# --------------------------------------------------------------------------- config


def test_yaml_parses_and_import_path_resolves(kvarn_yaml):
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from kvarn_ray.app import KvarnAppArgs, build_app, deployment_options

    raw = kvarn_yaml
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = [a for a in schema.applications if a.name == APP_NAME]
    assert app.route_prefix == "/"
    assert import_attr(app.import_path) is build_app
    args = KvarnAppArgs.model_validate(app.args)
    # The builder's defaults are the YAML's deployments: section, so serve.run(build_app(args))
    # in these tests deploys what `serve run deployments/kvarn.yaml` deploys.
    defaults = deployment_options(args)
    for d in raw["applications"][0]["deployments"]:
        name = d["name"]
        assert name in defaults, name
        for key, value in d.items():
            if key == "name":
                continue
            got = defaults[name].get(key)
            if isinstance(value, dict):
                assert {k: got[k] for k in value} == value, (name, key)
            else:
                assert got == value, (name, key)
        assert d["autoscaling_config"]["max_replicas"] > d["autoscaling_config"]["min_replicas"] >= 1
        assert (d["autoscaling_config"]["target_ongoing_requests"]
                < d.get("max_ongoing_requests", math.inf)), "queue-based autoscaling needs headroom"


def test_yaml_unknown_arg_is_an_error(kvarn_args):
    from pydantic import ValidationError

    from kvarn_ray.app import KvarnAppArgs

    with pytest.raises(ValidationError):
        KvarnAppArgs.model_validate({**kvarn_args, "kv_cache_dtyp": "auto"})


# --------------------------------------------------------------------------- basics


def test_models_and_health(base_url):
    r = httpx.get(f"{base_url}/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert httpx.get(f"{base_url}/health").status_code == 200
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_completion_greedy_equals_single_engine(client, reference_llm, tokenizer):
    for prompt in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        ids = tokenizer(prompt).input_ids
        assert r.choices[0].text == reference_text(reference_llm, ids, 8), prompt
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
        assert r.choices[0].finish_reason in ("stop", "length")
        meta = r.model_extra["kvarn"]
        assert meta["prefill_replica"] and meta["decode_replica"]
        assert meta["payload_bytes"] > 0 and meta["reprefills"] == 0


def test_chat_greedy_equals_single_engine(client, reference_llm, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference_text(reference_llm, ids, 10)
    assert r.usage.prompt_tokens == len(ids)
    assert r.model_extra["kvarn"]["payload_bytes"] > 0


def test_streaming_equals_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices]) > 1, "tokens should arrive in several chunks"

    chat_full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                               temperature=0)
    chat_chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                      temperature=0, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == \
        chat_full.choices[0].message.content


def test_first_token_streams_before_any_decode_step(client, base_url, tokenizer):
    """The prefill replica samples the first token; the decode replica streams it as soon as
    the payload is imported, not with its first decode step. With the decode engine's steps
    held (calls such as the import still run), the first chunk of an HTTP stream and of a
    handle stream arrives, carries exactly the prefill's token, and the engine's step
    counter has not moved. (Before, the first chunk came out of the first decode step, with
    the second token: under the hold it never came, and the 30 s read timeout failed this.)"""
    import openai
    from concurrent.futures import ThreadPoolExecutor
    from ray import serve

    wait_for_baseline()
    ids = tokenizer(PROMPTS[0]).input_ids
    payload = _prefill_handle().prefill.remote(
        {"request_id": "t-first", "prompt_token_ids": ids, "transfer_dtype": None,
         "sampling": {"temperature": 0.0, "max_tokens": 1}}).result(timeout_s=120)["payload"]
    first_token = tokenizer.decode([payload.header["first_token_id"]])
    del payload
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    full = client.completions.create(**body).choices[0].text
    assert full.startswith(first_token)

    decode = _decode_handle()
    quick = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    pool = ThreadPoolExecutor(1)
    decode.debug_hold_steps.remote(True).result(timeout_s=60)
    try:
        steps = decode_stats()["num_steps"]
        http_stream = iter(quick.completions.create(**body, stream=True, logprobs=0))
        h0 = next(http_stream)                       # SSE: openai.APITimeoutError if it never comes
        assert h0.choices[0].logprobs.tokens == [first_token]
        assert h0.choices[0].text == first_token and h0.choices[0].finish_reason is None
        gen = serve.get_app_handle(APP_NAME).options(stream=True).generate.remote(
            {**body, "stream": True, "logprobs": 0})
        handle_stream = iter(gen)
        p0 = pool.submit(next, handle_stream).result(timeout=30)
        assert p0["choices"][0]["logprobs"]["tokens"] == [first_token]
        assert p0["choices"][0]["text"] == first_token
        s = decode_stats()
        assert s["num_steps"] == steps, "the first chunks came out of a decode step"
        assert s["has_unfinished_requests"]          # both requests are imported, not decoded
    finally:
        decode.debug_hold_steps.remote(False).result(timeout_s=60)
        pool.shutdown(wait=False)
    http_rest = list(http_stream)
    assert h0.choices[0].text + "".join(c.choices[0].text for c in http_rest if c.choices) == full
    handle_rest = list(handle_stream)
    assert "".join(c["choices"][0]["text"] for c in [p0] + handle_rest if c["choices"]) == full
    wait_for_baseline()


def _check_top(alternatives: list[tuple[str, float]], token: str, logprob: float, n: int) -> None:
    """The N best alternatives of one greedy token: the token first, logprobs <= 0, descending."""
    assert len(alternatives) == n, alternatives
    assert alternatives[0] == (token, logprob), (alternatives, token, logprob)
    values = [v for _, v in alternatives]
    assert all(v <= 0.0 for v in values) and values == sorted(values, reverse=True), values
    assert len({t for t, _ in alternatives}) == n


def test_top_logprobs_completions_and_chat(client):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    r = client.completions.create(**body, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        _check_top(list(top.items()), tok, tok_lp, 3)
    chunks = [c for c in client.completions.create(**body, logprobs=3, stream=True) if c.choices]
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    streamed = [top for c in chunks for top in c.choices[0].logprobs.top_logprobs]
    assert [list(t) for t in streamed] == [list(t) for t in lp.top_logprobs]
    for a, b in zip(streamed, lp.top_logprobs):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
    # logprobs=0: no alternatives, the sampled token alone (OpenAI's "up to logprobs + 1")
    lp0 = client.completions.create(**body, logprobs=0).choices[0].logprobs
    assert [list(t.items()) for t in lp0.top_logprobs] == \
        [[(t, v)] for t, v in zip(lp0.tokens, lp0.token_logprobs)]

    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "temperature": 0}
    c = client.chat.completions.create(**chat, logprobs=True, top_logprobs=4)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 5
    for e in content:
        assert e.bytes == list(e.token.encode("utf-8"))
        _check_top([(a.token, a.logprob) for a in e.top_logprobs], e.token, e.logprob, 4)
    chat_chunks = [x for x in client.chat.completions.create(**chat, logprobs=True, top_logprobs=4,
                                                            stream=True) if x.choices]
    streamed = [e for x in chat_chunks if x.choices[0].logprobs for e in x.choices[0].logprobs.content]
    assert [(e.token, [a.token for a in e.top_logprobs]) for e in streamed] == \
        [(e.token, [a.token for a in e.top_logprobs]) for e in content]
    # logprobs without top_logprobs: the chosen token only, no alternatives (OpenAI's shape)
    c0 = client.chat.completions.create(**chat, logprobs=True)
    assert all(e.top_logprobs == [] for e in c0.choices[0].logprobs.content)


def test_sampling_seed_stop_logprobs(client):
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text, "same seed, same text"

    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    words = greedy.choices[0].text.split()
    if len(words) >= 2:
        stop = words[1]
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                      stop=[stop])
        assert r.choices[0].finish_reason == "stop"
        assert stop not in r.choices[0].text

    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens == len(lp.tokens)
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert "".join(lp.tokens).strip() == r.choices[0].text.strip() or lp.tokens

    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens


# --------------------------------------------------------------------------- the P/D path


def test_payload_is_kvarn_and_smaller_than_fp16(client, tokenizer, kvarn_app):
    preset = kvarn_app["args"]["kv_cache_dtype"]
    ids = tokenizer(LONG_PROMPT).input_ids
    n = len(ids)
    assert 1000 < n < kvarn_app["args"]["max_model_len"] - 8
    expected, record_ratio = expected_payload_nbytes(n, preset)
    assert abs(record_ratio - 4.49) < 0.01  # SmolLM2 head_dim 64, K4/V2, G=128

    r = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    meta = r.model_extra["kvarn"]
    assert meta["transfer_dtype"] == preset and meta["payload_dtype"] == preset
    assert meta["payload_bytes"] == expected
    fp16 = 2 * 30 * 3 * n * 64 * 2
    assert meta["fp16_equivalent_bytes"] == fp16
    assert fp16 / expected > 2.4  # sink (128 tokens) and tail stay fp16

    # The same prompt shipped as the fp16 baseline ('auto': the prefill engine's dtype,
    # float32 on CPU, counted at 2 bytes per element).
    prefill = _prefill_handle()
    common = {"prompt_token_ids": ids, "sampling": {"temperature": 0.0, "max_tokens": 1}}
    kv = prefill.prefill.remote({**common, "request_id": "t-kv", "transfer_dtype": preset}
                                ).result(timeout_s=300)["payload"]
    auto = prefill.prefill.remote({**common, "request_id": "t-auto", "transfer_dtype": "auto"}
                                  ).result(timeout_s=300)["payload"]
    assert kv.nbytes == expected
    auto_fp16 = auto.nbytes * 2 // auto.sink.dtype.itemsize
    assert auto_fp16 == fp16
    nrec = kv.records.shape[2]
    assert nrec == n // 128 - 1
    records_fp16 = 2 * 30 * 3 * nrec * 128 * 64 * 2
    assert abs(records_fp16 / kv.records.nbytes - 4.49) < 0.01
    assert kv.header["first_token_id"] == auto.header["first_token_id"]
    del kv, auto
    wait_for_baseline()


def test_payload_failing_validation_is_reprefilled_once(client):
    decode = _decode_handle()
    ok = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)

    decode.debug_fail_next_payloads.remote(1).result()
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.model_extra["kvarn"]["reprefills"] == 1
    assert r.choices[0].text == ok.choices[0].text

    decode.debug_fail_next_payloads.remote(2).result()
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "payload_invalid"
    wait_for_baseline()


def test_no_payload_stays_pinned(client):
    wait_for_baseline()
    gc.collect()
    before = object_store_bytes_used()
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    s = wait_for_baseline()
    assert s["num_live_payloads"] in (0, None)
    deadline = time.monotonic() + 30
    while object_store_bytes_used() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert object_store_bytes_used() <= before


# --------------------------------------------------------------------------- errors


def _bad_requests(max_model_len: int) -> list[tuple[str, str, object]]:
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        ("empty prompt", c, {**ok, "prompt": ""}),
        ("empty token prompt", c, {**ok, "prompt": []}),
        ("empty messages", ch, {**chat, "messages": []}),
        ("prompt + max_tokens over the context", c, {**ok, "max_tokens": max_model_len}),
        ("long prompt over the context", c, {**ok, "prompt": "hello " * max_model_len}),
        ("temperature < 0", c, {**ok, "temperature": -0.5}),
        ("temperature > 2", ch, {**chat, "temperature": 3}),
        ("top_p = 0", c, {**ok, "top_p": 0}),
        ("top_p > 1", c, {**ok, "top_p": 1.5}),
        ("max_tokens = 0", c, {**ok, "max_tokens": 0}),
        ("top_k < -1", c, {**ok, "top_k": -5}),
        ("n = 2", c, {**ok, "n": 2}),
        ("logprobs > 5", c, {**ok, "logprobs": 9}),
        ("top_logprobs > 20", ch, {**chat, "logprobs": True, "top_logprobs": 21}),
        ("top_logprobs without logprobs", ch, {**chat, "top_logprobs": 2}),
        ("max_tokens a string", c, {**ok, "max_tokens": "4"}),
        ("temperature a bool", c, {**ok, "temperature": True}),
        ("prompt a number", c, {**ok, "prompt": 5}),
        ("stop a number", c, {**ok, "stop": 3}),
        ("seed a float", c, {**ok, "seed": 1.5}),
        ("stream a string", c, {**ok, "stream": "yes"}),
        ("messages a string", ch, {**chat, "messages": "hi"}),
        ("unknown role", ch, {**chat, "messages": [{"role": "robot", "content": "hi"}]}),
        ("token id out of vocabulary", c, {**ok, "prompt": [1, 10**9]}),
        ("missing model", c, {"prompt": "hi"}),
        ("unknown model", c, {**ok, "model": "gpt-5"}),
        ("unknown model, chat", ch, {**chat, "model": "gpt-5"}),
        ("malformed JSON", c, '{"model": "smollm2-135m", "prompt": "hi"'),
        ("JSON not an object", c, "[1, 2]"),
    ]


def test_bad_requests_are_400_and_allocate_nothing(base_url, kvarn_app):
    before = wait_for_baseline()
    cases = _bad_requests(kvarn_app["args"]["max_model_len"])
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for name, path, body in cases:
            content = body if isinstance(body, str) else json.dumps(body)
            r = http.post(path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert err["type"] == "invalid_request_error" and err["message"], name
    after = decode_stats()
    assert after["num_steps"] == before["num_steps"], "a rejected request reached the engine"
    assert after["num_free_blocks"] == after["baseline_free_blocks"]


def test_openai_client_sees_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------- cancellation


def test_client_disconnect_frees_blocks(base_url):
    wait_for_baseline()
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
            s = decode_stats()
            assert s["num_free_blocks"] < s["baseline_free_blocks"], "the request should hold blocks"
        # leaving the block closes the connection mid-stream
    s = wait_for_baseline(30)
    assert s["num_free_blocks"] == s["baseline_free_blocks"]


def test_handle_stream_cancel_frees_blocks(kvarn_app):
    from ray import serve

    wait_for_baseline()
    handle = serve.get_app_handle(APP_NAME)
    gen = handle.options(stream=True).generate.remote(
        {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
         "ignore_eos": True, "stream": True})
    first = next(iter(gen))
    assert first["object"] == "text_completion"
    gen.cancel()
    wait_for_baseline(30)


# --------------------------------------------------------------------------- Python API


def test_handle_api_both_call_styles(client, kvarn_app):
    from ray import serve

    from kvarn_ray.protocol import APIError

    handle = serve.get_app_handle(APP_NAME)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    http = client.completions.create(**body)

    sync = handle.generate.remote(body).result(timeout_s=120)
    assert sync["object"] == "text_completion"
    assert sync["choices"][0]["text"] == http.choices[0].text

    async def run_async():
        return await handle.generate.remote(body)

    assert asyncio.run(run_async())["choices"][0]["text"] == http.choices[0].text

    chunks = list(handle.options(stream=True).generate.remote({**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == http.choices[0].text

    chat = handle.generate.remote({"model": MODEL, "messages": CHAT, "max_tokens": 6,
                                   "temperature": 0}).result(timeout_s=120)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"

    with pytest.raises(APIError) as e:
        handle.generate.remote({**body, "temperature": -1}).result(timeout_s=60)
    assert e.value.status_code == 400 and e.value.body["error"]["param"] == "temperature"


# --------------------------------------------------------------------------- admission (no Ray)


def test_admission_is_bounded_fifo_and_reserves():
    """DecodeServer's admitter on a fake engine: 8 free blocks of 128 tokens, one pool."""
    from types import SimpleNamespace

    from kvarn_ray.decode_server import _Admission, _Admitter
    from kvarn_ray.protocol import APIError

    g = 128
    pool = SimpleNamespace(num_free=8)
    bm = SimpleNamespace(fp16=pool, records=SimpleNamespace(num_free=0), tables={},
                         demand_alone=lambda n, chunk: (math.ceil(n / g), 0))
    engine = SimpleNamespace(
        block_manager=bm, scheduler=SimpleNamespace(waiting=[]),
        config=SimpleNamespace(max_num_batched_tokens=512),
        can_admit=lambda n, m: math.ceil((n + m) / g) <= pool.num_free)
    adm = _Admitter(engine, max_waiting=2)

    a = _Admission("a", 500, 12)            # 4 blocks: admitted at once, reserved
    adm.enqueue(a)
    assert a.future.result(0) is True and adm.reserved == {"a": (500, 12)}
    b = _Admission("b", 600, 40)            # 5 blocks: 4 + 5 > 8, waits
    c = _Admission("c", 100, 10)            # 1 block: fits, but FIFO keeps it behind b
    adm.enqueue(b)
    adm.enqueue(c)
    assert not b.future.done() and not c.future.done()
    with pytest.raises(APIError) as e:      # the queue holds max_waiting=2
        adm.enqueue(_Admission("d", 10, 1))
    assert e.value.status_code == 503 and e.value.headers["Retry-After"]

    adm.withdraw("a")                       # a ended before its payload arrived
    assert b.future.result(0) and c.future.result(0)
    assert set(adm.reserved) == {"b", "c"} and not adm.waiting
    adm.withdraw("b")
    adm.withdraw("c")
    assert adm.reserved == {}
