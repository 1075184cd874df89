"""Build a model shard and fill its weights.

    load_model(model, dtype, device, tp_rank, tp_size, load_format, seed)
      model ──▶ load_hf_config ──▶ registry class ──▶ cls(config, tp_rank, tp_size) on device
                                                          │ load_weights((hf_name, full tensor), ...)
      load_format "auto" / "safetensors" / "gguf": resolve(model) -> folder, its *.safetensors
                                                  read tensor by tensor
      load_format "dummy": seeded random full tensors (normal std 0.02; ones for norms)

Every rank reads (or generates) the same full tensors and its parameters'
weight_loaders keep its slice, so TP=t shards put together equal TP=1.

``model`` for real weights is anything ``kvarn.models.resolve`` accepts (embedded name,
model folder, .gguf file, cached hub id). For dummy weights it may also be a config:
``"dummy:<name>"`` for a config shipped in ``kvarn/models/configs/`` (``llama-3-8b``,
``qwen3-8b``, ``tiny-llama``; the bare name works too), a ``config.json`` path or its
folder, or a transformers ``PretrainedConfig``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from kvarn.models.layers import prepack_cpu_linears
from kvarn.models.llama import rope_settings
from kvarn.models.registry import get_model_class
from kvarn.models.resolve import MARKER_FILE, resolve

__all__ = [
    "load_model",
    "load_hf_config",
    "model_fingerprint",
    "shipped_configs",
    "iter_safetensors",
    "dummy_weights",
    "LOAD_FORMATS",
]

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
CONFIGS_DIR = Path(__file__).parent / "configs"
DUMMY_PREFIX = "dummy:"

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def shipped_configs() -> list[str]:
    """Names of the configs in ``kvarn/models/configs`` (usable as ``dummy:<name>``)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """None / "auto" -> float16 on CUDA, float32 elsewhere (the config's dtype is not used)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return dtype


# --------------------------------------------------------------------------- config


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if "model_type" not in d:
        raise ValueError(f"{path} has no model_type, so it is not a Hugging Face model config")
    d.pop("transformers_version", None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def load_hf_config(model: Any) -> Any:
    """The transformers config of ``model`` (see the module docstring for what ``model`` may be)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise TypeError(f"model must be a name, a path or a PretrainedConfig, got {type(model).__name__}")
    if model.startswith(DUMMY_PREFIX):
        name = model[len(DUMMY_PREFIX):]
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(
                f"no shipped config {name!r} for {model!r}; shipped: "
                f"{', '.join(DUMMY_PREFIX + n for n in shipped_configs())}"
            )
        return _config_from_json(path)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _config_from_json(path)
    return AutoConfig.from_pretrained(resolve(model))


def model_fingerprint(hf_config: Any, dtype: torch.dtype | str) -> str:
    """Short stable hash of what decides a model's numerics: architecture fields and dtype.

    The same on every machine and transformers version (RoPE settings are normalized),
    so a prefill and a decode replica can check they run the same model. It does not
    hash the weights: two checkpoints of one architecture share a fingerprint.
    """
    if dtype is None or dtype == "auto":
        raise ValueError("model_fingerprint needs the dtype the model runs in (e.g. model.dtype)")
    c = hf_config
    num_heads = c.num_attention_heads
    theta, scaling = rope_settings(c)
    fields = {
        "architectures": list(getattr(c, "architectures", None) or []),
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // num_heads,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": float(c.rms_norm_eps),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "attention_bias": bool(getattr(c, "attention_bias", False)),
        "mlp_bias": bool(getattr(c, "mlp_bias", False)),
        "max_position_embeddings": c.max_position_embeddings,
        "dtype": str(resolve_dtype(dtype, "cpu")).removeprefix("torch."),
    }
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- weights


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards: those named by ``model.safetensors.index.json``, else all."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {folder} (PyTorch .bin checkpoints are not supported; "
            f"convert them to safetensors)"
        )
    return files


def iter_safetensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one tensor in memory at a time."""
    from safetensors import safe_open

    for file in safetensors_files(Path(folder)):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def dummy_weights(
    shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-size random checkpoint tensors: ones for norm weights, else normal(0, 0.02).

    Each tensor has its own generator seeded from (seed, name) and is drawn in fp32, so
    it depends only on seed, name, shape and device type: every TP rank draws the same
    tensor, and the model dtype only rounds it.
    """
    device = torch.device(device)
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.float32, device=device)
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed(_tensor_seed(seed, name))
        tensor = torch.empty(shape, dtype=torch.float32, device=device)
        tensor.normal_(0.0, 0.02, generator=gen)
        yield name, tensor


# --------------------------------------------------------------------------- model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model: Any,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    tp_rank: int = 0,
    tp_size: int = 1,
    load_format: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """Build rank ``tp_rank``'s shard of ``model`` on ``device``; returns (model, hf_config).

    The model is in eval mode with gradients off. ``dtype`` None means float16 on CUDA
    and float32 on CPU. ``seed`` matters only for ``load_format="dummy"``.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) and load_format != "dummy":
        raise ValueError(f"a {type(model).__name__} carries no weights; pass load_format='dummy'")
    named_dummy = isinstance(model, str) and model.startswith(DUMMY_PREFIX)
    if named_dummy and load_format not in ("auto", "dummy"):
        raise ValueError(f"{model!r} names a config without weights; it needs load_format='dummy'")
    folder = None
    if load_format == "dummy" or named_dummy:
        if (
            isinstance(model, str)
            and not named_dummy
            and model in shipped_configs()
            and not Path(model).expanduser().exists()
        ):
            model = DUMMY_PREFIX + model
        hf_config = load_hf_config(model)
    else:
        folder = resolve(model)
        if load_format == "gguf" and not (folder / MARKER_FILE).is_file():
            raise ValueError(
                f"load_format='gguf' needs a .gguf file or an embedded model name; {model!r} "
                f"resolved to {folder}, which was not converted from GGUF"
            )
        hf_config = load_hf_config(str(folder))

    cls = get_model_class(hf_config)
    with _default_dtype(dtype), device:
        net = cls(hf_config, tp_rank=tp_rank, tp_size=tp_size)
    if folder is None:
        net.load_weights(dummy_weights(cls.checkpoint_shapes(hf_config), seed, device))
    else:
        net.load_weights(iter_safetensors(folder))
    net.eval().requires_grad_(False)
    prepack_cpu_linears(net)      # CPU fp32 only; a no-op elsewhere
    return net, hf_config
