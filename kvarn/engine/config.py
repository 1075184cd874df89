"""EngineConfig: everything an LLMEngine is built from, checked up front."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvarn.format import KV_CACHE_DTYPES

_DTYPES = ("auto", "float16", "fp16", "half", "bfloat16", "bf16", "float32", "fp32", "float")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30


@dataclass
class EngineConfig:
    model: Any = "smollm2-135m"             # name/path for kvarn.models.resolve, or "dummy:<config>"
    kv_cache_dtype: str = "kvarn_k4v2_g128"  # "auto" (model dtype) or a KVarN preset
    tensor_parallel_size: int = 1
    max_model_len: int | None = 2048         # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory_bytes: int | None = None  # per rank; None: gpu_memory_utilization (CUDA)
    gpu_memory_utilization: float = 0.9       # or DEFAULT_CPU_KV_CACHE_BYTES on CPU
    device: str | None = None                 # None: cuda if available else cpu
    dtype: str | None = None                  # None: float16 on CUDA, float32 on CPU
    load_format: str = "auto"
    seed: int = 0
    executor: Any = None                      # None: built-in; an Executor subclass or instance
    tokenizer: str | None = None              # None: the model folder's tokenizer
    block_size: int = 128                     # 'auto' cache only; KVarN uses the preset's G
    enforce_eager: bool = False               # CUDA: no CUDA graphs for decode
    max_cudagraph_batch_size: int = 256
    cudagraph_capture_sizes: tuple | None = None   # None: 1, 2, 4, 8, 16, ... max_cudagraph_batch_size
    attention_backend: str | None = None      # None: 'triton' on CUDA, 'torch' on CPU

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_cudagraph_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool)
                                               or not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}")
        if self.kv_cache_memory_bytes is not None and (
                not isinstance(self.kv_cache_memory_bytes, int) or self.kv_cache_memory_bytes <= 0):
            raise ValueError("kv_cache_memory_bytes must be a positive integer or None, "
                             f"got {self.kv_cache_memory_bytes!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.device is not None and not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ValueError(f"device must be None, 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype is not None and str(self.dtype).lower() not in _DTYPES:
            raise ValueError(f"dtype must be None or one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(_LOAD_FORMATS)}, got {self.load_format!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"attention_backend must be None, 'torch' or 'triton', got {self.attention_backend!r}")
        if self.cudagraph_capture_sizes is not None:
            sizes = tuple(self.cudagraph_capture_sizes)
            if not sizes or not all(isinstance(b, int) and b >= 1 for b in sizes):
                raise ValueError(f"cudagraph_capture_sizes must be positive integers, got {sizes!r}")
            self.cudagraph_capture_sizes = tuple(sorted(set(sizes)))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")

    def resolved_device(self) -> str:
        import torch

        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        return str(self.device)

    def resolved_dtype(self):
        from kvarn.models.loader import resolve_dtype

        return resolve_dtype(self.dtype, self.resolved_device())


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if config.max_model_len is None:
        if limit is None:
            raise ValueError("max_model_len=None needs the model config's max_position_embeddings")
        return int(limit)
    if limit is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings={limit}")
    return config.max_model_len
