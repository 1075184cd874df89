"""Building blocks of a Llama-family decoder, sharded Megatron-style over the TP group.

Every tensor is token-major and flattened over the batch: ``[T, ...]``.

Sharding (rank r of t; ``W`` is the full Hugging Face weight, ``[out, in]``):

    ColumnParallelLinear   W rows    [r*out/t, (r+1)*out/t)   x full        -> y sharded
    RowParallelLinear      W columns [r*in/t,  (r+1)*in/t)    x sharded     -> partial y, all-reduce
    VocabParallelEmbedding rows      [r*V', (r+1)*V'), V' = ceil(V/t), the last shard zero-padded
    ParallelLMHead         same rows as the embedding; local logits all-gathered, padding cut

A fused layer stacks several HF weights along its output rows; each rank's stack
holds its own slice of every part:

    QKVParallelLinear (rank r)         MergedColumnParallelLinear (rank r)
    +----------------------+ 0         +-------------------+ 0
    | q heads [r*hq, +hq)  |           | gate rows, slice r|
    +----------------------+ hq*D      +-------------------+ I/t
    | k heads [kv0, +hkv)  |           | up rows, slice r  |
    +----------------------+ (hq+hkv)*D+-------------------+ 2*I/t
    | v heads [kv0, +hkv)  |
    +----------------------+ (hq+2*hkv)*D

With H_kv >= t, hkv = H_kv/t and kv0 = r*hkv. With H_kv < t (t a multiple of H_kv),
each KV head is replicated on t/H_kv consecutive ranks: hkv = 1, kv0 = r // (t/H_kv),
so the query heads of rank r, [r*hq, (r+1)*hq), all attend to a KV head they own.

Each parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``: it takes
the FULL checkpoint tensor and copies this rank's slice into ``param`` (casting to the
parameter's dtype and device). ``param.shard_ids`` lists the shard ids a fused
parameter needs (``(None,)`` for a plain one), so a loader can check completeness.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvarn.distributed import tp_all_gather, tp_all_reduce

__all__ = [
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLMHead",
    "SiluAndMul",
    "set_compile",
]


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what} ({n}) is not divisible by the TP size ({d})")
    return n // d


def _attach(param: nn.Parameter, loader, shard_ids: Sequence = (None,)) -> nn.Parameter:
    param.weight_loader = loader
    param.shard_ids = tuple(shard_ids)
    return param


# --------------------------------------------------------------------------- fusion

# The elementwise pieces below (RMSNorm, RoPE, SiLU-and-mul) are written op by op so
# that they round exactly like Hugging Face's eager code. Eagerly, each op is a pass
# over memory: on an H100, Llama-3-8B fp16, a 4096-token prefill takes 136 ms eager and
# 114 ms with these pieces fused by torch.compile, whose results differ from eager
# (and from HF) in the last bits. So compilation is off unless KVARN_COMPILE=1 or
# set_compile(True), and applies to CUDA tensors only (it also captures in CUDA graphs).
_compile_enabled = os.environ.get("KVARN_COMPILE", "0") == "1"
_compiled: dict = {}


def set_compile(enabled: bool) -> None:
    """Fuse the elementwise pieces with torch.compile on CUDA (first call per shape compiles)."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def _run(fn, *args):
    if _compile_enabled and args[0].is_cuda:
        compiled = _compiled.get(fn)
        if compiled is None:
            compiled = _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(*args)
    return fn(*args)


# --------------------------------------------------------------------------- norms


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    return _rms_norm(x, weight, eps), x


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with two CPU fp32 fast paths (same math, another summation order):

    - ``packed`` (oneDNN's blocked copy of ``weight``, from ``prepack_cpu_linears``): any
      number of rows through ``mkldnn._linear_pointwise``. On the 2-core CI machine the 425
      MB of SmolLM2 layer weights, cold, take 25.6 ms instead of 35.7 at one row and 27.7
      instead of 46.6 at 8 rows; the LM head 5.2 / 4.9 ms instead of 9.8 / 18.6
      (``benchmarks/cpu_linear.py``, ``results/cpu_linear.json``).
    - few rows without a packed copy (the fallback): ``W @ x.T``, the weight as the
      untransposed operand. Measured there it helps the LM head at 8 rows (13.3 vs 18.6 ms)
      and not the layer weights (equal at one row, slower at 8).
    """
    if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and weight.dtype == torch.float32:
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        if x.shape[0] <= _SMALL_M_ROWS:
            y = torch.mm(weight, x.t()).t().contiguous()
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


_SMALL_M_ROWS = 8


def prepack_cpu_linears(model: nn.Module) -> int:
    """Give every fp32 CPU linear (and LM head) a oneDNN-packed copy of its weight, used by
    ``linear``; returns how many were packed. Call it after the weights are final: a copy
    packed before a weight changes goes stale (``load_model`` calls it last; ``drop_cpu_packs``
    undoes it). Costs one more copy of those weights in host memory.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, (_ParallelLinear, ParallelLMHead)) and w is not None
                and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2):
            m._cpu_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            n += 1
    return n


def drop_cpu_packs(model: nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "_cpu_packed", None) is not None:
            m._cpu_packed = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, with an optional fused residual add.

    ``norm(x)`` -> y;  ``norm(x, residual)`` -> (y, x + residual), the sum being the
    next residual. The add happens in the model dtype and the weight multiplies the
    normalized value after the cast back, exactly as Hugging Face's LlamaRMSNorm does
    (so fp16 runs round the same way).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _attach(nn.Parameter(torch.ones(hidden_size)), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return _run(_rms_norm, x, self.weight, self.eps)
        return _run(_add_rms_norm, x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# --------------------------------------------------------------------------- rotary


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, short ones
    kept, a smooth ramp between (Meta's reference implementation, as in HF)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the full head_dim.

    ``rotary(positions [T], dtype) -> (cos, sin)``, each ``[T, head_dim]``, computed in
    fp32 from the positions and cast to ``dtype``; the model computes them once per
    forward and every layer applies them with ``apply_rotary``.

    ``rope_scaling``: None (or rope_type "default") or a Llama-3.1 ``{"rope_type":
    "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` dict.
    """

    SUPPORTED_ROPE_TYPES = ("default", "llama3")

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        rope_type = "default"
        if rope_scaling:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in self.SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope type {rope_type!r} is not supported (supported: "
                f"{', '.join(self.SUPPORTED_ROPE_TYPES)})"
            )
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.rope_type = rope_type
        # Explicit fp32 whatever the default dtype at construction: fp16 frequencies
        # would be visibly wrong at long positions.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.rope_theta}, type={self.rope_type}"


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D] -> x rotated (neox layout: pairs (i, i + D/2))."""
    return _run(_rotary, x, cos, sin)


# --------------------------------------------------------------------------- linear


class _ParallelLinear(nn.Module):
    _cpu_packed = None   # oneDNN-packed weight on CPU fp32 (prepack_cpu_linears)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        shard_ids: Sequence = (None,),
    ) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features  # local sizes
        self.weight = _attach(
            nn.Parameter(torch.empty(out_features, in_features)), self.weight_loader, shard_ids
        )
        if bias:
            self.bias = _attach(nn.Parameter(torch.empty(out_features)), self.weight_loader, shard_ids)
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """y[:, local out] = x @ W[local rows].T + b[local rows]; the output stays sharded."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1, **kw
    ):
        local_output_size = _divide(output_size, tp_size, "output size")
        super().__init__(input_size, local_output_size, bias, tp_rank, tp_size, **kw)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self._cpu_packed)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel weights of equal input stacked along the output rows
    (gate_up: ``output_sizes = [I, I]``, shard ids 0 and 1)."""

    def __init__(
        self, input_size: int, output_sizes: Sequence[int], bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ):
        for size in output_sizes:
            _divide(size, tp_size, "output size")
        self.output_sizes = list(output_sizes)
        shard_ids = range(len(output_sizes))
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size, shard_ids=shard_ids)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id!r}")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections stacked; heads split over ranks (see the module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"with fewer KV heads ({total_num_kv_heads}) than TP ranks ({tp_size}), the "
                    f"TP size must be a multiple of the number of KV heads"
                )
            replicas = tp_size // total_num_kv_heads
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank // replicas
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # Sizes above are already this rank's: skip ColumnParallelLinear's division.
        _ParallelLinear.__init__(
            self, hidden_size, self.q_size + 2 * self.kv_size, bias, tp_rank, tp_size, shard_ids=("q", "k", "v")
        )

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        d = self.head_dim
        if shard_id == "q":
            dst_offset, size, src_offset = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id == "k":
            dst_offset, size, src_offset = self.q_size, self.kv_size, self.kv_head_start * d
        elif shard_id == "v":
            dst_offset, size, src_offset = self.q_size + self.kv_size, self.kv_size, self.kv_head_start * d
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        param.data.narrow(0, dst_offset, size).copy_(loaded_weight.narrow(0, src_offset, size))


class RowParallelLinear(_ParallelLinear):
    """y = sum over ranks of x[:, local in] @ W[:, local in].T, then + b (added once)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(_divide(input_size, tp_size, "input size"), output_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated
            param.data.copy_(loaded_weight)
            return
        n = param.shape[1]
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias, self._cpu_packed)
        y = tp_all_reduce(linear(x, self.weight, packed=self._cpu_packed))
        return y if self.bias is None else y + self.bias


# --------------------------------------------------------------------------- vocab


class VocabParallelEmbedding(nn.Module):
    """Embedding table sharded by vocab rows; out-of-shard ids give zeros, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.shard_rows = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.shard_rows
        # Rows of this shard that are real tokens (the last shard may be padding only in part).
        self.num_valid_rows = max(0, min(self.shard_rows, num_embeddings - self.vocab_start))
        self.weight = _attach(nn.Parameter(torch.empty(self.shard_rows, embedding_dim)), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"vocab weight has {loaded_weight.shape[0]} rows, the model expects {self.num_embeddings}"
            )
        n = self.num_valid_rows
        param.data[:n].copy_(loaded_weight.narrow(0, self.vocab_start, n))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.num_valid_rows)
        y = F.embedding(local.masked_fill(~in_shard, 0), self.weight)
        y = y.masked_fill(~in_shard.unsqueeze(-1), 0)
        return tp_all_reduce(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
            f"{self.vocab_start + self.num_valid_rows}), tp={self.tp_rank}/{self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded by vocab rows: ``lm_head(h [N, hidden]) -> logits [N, V]``,
    the full vocab on every rank."""

    _cpu_packed = None   # see prepack_cpu_linears

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, packed=self._cpu_packed)
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]


# --------------------------------------------------------------------------- activations


class SiluAndMul(nn.Module):
    """x [..., 2n] = (gate | up) -> silu(gate) * up  [..., n]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(_silu_and_mul, x)


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
