"""The engine on CUDA (Triton kernels, CUDA-graph decode) against itself and the CPU path.

Tiny dummy Llama (seeded random weights, 4 q / 2 KV heads), fp16 on both devices so
the only differences are the kernels' summation orders. Prompts of 300 and 260 tokens
put records in the context (blocks 1 and 2 quantized during prefill, block 2 or 3
during decode); 129 and 7 tokens cover a tail just past a block and a sink-only
sequence. GPU only (-m gpu); the CPU-only engine tests cover the rest.
"""
import pytest

from conftest import run_to_end
from kvarn.engine import EngineConfig, LLMEngine, SamplingParams
from kvarn.models.layers import prepack_cpu_linears
from kvarn.models.loader import dummy_weights

pytestmark = pytest.mark.gpu

TINY = dict(model="dummy:tiny-llama", load_format="dummy", dtype="float16", max_model_len=1024,
            kv_cache_memory_bytes=64 * 2**20, max_num_batched_tokens=256)
PROMPTS = [[(7 * i + 3 * j) % 4000 + 5 for j in range(n)] for i, n in enumerate((300, 260, 129, 7))]
NEW = 24


def greedy(engine, prompts=PROMPTS, n=NEW):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = run_to_end(engine, {f"p{i}": (ids, p) for i, ids in enumerate(prompts)})
    assert engine.num_free_blocks == engine.num_total_blocks
    return [outs[f"p{i}"].token_ids for i in range(len(prompts))]


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def engines():
    made = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            e = made[key] = LLMEngine(EngineConfig(**TINY, **kw))
            # dummy weights are drawn on the engine's device, and CUDA's generator gives
            # other numbers than the CPU's: load the CPU-drawn tensors (in place, so
            # captured CUDA graphs stay valid) to compare one model across devices
            w = e.executor.worker
            w.model.load_weights(dummy_weights(type(w.model).checkpoint_shapes(w.hf_config), 0, "cpu"))
            prepack_cpu_linears(w.model)
        return made[key]

    yield get
    for e in made.values():
        e.shutdown()


@pytest.mark.parametrize("kv", ["auto", "kvarn_k4v2_g128"])
def test_cuda_graphs_give_the_eager_tokens(engines, kv):
    """Graph replay runs the same kernels on the same shapes: identical tokens."""
    assert greedy(engines(kv_cache_dtype=kv, device="cuda")) == \
        greedy(engines(kv_cache_dtype=kv, device="cuda", enforce_eager=True))


@pytest.mark.parametrize("kv", ["auto", "kvarn_k4v2_g128"])
def test_gpu_greedy_tokens_track_the_cpu_path(engines, kv):
    """Triton (GPU) vs the torch reference (CPU), both fp16: the same first tokens, and
    long common prefixes (random weights make near-ties, where fp16 summation order
    may flip a token and the continuations then part)."""
    gpu = greedy(engines(kv_cache_dtype=kv, device="cuda"))
    cpu = greedy(engines(kv_cache_dtype=kv, device="cpu"))
    agree = [common_prefix(a, b) for a, b in zip(gpu, cpu)]
    print(f"{kv}: common prefix per prompt {agree} of {NEW}")
    # H100, commit 84357da+: every prompt identical over all 24 tokens, both caches; the
    # bound leaves room for one late near-tie flip on another GPU or Triton version
    assert all(a >= NEW // 2 for a in agree)
    assert sum(agree) >= 4 * NEW - 8


@pytest.mark.parametrize("kv", ["auto", "kvarn_k4v2_g128"])
def test_gpu_payload_continues_exactly(engines, kv):
    """Prefill on one GPU engine, export, import into another, continue: the tokens of
    one engine doing both (records are the store kernel's bytes either way)."""
    one = engines(kv_cache_dtype=kv, device="cuda")
    ref = greedy(one, PROMPTS[:1], n=12)[0]
    pre = engines(kv_cache_dtype=kv, device="cuda", seed=0, max_num_seqs=8)
    pre.add_request("x", PROMPTS[0], SamplingParams(temperature=0, max_tokens=1), export_kv=kv)
    payload = None
    while pre.has_unfinished_requests():
        for o in pre.step():
            payload = o.payload if o.finished else payload
    assert payload is not None and payload.first_token_id == ref[0]
    one.add_request_from_payload("c", payload, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    last = None
    while one.has_unfinished_requests():
        for o in one.step():
            last = o
    assert last.token_ids == ref
    assert one.num_free_blocks == one.num_total_blocks
