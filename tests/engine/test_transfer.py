"""KVPayload: byte and pickle round trips, head slices, and every validation error.

Engine-level checks use the tiny dummy Llama (2 layers, 2 KV heads, D=64): a payload
that fails validation raises PayloadError and allocates nothing.
"""
import pickle

import numpy as np
import pytest

from kvarn.engine import EngineConfig, LLMEngine, NotEnoughBlocks, SamplingParams
from kvarn.format import KVarNConfig
from kvarn.transfer import KVPayload, PayloadError

HKV, L, D, G = 2, 2, 64, 128


def synthetic(num_tokens=300, kv_dtype="kvarn_k4v2_g128", fingerprint="fp"):
    rng = np.random.default_rng(0)
    quant = kv_dtype != "auto"
    rb = KVarNConfig.from_name(kv_dtype, D).record_bytes if quant else 0
    ns = min(num_tokens, G)
    nrec = max(num_tokens // G - 1, 0) if quant else 0
    nt = num_tokens - ns - nrec * G
    header = {"kv_dtype": kv_dtype, "model_fingerprint": fingerprint, "num_layers": L, "num_kv_heads": HKV,
              "head_dim": D, "group_size": G, "num_tokens": num_tokens,
              "prompt_token_ids": list(range(1, num_tokens + 1)), "first_token_id": 5, "first_token_logprob": -0.5,
              "frame": "rotated" if quant else "model", "dtype": "float16", "record_bytes": rb}
    return KVPayload.build(header,
                           rng.integers(0, 255, (HKV, L, nrec, rb), dtype=np.uint8),
                           rng.standard_normal((HKV, L, 2, ns, D)).astype(np.float16),
                           rng.standard_normal((HKV, L, 2, nt, D)).astype(np.float16))


def same(a: KVPayload, b: KVPayload):
    assert a.header == b.header
    for k in ("records", "sink", "tail"):
        assert np.array_equal(getattr(a, k), getattr(b, k))


def test_bytes_round_trip_and_sizes():
    p = synthetic()
    assert p.records.shape == (HKV, L, 1, 7296) and p.sink.shape == (HKV, L, 2, 128, D)
    assert p.tail.shape == (HKV, L, 2, 44, D)
    q = KVPayload.from_bytes(p.to_bytes())
    same(p, q)
    q.validate({"kv_cache_dtype": "kvarn_k4v2_g128"})
    assert p.nbytes == p.records.nbytes + p.sink.nbytes + p.tail.nbytes
    assert p.fp16_equivalent_nbytes == 2 * L * HKV * 300 * D * 2
    assert not q.records.flags.writeable               # views into the received bytes


def test_pickle5_ships_buffers_out_of_band():
    p = synthetic()
    bufs = []
    blob = pickle.dumps(p, protocol=5, buffer_callback=bufs.append)
    assert len(blob) < 4096 and len(bufs) == 3          # the arrays travel as raw buffers
    q = pickle.loads(blob, buffers=bufs)
    same(p, q)
    q.validate({})


def test_slice_heads_is_a_zero_copy_view():
    p = synthetic()
    s = p.slice_heads(1, 2)
    assert np.shares_memory(s.sink, p.sink) and s.sink.shape[0] == 1
    assert s.header["head_range"] == [1, 2]
    with pytest.raises(PayloadError):
        p.slice_heads(1, 3)


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.header.update(version=99), "version"),
    (lambda p: p.header.update(kv_dtype="kvarn_k4v4_g128"), "does not match this engine's kv_cache_dtype"),
    (lambda p: p.header.update(model_fingerprint="other"), "made by model"),
    (lambda p: p.header.update(num_layers=3), "num_layers"),
    (lambda p: p.header.update(num_tokens=301), "num_tokens"),
    (lambda p: setattr(p, "tail", p.tail[:, :, :, :-1]), "tail is"),
    (lambda p: setattr(p, "records", p.records[..., :-8]), "records is"),
    (lambda p: p.sink.__setitem__((0, 0, 0, 0, 0), 7.0), "checksum"),
    (lambda p: p.header.update(first_token_id=4), "checksum"),
    (lambda p: p.header.pop("frame"), "lacks frame"),
])
def test_validation_errors(mutate, match):
    p = synthetic()
    mutate(p)
    with pytest.raises(PayloadError, match=match):
        p.validate({"kv_cache_dtype": "kvarn_k4v2_g128", "model_fingerprint": "fp", "num_layers": L,
                    "num_kv_heads": HKV, "head_dim": D, "group_size": G})


def test_malformed_bytes():
    with pytest.raises(PayloadError, match="magic"):
        KVPayload.from_bytes(b"nope")
    good = synthetic().to_bytes()
    with pytest.raises(PayloadError):
        KVPayload.from_bytes(good[:-100])


@pytest.fixture(scope="module")
def tiny_engines():
    kw = dict(model="dummy:tiny-llama", load_format="dummy", device="cpu", max_model_len=1024,
              kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=256)
    k = LLMEngine(EngineConfig(kv_cache_dtype="kvarn_k4v2_g128", **kw))
    a = LLMEngine(EngineConfig(kv_cache_dtype="auto", **kw))
    yield k, a
    k.shutdown()
    a.shutdown()


def export(engine, n, kv):
    engine.add_request("x", list(range(3, 3 + n)), SamplingParams(temperature=0, max_tokens=4), export_kv=kv)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    (o,) = outs
    assert o.finished and o.finish_reason == "prefill" and len(o.token_ids) == 1
    assert engine.num_free_blocks == engine.num_total_blocks
    return o.payload


def test_engine_rejects_bad_payloads_and_allocates_nothing(tiny_engines):
    k, a = tiny_engines
    p = export(k, 300, "kvarn_k4v2_g128")
    assert p.header["model_fingerprint"] == k.model_fingerprint and p.records.shape[2] == 1
    assert p.nbytes < p.fp16_equivalent_nbytes
    free = k.num_free_blocks
    bad = [
        KVPayload({**p.header, "version": 2}, p.records, p.sink, p.tail),
        KVPayload({**p.header, "model_fingerprint": "0" * 16}, p.records, p.sink, p.tail),
        KVPayload(p.header, p.records, p.sink[:, :, :, :-1], p.tail),
        KVPayload(dict(p.header), p.records, p.sink, p.tail.copy() + np.float16(1)),
    ]
    for b in bad:
        with pytest.raises(PayloadError):
            k.add_request_from_payload("y", b, SamplingParams(max_tokens=4))
        assert k.num_free_blocks == free and not k.has_unfinished_requests()
    with pytest.raises(PayloadError, match="kv_cache_dtype"):
        a.add_request_from_payload("y", p, SamplingParams(max_tokens=4))      # KVarN into 'auto'
    assert a.num_free_blocks == a.num_total_blocks
    q = export(a, 200, "auto")
    assert q.header["frame"] == "model" and q.records.shape[2] == 0 and q.tail.shape[3] == 72
    k.add_request_from_payload("z", q, SamplingParams(temperature=0, max_tokens=3))    # 'auto' into KVarN
    assert k.num_free_blocks < free
    k.abort_request("z")
    assert k.num_free_blocks == k.num_total_blocks
    k.step()


def test_import_when_full_raises_not_enough_blocks(tiny_engines):
    k, _ = tiny_engines
    p = export(k, 700, "kvarn_k4v2_g128")
    admitted = []
    with pytest.raises(NotEnoughBlocks):
        for i in range(10_000):
            k.add_request_from_payload(f"n{i}", p, SamplingParams(max_tokens=4))
            admitted.append(f"n{i}")
    assert admitted                                     # some fit, then the pool ran out
    used = k.num_total_blocks - k.num_free_blocks
    for r in admitted:
        k.abort_request(r)
    assert used > 0 and k.num_free_blocks == k.num_total_blocks
    k.step()
