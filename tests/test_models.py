"""The model layer against Hugging Face transformers, and its tensor-parallel sharding.

(a) SmolLM2-135M (real weights, fp32, dense path): logits and greedy tokens equal HF's.
(b) Tiny random Qwen3 / Qwen2 / Llama-3.1 / Mistral configs: logits equal HF's for the
    same state dict (q/k norm, biases, head_dim != hidden/heads, llama3 RoPE, tying).
(c) TP=2 over gloo in two processes equals TP=1 (KV heads split, replicated, padded vocab).
(d) Dummy weights are deterministic and shard consistently; errors are clear.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvarn.distributed import destroy_tp, init_tp, tp_all_gather, tp_all_reduce, tp_broadcast_object
from kvarn.models.context import ForwardContext, get_forward_context, set_forward_context
from kvarn.models.loader import load_hf_config, load_model, model_fingerprint
from kvarn.models.registry import get_model_class

TINY_HF_CONFIGS = {
    # q/k RMSNorm per head, no bias, head_dim 32 while hidden/heads is 16
    "qwen3": dict(model_type="qwen3", head_dim=32, attention_bias=False, tie_word_embeddings=False),
    # Qwen3 with attention_bias: q/k/v and o_proj biases
    "qwen3-bias": dict(model_type="qwen3", head_dim=32, attention_bias=True, tie_word_embeddings=True),
    # q/k/v bias always, o_proj without; tied embeddings as in Qwen2.5-0.5B
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    # Llama-3.1 RoPE scaling (a short original context so all three frequency bands occur),
    # attention and MLP biases
    "llama31": dict(
        model_type="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


def _tiny_hf_config(name: str):
    from transformers import AutoConfig

    kw = dict(TINY_HF_CONFIGS[name])
    model_type = kw.pop("model_type")
    base = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1), so biases and norms matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


# --------------------------------------------------------------------------- (a) SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from kvarn.models.resolve import resolve

    try:
        folder = resolve("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"embedded SmolLM2 not available: {e}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, config = load_model("smollm2-135m", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = (
        "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
        "steps as his father had taught him, until"
    )
    ids = torch.tensor(tok(text)["input_ids"][:20])
    assert ids.numel() == 20
    return ours, hf, config, ids


def test_smollm2_logits_match_transformers(smollm2):
    ours, hf, config, ids = smollm2
    assert ours.num_layers == 30 and ours.num_heads_local == 9 and ours.num_kv_heads_local == 3
    assert ours.head_dim == 64 and ours.dtype == torch.float32
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, torch.arange(ids.numel())))
        ref = hf(ids[None]).logits[0].float()
    assert logits.dtype == torch.float32 and logits.shape == (20, config.vocab_size)
    max_diff = (logits - ref).abs().max().item()
    print(f"SmolLM2 fp32 logits max |ours - HF| = {max_diff:.3e}")
    assert max_diff < 1e-3
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_smollm2_greedy_matches_generate(smollm2):
    ours, hf, config, ids = smollm2
    num_new = 16
    with torch.no_grad():
        out = hf.generate(
            ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
            max_new_tokens=num_new, do_sample=False, pad_token_id=config.pad_token_id,
        )[0, ids.numel():].tolist()
        seq = ids.tolist()
        for _ in range(len(out)):
            t = torch.tensor(seq)
            hidden = ours(t, torch.arange(t.numel()))
            seq.append(int(ours.compute_logits(hidden[-1:]).argmax(-1)))
    assert len(out) == num_new  # a plain English continuation, not an early eos
    assert seq[ids.numel():] == out


# --------------------------------------------------------------------------- (b) tiny HF


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_tiny_config_matches_transformers(name):
    from transformers import AutoModelForCausalLM

    config = _tiny_hf_config(name)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(hf, seed=1)

    ours = get_model_class(config)(config)
    loaded = ours.load_weights(hf.state_dict().items())
    assert loaded == {n for n, _ in ours.named_parameters()}
    ids = torch.randint(0, config.vocab_size, (23,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, torch.arange(ids.numel())))
        ref = hf(ids[None]).logits[0].float()
    assert (logits - ref).abs().max().item() < 1e-4


def test_forward_context_routes_attention_to_backend():
    """With a context, every layer's attention goes to the backend (here: dense attention
    that records its calls), and the result equals the no-context path."""
    from kvarn.models.attention import dense_causal_attention

    model, _ = load_model("dummy:tiny-llama")

    class RecordingBackend:
        def __init__(self):
            self.calls = []

        def forward(self, layer_idx, q, k, v, metadata):
            self.calls.append((layer_idx, tuple(q.shape), tuple(k.shape), tuple(v.shape), metadata))
            return dense_causal_attention(q, k, v, q.shape[-1] ** -0.5)

    ids, pos = torch.arange(5, 14), torch.arange(9)
    backend = RecordingBackend()
    with torch.no_grad():
        dense = model(ids, pos)
        assert get_forward_context() is None
        with set_forward_context(ForwardContext(backend, "meta")):
            routed = model(ids, pos)
        assert get_forward_context() is None
    assert [c[0] for c in backend.calls] == [0, 1]
    assert backend.calls[0][1:] == ((9, 4, 64), (9, 2, 64), (9, 2, 64), "meta")
    torch.testing.assert_close(routed, dense, rtol=0, atol=0)


# --------------------------------------------------------------------------- (c) TP=2

TP_CASES = {
    "tiny-llama": None,  # the shipped config: 4 heads, 2 KV heads, vocab 49152
    "kv1": dict(num_key_value_heads=1),  # 1 KV head < TP 2: replicated
    # q/k norm, all biases, tied embeddings, a vocab that does not split evenly
    "qwen3-odd-vocab": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=True,
        tie_word_embeddings=True, vocab_size=1001,
    ),
}


def _tp_case_config(name: str):
    config = load_hf_config("dummy:tiny-llama")
    override = TP_CASES[name]
    if override is None:
        return config
    from transformers import AutoConfig

    d = config.to_dict()
    d.update(override)
    d.pop("transformers_version", None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _tp_inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 1000, (11,), generator=gen), torch.arange(11)


def _tp_logits(name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    model, _ = load_model(_tp_case_config(name), load_format="dummy", tp_rank=tp_rank, tp_size=tp_size, seed=7)
    ids, pos = _tp_inputs()
    with torch.no_grad():
        return model.compute_logits(model(ids, pos))


def _tp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_tp(rank, world_size, "gloo", f"file://{init_file}")
    try:
        for name in TP_CASES:
            torch.save(_tp_logits(name, rank, world_size), f"{out_dir}/{name}.rank{rank}.pt")
        got = {
            "broadcast": tp_broadcast_object({"step": 5, "from": rank}, src=0),
            "all_gather": tp_all_gather(torch.full((2, 1), float(rank)), dim=1).tolist(),
            "all_reduce": tp_all_reduce(torch.tensor([rank + 1.0])).tolist(),
        }
        with open(f"{out_dir}/collectives.rank{rank}.json", "w") as f:
            json.dump(got, f)
    finally:
        destroy_tp()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(_tp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", list(TP_CASES))
def test_tp2_logits_equal_tp1(tp2_results, name):
    ref = _tp_logits(name, 0, 1)
    for rank in range(2):
        got = torch.load(tp2_results / f"{name}.rank{rank}.pt")
        assert got.shape == ref.shape  # the full vocab on every rank
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_tp2_collectives(tp2_results):
    for rank in range(2):
        got = json.loads((tp2_results / f"collectives.rank{rank}.json").read_text())
        assert got["broadcast"] == {"step": 5, "from": 0}
        assert got["all_gather"] == [[0.0, 1.0], [0.0, 1.0]]
        assert got["all_reduce"] == [3.0]


# --------------------------------------------------------------------------- (d) dummy


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_dummy_weights_are_deterministic():
    a = _state(load_model("dummy:tiny-llama", seed=0)[0])
    b = _state(load_model("dummy:tiny-llama", load_format="dummy", seed=0)[0])
    c = _state(load_model("tiny-llama", load_format="dummy", seed=1)[0])
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.self_attn.qkv_proj.weight"], c["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(128))
    w = a["model.layers.1.mlp.down_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.002
    # The model dtype only rounds the same draw.
    half = _state(load_model("dummy:tiny-llama", dtype=torch.bfloat16)[0])
    assert torch.equal(half["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_dummy_shards_reassemble_to_tp1(num_kv_heads):
    config = _tp_case_config("tiny-llama" if num_kv_heads == 2 else "kv1")
    full = _state(load_model(config, load_format="dummy", seed=3)[0])
    ranks = [load_model(config, load_format="dummy", seed=3, tp_rank=r, tp_size=2)[0] for r in range(2)]
    shards = [_state(m) for m in ranks]
    d, hq, hkv = 64, 4, num_kv_heads
    qkv = full["model.layers.0.self_attn.qkv_proj.weight"]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d])
    for r, (m, s) in enumerate(zip(ranks, shards)):
        assert m.num_heads_local == 2 and m.num_kv_heads_local == 1
        kv_head = r if num_kv_heads == 2 else 0
        expected = torch.cat([q[r * 2 * d:(r + 1) * 2 * d], k[kv_head * d:(kv_head + 1) * d], v[kv_head * d:(kv_head + 1) * d]])
        assert torch.equal(s["model.layers.0.self_attn.qkv_proj.weight"], expected)
    for name, dim in [
        ("model.embed_tokens.weight", 0),
        ("lm_head.weight", 0),
        ("model.layers.1.self_attn.o_proj.weight", 1),
        ("model.layers.1.mlp.down_proj.weight", 1),
    ]:
        assert torch.equal(torch.cat([s[name] for s in shards], dim=dim), full[name]), name
    gate, up = full["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    rebuilt = [s["model.layers.1.mlp.gate_up_proj.weight"].chunk(2) for s in shards]
    assert torch.equal(torch.cat([g for g, _ in rebuilt]), gate)
    assert torch.equal(torch.cat([u for _, u in rebuilt]), up)
    # A TP=2 shard without its group must not silently compute a partial result.
    with pytest.raises(RuntimeError, match="init_tp"):
        ranks[0](torch.tensor([1, 2]), torch.arange(2))


def test_load_weights_rejects_incomplete_or_mismatched_checkpoints():
    from kvarn.models.llama import LlamaForCausalLM

    config = load_hf_config("dummy:tiny-llama")
    full = dict((n, torch.zeros(shape)) for n, shape in LlamaForCausalLM.checkpoint_shapes(config))
    model = LlamaForCausalLM(config)
    assert model.load_weights(full.items()) == {n for n, _ in model.named_parameters()}
    without_k = {n: t for n, t in full.items() if n != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight \(shards \['k'\]\)"):
        model.load_weights(without_k.items())
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(255, 128))])
    with pytest.raises(ValueError, match="no parameter"):
        model.load_weights([("model.layers.0.mlp.experts.weight", torch.zeros(1))])
    # rotary buffers of old checkpoints are skipped
    model.load_weights([("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(32))], strict=False)


def test_shipped_configs():
    llama = load_hf_config("dummy:llama-3-8b")
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads, llama.num_key_value_heads,
            llama.intermediate_size, llama.vocab_size, llama.max_position_embeddings) == (
        4096, 32, 32, 8, 14336, 128256, 131072)
    qwen = load_hf_config("dummy:qwen3-8b")
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.head_dim, qwen.intermediate_size, qwen.vocab_size,
            qwen.max_position_embeddings, qwen.tie_word_embeddings) == (4096, 36, 128, 12288, 151936, 40960, False)
    from kvarn.models.llama import LlamaSpec

    spec = LlamaSpec.from_hf_config(llama)
    assert spec.rope_theta == 500000.0 and spec.rope_scaling["rope_type"] == "llama3"
    assert LlamaSpec.from_hf_config(qwen).qk_norm
    # Pinned: prefill and decode replicas on other machines and transformers versions
    # must compute the same string for the same model.
    assert model_fingerprint(llama, torch.float16) == "44294d369145b4bd"
    assert model_fingerprint(llama, "bfloat16") != model_fingerprint(llama, torch.float16)
    assert model_fingerprint(qwen, torch.float16) != model_fingerprint(llama, torch.float16)


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(config, load_format="dummy")
    with pytest.raises(ValueError, match="dummy:tiny-llama"):
        load_model("dummy:no-such-model")
    with pytest.raises(ValueError, match="load_format"):
        load_model("dummy:tiny-llama", load_format="pickle")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model(load_hf_config("dummy:tiny-llama"))
