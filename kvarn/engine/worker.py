"""One tensor-parallel rank: its model shard, its KV pool (its KV heads only), its runner.

    Worker(config, rank, world_size, init_method)
      .info()                      -> dict: pool sizing, model shape, fingerprint
      .execute_model(step)         -> (tokens, logprobs) on rank 0, None elsewhere
      .export_kv(table, n[, preset]) -> {records, sink, tail} numpy, this rank's heads
      .import_kv(table, n, bufs, header)
      .shutdown()

The executors drive workers: in-process (UniProcExecutor), spawned processes
(MultiprocExecutor), or Ray actors (kvarn_ray). Every rank must receive the same
calls in the same order (the model's collectives pair up across ranks).
"""
from __future__ import annotations

import os

import torch

from kvarn.attention import backend_name, make_backend
from kvarn.attention.base import AttentionMetadata
from kvarn.attention.torch_backend import TorchBackend
from kvarn.cache import make_pool
from kvarn.cache.base import plan_pools
from kvarn.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, resolve_max_model_len
from kvarn.engine.model_runner import ModelRunner
from kvarn.engine.sampler import Sampler
from kvarn.engine.scheduler import SchedulerOutput
from kvarn.models.context import ForwardContext, set_forward_context
from kvarn.models.loader import load_model, model_fingerprint

CUDA_GRAPH_RESERVE_BYTES = 256 * 2**20


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1, init_method: str | None = None):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        device = config.resolved_device()
        if device.startswith("cuda"):
            index = rank if device == "cuda" else torch.device(device).index + rank
            device = f"cuda:{index}"
            torch.cuda.set_device(device)
        self._threads_before = torch.get_num_threads()
        if not device.startswith("cuda") and world_size > 1:
            # t ranks share the cores: oversubscribed OpenMP barriers cost milliseconds
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.device = torch.device(device)
        if world_size > 1:
            from kvarn.distributed import init_tp
            init_tp(rank, world_size, "nccl" if self.device.type == "cuda" else "gloo", init_method)
        self.dtype = config.resolved_dtype()
        self.model, self.hf_config = load_model(config.model, dtype=self.dtype, device=self.device, tp_rank=rank,
                                                tp_size=world_size, load_format=config.load_format, seed=config.seed)
        self.max_model_len = resolve_max_model_len(config, self.hf_config)
        budget = self._kv_budget_bytes()
        m = self.model
        self.sizing = plan_pools(
            kv_cache_dtype=config.kv_cache_dtype, budget_bytes=budget, num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads_local, head_dim=m.head_dim, assumed_context_len=self.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens, auto_block_size=config.block_size,
            auto_elem_bytes=torch.tensor([], dtype=self.dtype).element_size())
        self.backend_name = backend_name(self.device, config.attention_backend)
        self.pool = make_pool(config.kv_cache_dtype, use_triton=self.backend_name == "triton",
                              sizing=self.sizing, num_layers=m.num_layers,
                              num_kv_heads=m.num_kv_heads_local, head_dim=m.head_dim, dtype=self.dtype,
                              device=self.device)
        self.backend = make_backend(self.pool, self.device, self.backend_name)
        graphs = self.device.type == "cuda" and world_size == 1 and not config.enforce_eager
        self.runner = ModelRunner(self.model, self.pool, self.backend, max_model_len=self.max_model_len,
                                  sampler=Sampler(config.seed) if rank == 0 else None, use_cuda_graphs=graphs,
                                  max_cudagraph_batch_size=min(config.max_cudagraph_batch_size, config.max_num_seqs),
                                  cudagraph_capture_sizes=config.cudagraph_capture_sizes)

    # --- sizing --------------------------------------------------------------------
    def _kv_budget_bytes(self) -> int:
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_BYTES
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward()
        activations = torch.cuda.max_memory_allocated() - before
        torch.cuda.empty_cache()              # the profile's blocks are counted once, as activations
        free, total = torch.cuda.mem_get_info()
        budget = int(self.config.gpu_memory_utilization * total) - (total - free) - activations
        budget -= CUDA_GRAPH_RESERVE_BYTES
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB total, "
                f"{(total - free) / 2**30:.1f} GiB in use, {activations / 2**30:.2f} GiB of activations for "
                f"{self.config.max_num_batched_tokens} tokens; raise gpu_memory_utilization")
        return budget

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        n = self.config.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device) % self.max_model_len
        empty = torch.zeros(0, dtype=torch.int32, device=self.device)
        md = AttentionMetadata(empty.long(), empty[None], empty, empty, [n], [n], False, True, skip_cache=True)
        with set_forward_context(ForwardContext(TorchBackend(None), md)):   # dense only: no kernels
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        torch.cuda.synchronize()

    # --- calls ---------------------------------------------------------------------
    def info(self) -> dict:
        c = self.hf_config
        return {
            "sizing": self.sizing.to_dict(),
            "num_layers": self.model.num_layers,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "num_kv_heads_local": self.model.num_kv_heads_local,
            "head_dim": self.model.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_model_len": self.max_model_len,
            "model_fingerprint": model_fingerprint(c, self.dtype),
            "device": str(self.device),
            "cuda_graph_batch_sizes": sorted(self.runner.graphs),
            "attention_backend": self.backend_name,
        }

    def execute_model(self, out: SchedulerOutput):
        return self.runner.execute(out)

    @torch.inference_mode()
    def export_kv(self, block_table: list[int], num_tokens: int, quantize_to: str | None = None) -> dict:
        """This rank's heads; ``quantize_to`` (a KVarN preset, 'auto' caches only) packs
        them here, on this rank's device, before they leave it."""
        if quantize_to is not None:
            return self.pool.export_quantized(block_table, num_tokens, quantize_to)
        return self.pool.export_blocks(block_table, num_tokens)

    @torch.inference_mode()
    def import_kv(self, block_table: list[int], num_tokens: int, buffers: dict, header: dict) -> None:
        self.pool.import_blocks(block_table, num_tokens, buffers, header)

    def shutdown(self) -> None:
        if self.world_size > 1:
            from kvarn.distributed import destroy_tp
            destroy_tp()
            torch.set_num_threads(self._threads_before)
