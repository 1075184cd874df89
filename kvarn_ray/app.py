"""The application builder: ``build_app(args) -> Application`` (also named ``build_pd_app``).

    OpenAIIngress ──handle──▶ DecodeServer ──handle──▶ PrefillServer
    (FastAPI, tokenizes)      (KVarN cache,             (fp16 cache,
                               orchestrates prefill)     exports payloads)

``args`` is the ``args:`` block of a Serve config (deployments/kvarn.yaml), checked by
``KvarnAppArgs`` (unknown keys are an error, so a typo fails the deploy instead of being
ignored). Deployment options (replicas, autoscaling, resources, placement groups) have
defaults here that fit a 2-core CPU machine; a Serve config's ``deployments:`` section
overrides them by deployment name (``OpenAIIngress``, ``DecodeServer``,
``PrefillServer``), as ``serve run`` / ``serve deploy`` apply it.

A TP>1 deployment gets a placement group per replica (STRICT_PACK: one node):
bundle 0 holds the replica (the engine driver: scheduler, sampling bookkeeping),
bundles 1..tp one rank worker each (``kvarn_ray.executor.RayExecutor``):

    placement_group_bundles = [{"CPU": driver}, {"CPU": w, "GPU": g} x tp]
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from kvarn.format import KV_CACHE_DTYPES, PRESETS
from kvarn_ray.decode_server import DecodeServer
from kvarn_ray.ingress import OpenAIIngress
from kvarn_ray.prefill_server import PrefillServer

__all__ = ["KvarnAppArgs", "build_app", "build_pd_app", "deployment_options"]


class KvarnAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "smollm2-135m"
    served_model_name: Optional[str | list[str]] = None
    tokenizer: Optional[str] = None
    kv_cache_dtype: str = "kvarn_k4v2_g128"
    transfer_dtype: Optional[str] = None
    prefill_tensor_parallel_size: int = Field(1, ge=1)
    decode_tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=2)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    kv_cache_memory_bytes: Optional[int] = Field(None, gt=0)
    prefill_kv_cache_memory_bytes: Optional[int] = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    device: Optional[str] = None
    dtype: Optional[str] = None
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    seed: int = 0
    max_waiting: int = Field(64, ge=0)
    admission_timeout_s: float = Field(60.0, gt=0)
    # per-rank worker resources when a TP>1 deployment's placement group is built here
    tp_worker_num_cpus: float = Field(0.2, ge=0)
    tp_worker_num_gpus: Optional[float] = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.kv_cache_dtype not in PRESETS:
            raise ValueError(f"kv_cache_dtype (the decode cache) must be a KVarN preset: "
                             f"{', '.join(PRESETS)}; got {self.kv_cache_dtype!r}")
        if self.transfer_dtype is None:
            self.transfer_dtype = self.kv_cache_dtype
        if self.transfer_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"transfer_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.transfer_dtype!r}")
        return self

    @property
    def served_model_names(self) -> list[str]:
        n = self.served_model_name or self.model
        return [n] if isinstance(n, str) else list(n)

    def engine_config(self, kv_cache_dtype: str, kv_cache_memory_bytes: int | None) -> dict:
        return {
            "model": self.model, "kv_cache_dtype": kv_cache_dtype,
            "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "gpu_memory_utilization": self.gpu_memory_utilization, "device": self.device,
            "dtype": self.dtype, "load_format": self.load_format, "seed": self.seed,
            "tokenizer": self.tokenizer,
        }


def _uses_gpu(a: KvarnAppArgs) -> bool:
    if a.device is not None:
        return str(a.device).startswith("cuda")
    return False


def deployment_options(a: KvarnAppArgs) -> dict[str, dict[str, Any]]:
    """Default Serve options per deployment (a Serve config's ``deployments:`` wins).

    Autoscaling is queue-based: a replica's ongoing requests (running, waiting for
    admission, and queued for it at the callers' handles) against
    ``target_ongoing_requests``, which is finite and below ``max_ongoing_requests``
    so that load actually moves it.
    """
    gpu = _uses_gpu(a)
    per_replica_gpus = 1 if gpu else 0

    def engine_opts(tp: int, num_cpus: float, target: float, max_ongoing: int,
                    max_queued: int) -> dict:
        opts: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": target,
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0, "look_back_period_s": 15.0,
            },
            "max_ongoing_requests": max_ongoing,
            "max_queued_requests": max_queued,
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 60.0,
            "graceful_shutdown_timeout_s": 20.0,
        }
        if tp == 1:
            opts["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": per_replica_gpus}
        else:
            worker_gpus = a.tp_worker_num_gpus if a.tp_worker_num_gpus is not None else (
                1 if gpu else 0)
            worker = {"CPU": a.tp_worker_num_cpus}
            if worker_gpus:
                worker["GPU"] = worker_gpus
            opts["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": 0}
            opts["placement_group_bundles"] = [{"CPU": num_cpus}] + [dict(worker)] * tp
            opts["placement_group_strategy"] = "STRICT_PACK"
        return opts

    return {
        "OpenAIIngress": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": 64},
            "max_ongoing_requests": 256,
            "max_queued_requests": 512,
            "backpressure_config": {"status_code": 503, "retry_after_s": 2},
            "ray_actor_options": {"num_cpus": 0.1},
        },
        "DecodeServer": engine_opts(a.decode_tensor_parallel_size, 0.4,
                                    target=max(1, a.max_num_seqs // 4),
                                    max_ongoing=a.max_num_seqs + a.max_waiting,
                                    max_queued=2 * (a.max_num_seqs + a.max_waiting)),
        "PrefillServer": engine_opts(a.prefill_tensor_parallel_size, 0.4, target=2,
                                     max_ongoing=32, max_queued=-1),
    }


def build_app(args: dict | None = None) -> Application:
    """Serve application for a kvarn P/D deployment (``serve run kvarn_ray.app:build_app``)."""
    a = KvarnAppArgs.model_validate(args or {})
    opts = deployment_options(a)
    prefill = PrefillServer.options(**opts["PrefillServer"]).bind(
        a.engine_config("auto", a.prefill_kv_cache_memory_bytes or a.kv_cache_memory_bytes),
        a.transfer_dtype, a.prefill_tensor_parallel_size)
    decode = DecodeServer.options(**opts["DecodeServer"]).bind(
        prefill, a.engine_config(a.kv_cache_dtype, a.kv_cache_memory_bytes), a.transfer_dtype,
        a.max_waiting, a.admission_timeout_s, a.decode_tensor_parallel_size)
    return OpenAIIngress.options(**opts["OpenAIIngress"]).bind(
        decode, a.model if a.tokenizer is None else a.tokenizer, a.served_model_names,
        a.max_model_len)


#: The name Ray Serve LLM users look for (``ray.serve.llm.build_pd_openai_app``).
build_pd_app = build_app
