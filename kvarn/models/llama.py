"""The Llama family as one decoder: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

    input_ids [T], positions [T]                      (a flattened, varlen batch)
      -> embed_tokens                                 [T, hidden]
      -> num_layers x (RMSNorm, attention, RMSNorm, SwiGLU MLP), residual stream
      -> norm                                         [T, hidden]  = forward()
      -> lm_head (on the rows the engine picks)       [N, vocab] fp32 = compute_logits()

    attention of one layer, this rank's heads (hq = Hq/t, hkv = max(1, Hkv/t)):
      qkv_proj -> q [T, hq, D], k [T, hkv, D], v [T, hkv, D]
      (Qwen3: per-head RMSNorm on q and k over D) -> RoPE on q, k
      -> Attention (engine backend or dense causal) -> [T, hq*D] -> o_proj (all-reduce)

What differs between the family members, all read from the HF config by ``LlamaSpec``:

    model_type   q/k/v bias        o_proj bias       q/k norm
    llama        attention_bias    attention_bias    no
    mistral      attention_bias    attention_bias    no
    qwen2        always            no                no
    qwen3        attention_bias    attention_bias    yes

plus head_dim (may differ from hidden/heads), tie_word_embeddings, rms_norm_eps,
mlp_bias, and RoPE (theta and llama3 scaling; read from ``config.rope_parameters`` in
transformers >= 5, from ``rope_theta`` / ``rope_scaling`` before).

Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not
implemented: the model is exact for contexts up to the window, and warns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from kvarn.distributed import tp_is_initialized, tp_size as dist_tp_size
from kvarn.models.attention import Attention
from kvarn.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    apply_rotary,
    drop_cpu_packs,
)

__all__ = ["LlamaForCausalLM", "LlamaSpec", "rope_settings"]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def rope_settings(config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a transformers 4 or 5 config.

    transformers 5 keeps both in ``config.rope_parameters`` (``{"rope_type",
    "rope_theta", ...}``); transformers 4 has ``config.rope_theta`` and
    ``config.rope_scaling`` (None, or a dict with "rope_type" or the older "type").
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], dict(params)
    else:
        theta = getattr(config, "rope_theta", None) or 10000.0
        scaling = getattr(config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type or "default")
        if scaling["rope_type"] == "default":
            scaling = None
        elif scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return float(theta), scaling


@dataclass(frozen=True)
class LlamaSpec:
    """The shape and switches of a Llama-family model, normalized from its HF config."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "LlamaSpec":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama-family model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (only silu)")
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        theta, scaling = rope_settings(config)
        _warn_sliding_window(config)
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )


def _warn_sliding_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layer_types
    if config.model_type == "mistral":
        uses_window = window is not None
    elif config.model_type == "qwen2":
        uses_window = uses_window or bool(getattr(config, "use_sliding_window", False))
    if uses_window and window is not None and window < config.max_position_embeddings:
        logger.warning(
            "%s config sets sliding_window=%s; kvarn attends over the full context, which "
            "matches the model only for contexts of at most %s tokens",
            config.model_type, window, window,
        )


class LlamaAttention(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        d = spec.head_dim
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, d, spec.num_heads, spec.num_kv_heads, spec.qkv_bias, tp_rank, tp_size
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(spec.num_heads * d, spec.hidden_size, spec.o_bias, tp_rank, tp_size)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, d, d**-0.5)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, spec: LlamaSpec, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        i = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [i, i], spec.mlp_bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(i, spec.hidden_size, spec.mlp_bias, tp_rank, tp_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec, layer_idx, tp_rank, tp_size)
        self.mlp = LlamaMLP(spec, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: LlamaSpec, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp_rank, tp_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, i, tp_rank, tp_size) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM, this rank's shard of it (see the module docstring)."""

    # HF checkpoint module name -> (our fused module, shard id in it).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        spec = LlamaSpec.from_hf_config(hf_config)
        self.config = hf_config
        self.spec = spec
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = LlamaModel(spec, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp_rank, tp_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

        attn = self.model.layers[0].self_attn
        self.num_layers = spec.num_layers
        self.num_heads_local = attn.num_heads
        self.num_kv_heads_local = attn.num_kv_heads
        self.head_dim = spec.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] long -> final-norm hidden states [T, hidden]."""
        if self.tp_size > 1 and not (tp_is_initialized() and dist_tp_size() == self.tp_size):
            raise RuntimeError(
                f"this model is rank {self.tp_rank} of a TP={self.tp_size} shard, but the TP "
                f"group is not initialized with that size (call kvarn.distributed.init_tp)"
            )
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab], the full vocab on every rank."""
        return self.lm_head(hidden).float()

    # ----------------------------------------------------------------- weights

    @staticmethod
    def checkpoint_shapes(hf_config: Any) -> list[tuple[str, tuple[int, ...]]]:
        """Names and full (unsharded) shapes of the HF checkpoint tensors of this config."""
        return _checkpoint_shapes(LlamaSpec.from_hf_config(hf_config))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Load full HF-named tensors; each parameter's ``weight_loader`` takes this rank's slice.

        Skips rotary ``inv_freq`` buffers and, with tied embeddings, ``lm_head.weight``.
        With ``strict``, an unknown name or a parameter left (partly) unloaded raises
        ValueError. Returns the names of the parameters loaded.
        """
        drop_cpu_packs(self)          # packed CPU copies of the old weights would go stale
        params = dict(self.named_parameters())
        full_shapes = dict(_checkpoint_shapes(self.spec))
        loaded: dict[str, set] = {}
        for name, tensor in weights:
            hf_name = name
            if "rotary_emb." in name:
                continue
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue
            shard_id = None
            for hf_module, (our_module, sid) in self.packed_modules_mapping.items():
                if f".{hf_module}." in name:
                    name = name.replace(f".{hf_module}.", f".{our_module}.")
                    shard_id = sid
                    break
            param = params.get(name)
            if param is None:
                if strict:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(self).__name__}")
                continue
            expected = full_shapes.get(hf_name)
            if expected is not None and tuple(tensor.shape) != expected:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the config "
                    f"implies {expected}"
                )
            param.weight_loader(param, tensor, shard_id)
            loaded.setdefault(name, set()).add(shard_id)
        if strict:
            missing = [
                f"{n} (shards {sorted(set(p.shard_ids) - loaded.get(n, set()), key=str)})"
                if n in loaded else n
                for n, p in params.items()
                if not set(p.shard_ids) <= loaded.get(n, set())
            ]
            if missing:
                shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
                raise ValueError(f"checkpoint is missing weights for: {shown}")
        return set(loaded)


def _checkpoint_shapes(s: LlamaSpec) -> list[tuple[str, tuple[int, ...]]]:
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = [("model.embed_tokens.weight", (s.vocab_size, s.hidden_size))]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (s.hidden_size,)),
            (p + "self_attn.q_proj.weight", (q, s.hidden_size)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden_size)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden_size)),
        ]
        if s.qkv_bias:
            shapes += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
        if s.qk_norm:
            shapes += [(p + "self_attn.q_norm.weight", (s.head_dim,)),
                       (p + "self_attn.k_norm.weight", (s.head_dim,))]
        shapes.append((p + "self_attn.o_proj.weight", (s.hidden_size, q)))
        if s.o_bias:
            shapes.append((p + "self_attn.o_proj.bias", (s.hidden_size,)))
        shapes.append((p + "post_attention_layernorm.weight", (s.hidden_size,)))
        for name, shape in (("gate_proj", (s.intermediate_size, s.hidden_size)),
                            ("up_proj", (s.intermediate_size, s.hidden_size)),
                            ("down_proj", (s.hidden_size, s.intermediate_size))):
            shapes.append((p + f"mlp.{name}.weight", shape))
            if s.mlp_bias:
                shapes.append((p + f"mlp.{name}.bias", shape[:1]))
    shapes.append(("model.norm.weight", (s.hidden_size,)))
    if not s.tie_word_embeddings:
        shapes.append(("lm_head.weight", (s.vocab_size, s.hidden_size)))
    return shapes
