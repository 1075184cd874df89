"""The KV pool interface: one rank's paged cache tensors, sized from a memory budget.

A pool owns, for every layer at once (Hkv = this rank's KV heads, G = block size):

    kv       [L, 2, num_fp16_blocks, Hkv, G, D]    K at [:, 0], V at [:, 1]
    records  [L, num_record_blocks, Hkv, RB] uint8  KVarN records (None for 'auto')

``layer(i)`` gives the per-layer views the kernels take (kvarn/kernels/reference.py
draws which logical block lives in which pool). The pool never decides *which* ids
a sequence uses: the driver's BlockManager does, and sends ids with every step.

Sizing (``plan``): the budget B bytes is split so that sequences of the assumed
context length C (the engine's max_model_len) fill every pool at once:

    F = bytes of one fp16 block (all layers, K and V)   R = bytes of one record block
    'auto':  a C-token sequence takes ceil(C/G) fp16 blocks
             num_fp16_blocks = B // F
    KVarN:   a C-token sequence takes 1 fp16 sink + (ceil(C/G) - 2) records + 1 fp16 tail
             (the tail is counted as a whole fp16 block: the honest worst case),
             and a prefill chunk of T tokens briefly holds ceil(T/G)+1 fp16 blocks
             before they are quantized: reserve = ceil(max_num_batched_tokens/G) + 1
             n_C = (B - reserve*F) // (2F + (ceil(C/G) - 2) R)
             num_fp16_blocks = reserve + 2 n_C,  num_record_blocks = (B - num_fp16_blocks F) // R

    capacity_tokens = n_C * C      (n_C = whole C-token sequences the pools hold)

Shorter sequences still need their 2 fp16 blocks each, so with this split the number of
concurrent KVarN sequences is bounded by about n_C + reserve/2 whatever their length.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from kvarn.format import KVarNConfig, is_kvarn


class CacheBudgetError(ValueError):
    """The memory budget cannot hold one sequence of max_model_len tokens."""


@dataclass(frozen=True)
class PoolSizing:
    kv_cache_dtype: str
    block_size: int
    num_fp16_blocks: int
    num_record_blocks: int
    fp16_block_bytes: int          # one block, every layer, K and V, this rank
    record_block_bytes: int        # one record block, every layer, this rank (0 for 'auto')
    budget_bytes: int
    assumed_context_len: int
    capacity_seqs: int             # whole assumed_context_len-token sequences the pools hold
    capacity_tokens: int
    reserve_fp16_blocks: int = 0

    @property
    def used_bytes(self) -> int:
        return self.num_fp16_blocks * self.fp16_block_bytes + self.num_record_blocks * self.record_block_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def fp16_block_bytes(num_layers, num_kv_heads, block_size, head_dim, elem_bytes=2) -> int:
    return num_layers * 2 * num_kv_heads * block_size * head_dim * elem_bytes


def plan_pools(*, kv_cache_dtype: str, budget_bytes: int, num_layers: int, num_kv_heads: int,
               head_dim: int, assumed_context_len: int, max_num_batched_tokens: int,
               auto_block_size: int = 128, auto_elem_bytes: int = 2) -> PoolSizing:
    """Block counts for a budget (module docstring has the formula)."""
    c = assumed_context_len
    if is_kvarn(kv_cache_dtype):
        cfg = KVarNConfig.from_name(kv_cache_dtype, head_dim)
        g = cfg.group_size
        f = fp16_block_bytes(num_layers, num_kv_heads, g, head_dim, 2)
        r = num_layers * num_kv_heads * cfg.record_bytes
        nb = math.ceil(c / g)
        reserve = math.ceil(max_num_batched_tokens / g) + 1
        per_seq = 2 * f + max(nb - 2, 0) * r
        n_c = (budget_bytes - reserve * f) // per_seq
        if n_c < 1:
            raise CacheBudgetError(
                f"KV cache budget {budget_bytes / 2**20:.1f} MiB cannot hold one {c}-token sequence "
                f"with {kv_cache_dtype}: needs {(reserve * f + per_seq) / 2**20:.1f} MiB "
                f"({reserve} transient fp16 blocks for a {max_num_batched_tokens}-token prefill "
                f"chunk + 2 fp16 blocks + {max(nb - 2, 0)} records). Raise kv_cache_memory_bytes / "
                f"gpu_memory_utilization or lower max_model_len / max_num_batched_tokens."
            )
        nfp = reserve + 2 * n_c
        nrec = (budget_bytes - nfp * f) // r
        return PoolSizing(kv_cache_dtype, g, nfp, nrec, f, r, budget_bytes, c, n_c, n_c * c, reserve)
    g = auto_block_size
    f = fp16_block_bytes(num_layers, num_kv_heads, g, head_dim, auto_elem_bytes)
    nfp = budget_bytes // f
    n_c = nfp // math.ceil(c / g)
    if n_c < 1:
        raise CacheBudgetError(
            f"KV cache budget {budget_bytes / 2**20:.1f} MiB cannot hold one {c}-token sequence "
            f"with an 'auto' cache: needs {math.ceil(c / g) * f / 2**20:.1f} MiB. Raise "
            f"kv_cache_memory_bytes / gpu_memory_utilization or lower max_model_len."
        )
    return PoolSizing(kv_cache_dtype, g, nfp, 0, f, 0, budget_bytes, c, n_c, n_c * c, 0)


class KVPool(ABC):
    """One rank's cache tensors. Subclasses: FP16Pool ('auto'), KVarNPool (a preset)."""

    kv_cache_dtype: str
    rotated: bool                 # True when the cache frame is Hadamard-rotated
    cfg: KVarNConfig | None

    def __init__(self, *, sizing: PoolSizing, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.sizing = sizing
        self.block_size = sizing.block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        # One scratch block past the allocator's range (id num_fp16_blocks): padding rows of
        # a CUDA-graph decode batch write to and read from it. torch.empty: nothing reads a
        # slot before it is written (attention masks by context length), and on CPU the
        # pages are committed only as they fill.
        self.kv = torch.empty(num_layers, 2, sizing.num_fp16_blocks + 1, num_kv_heads, self.block_size,
                              head_dim, dtype=dtype, device=self.device)
        self.records: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def layer(self, i: int):
        """(kv_fp16 [2, nfp, Hkv, G, D], records [nrec, Hkv, RB] | None) of layer i."""
        return self.kv[i], (self.records[i] if self.records is not None else None)

    @abstractmethod
    def flush(self, src_fp16_blocks: list[int], dst_record_blocks: list[int]) -> None:
        """Quantize full blocks into records, every layer at once (no-op for 'auto')."""

    @abstractmethod
    def export_blocks(self, block_table: list[int], num_tokens: int) -> dict:
        """A committed sequence's cache -> head-major numpy buffers (see kvarn.transfer)."""

    @abstractmethod
    def import_blocks(self, block_table: list[int], num_tokens: int, buffers: dict, header: dict) -> None:
        """Write a payload's (this rank's heads') buffers into the given blocks."""


def torch_to_numpy(t: torch.Tensor):
    """CPU copy as numpy; bfloat16 travels as its raw uint16 bits."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("uint16")
    return t.numpy()


def numpy_to_torch(a, dtype: torch.dtype, device) -> torch.Tensor:
    """numpy (possibly read-only: a zero-copy Ray object) -> a tensor of dtype on device."""
    import numpy as np

    if not a.flags.writeable:
        a = np.array(a)           # torch.from_numpy refuses to alias read-only memory safely
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(device=device, dtype=dtype)


def payload_torch_dtype(header: dict) -> torch.dtype:
    """The torch dtype of a payload's fp buffers, from its header's ``dtype``."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[header["dtype"]]
