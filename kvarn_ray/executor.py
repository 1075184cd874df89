"""RayExecutor: an engine's tensor-parallel ranks as Ray actors in one placement group.

    replica (engine driver: scheduler, block manager)      placement group, STRICT_PACK
      │ execute_model(step): ray.put(step) once ──────────▶ bundle 1: RankWorker(rank 0) ─┐
      │                      every rank gets the ref ─────▶ bundle 2: RankWorker(rank 1)  ├ torch.distributed
      │                      rank 0 returns the tokens     ...                            │ (gloo / NCCL)
      │ import_kv(payload): one ObjectRef to all ranks ──▶ bundle t: RankWorker(rank t-1)─┘
      │                     rank r reads it zero-copy and takes heads [r*h, (r+1)*h)

Inside a Serve replica whose deployment has ``placement_group_bundles``, the ranks take
the last ``tp`` bundles of the replica's own placement group (bundle 0 holds the
replica); elsewhere (an engine built in a plain Ray driver) RayExecutor creates, and
later removes, a STRICT_PACK group of ``tp`` bundles itself.

The payload reaches the ranks without copies: the decode replica attaches the
ObjectRef its prefill call returned (``payload._kvarn_ray_ref``), every rank resolves
that ref (a read-only view of the local object store) and slices its heads. A payload
without one is ``ray.put`` once.

GPU ranks: Ray gives each actor one GPU and hides the others, while ``kvarn``'s Worker
uses device ``cuda:<rank>``. Each rank therefore gets CUDA_VISIBLE_DEVICES listing
every rank's GPU in rank order (all on one node), set before CUDA initializes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvarn.engine.config import EngineConfig
from kvarn.engine.executor import Executor

__all__ = ["RayExecutor", "RankWorker"]


@ray.remote
class RankWorker:
    """One TP rank: a ``kvarn.engine.worker.Worker`` in its own process."""

    def __init__(self):
        self.worker = None
        self.rank = None
        self.heads = 0

    def node_info(self) -> dict:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"ip": ray.util.get_node_ip_address(), "port": port,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def init_worker(self, config: EngineConfig, rank: int, world_size: int, init_method: str,
                    cuda_visible_devices: str | None) -> dict:
        if cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        from kvarn.engine.worker import Worker

        self.rank = rank
        self.worker = Worker(config, rank, world_size, init_method)
        self.heads = self.worker.model.num_kv_heads_local
        return self.worker.info()

    def execute_model(self, step):
        return self.worker.execute_model(step)

    def export_kv(self, block_table: list[int], num_tokens: int, quantize_to: str | None = None) -> dict:
        return self.worker.export_kv(block_table, num_tokens, quantize_to)

    def import_kv(self, block_table: list[int], num_tokens: int, payload: Any) -> None:
        if isinstance(payload, dict):  # a PrefillServer return value: {"payload", "info"}
            payload = payload["payload"]
        part = payload.slice_heads(self.rank * self.heads, (self.rank + 1) * self.heads)
        self.worker.import_kv(block_table, num_tokens, part.buffers(), part.header)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class RayExecutor(Executor):
    """``EngineConfig(executor=RayExecutor, tensor_parallel_size=t)``: t RankWorker actors."""

    #: Resources of one rank when RayExecutor creates the placement group itself.
    default_rank_cpus: float = 0.2
    start_timeout_s: float = 600.0

    def __init__(self, config: EngineConfig):
        t = config.tensor_parallel_size
        self._own_pg: PlacementGroup | None = None
        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < t:
            pg = self._own_pg = self._create_pg(config, t)
        bundles = pg.bundle_specs
        first = len(bundles) - t
        self.workers = []
        for rank in range(t):
            b = bundles[first + rank]
            opts: dict[str, Any] = {
                "num_cpus": b.get("CPU", 0),
                "num_gpus": b.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=first + rank,
                    placement_group_capture_child_tasks=False),
            }
            self.workers.append(RankWorker.options(**opts).remote())
        try:
            infos = ray.get([w.node_info.remote() for w in self.workers],
                            timeout=self.start_timeout_s)
            if len({i["ip"] for i in infos}) != 1:
                raise RuntimeError(f"TP ranks landed on several nodes: {infos}")
            init_method = f"tcp://{infos[0]['ip']}:{infos[0]['port']}"
            visible = None
            if all(i["gpu_ids"] for i in infos):
                visible = ",".join(i["gpu_ids"][0] for i in infos)
            t0 = time.perf_counter()
            self.rank_infos = ray.get(
                [w.init_worker.remote(config, r, t, init_method, visible)
                 for r, w in enumerate(self.workers)], timeout=self.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.info = self.rank_infos[0]
        self.heads = self.info["num_kv_heads_local"]
        self.start_s = time.perf_counter() - t0
        self.step_overhead_s = 0.0
        self.num_steps = 0

    def _create_pg(self, config: EngineConfig, t: int) -> PlacementGroup:
        gpu = str(config.device or "").startswith("cuda") or (
            config.device is None and ray.cluster_resources().get("GPU", 0) >= t)
        bundle = {"CPU": self.default_rank_cpus}
        if gpu:
            bundle["GPU"] = 1
        pg = placement_group([dict(bundle) for _ in range(t)], strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=self.start_timeout_s)
        return pg

    def execute_model(self, scheduler_output):
        t0 = time.perf_counter()
        ref = ray.put(scheduler_output)
        futures = [w.execute_model.remote(ref) for w in self.workers]
        results = ray.get(futures)
        self.num_steps += 1
        self.step_overhead_s += time.perf_counter() - t0  # includes the ranks' compute
        return results[0]

    def export_kv(self, block_table, num_tokens, quantize_to=None):
        import numpy as np

        parts = ray.get([w.export_kv.remote(block_table, num_tokens, quantize_to) for w in self.workers])
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def import_kv(self, block_table, num_tokens, payload):
        ref = getattr(payload, "_kvarn_ray_ref", None)
        if ref is None or payload.header.get("head_range") != [0, payload.header["num_kv_heads"]]:
            ref = ray.put(payload)
        ray.get([w.import_kv.remote(block_table, num_tokens, ref) for w in self.workers])
        del ref

    def shutdown(self):
        workers, self.workers = getattr(self, "workers", []), []
        if workers:
            try:
                ray.get([w.shutdown.remote() for w in workers], timeout=30)
            except Exception:  # noqa: BLE001 - tearing down anyway
                pass
            for w in workers:
                ray.kill(w)
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
