"""HF ``config.architectures`` name -> the kvarn model class that implements it."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvarn.models.llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "get_model_class", "supported_architectures"]

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


# Used only when a config names no architectures (e.g. a bare ``LlamaConfig()``).
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class for the first of ``hf_config.architectures`` that kvarn implements
    (or, when the config names none, for its ``model_type``); ValueError otherwise."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures and getattr(hf_config, "model_type", None) in _MODEL_TYPE_TO_ARCH:
        return MODEL_REGISTRY[_MODEL_TYPE_TO_ARCH[hf_config.model_type]]
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none given in config.architectures)'}"
        f"; kvarn supports: {', '.join(supported_architectures())}"
    )
