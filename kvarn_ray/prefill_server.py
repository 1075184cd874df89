"""PrefillServer: runs prompts at full precision and returns their KV as a payload.

    prefill({"request_id", "prompt_token_ids", "sampling", "transfer_dtype"})
      -> {"payload": KVPayload, "info": {...timings, replica id...}}

The engine keeps an unquantized cache (``kv_cache_dtype="auto"``); each prompt is
added with ``export_kv=transfer_dtype`` (a KVarN preset: full tiles packed to
records, sink and tail fp16; ``"auto"``: everything fp16, the baseline). The engine
finishes such a request after its first sampled token with ``finish_reason="prefill"``
and the payload on the output, and frees its blocks.

Concurrent calls share one engine loop (``EngineLoop``), so prompts that arrive
together are prefilled in the same steps (continuous batching, chunked for long
prompts). The payload is this method's *return value*: the calling decode replica
owns the object, so it does not die with this replica, and it is freed as soon as
the caller drops it.
"""

from __future__ import annotations

import logging
import os
import time

from ray import serve

from kvarn_ray.decode_server import EngineLoop
from kvarn_ray.metrics import prefill_metrics
from kvarn_ray.protocol import APIError

logger = logging.getLogger("ray.serve")

__all__ = ["PrefillServer"]


@serve.deployment
class PrefillServer:
    """A prefill replica.

    Args:
        engine_config: ``kvarn.engine.EngineConfig`` keyword arguments; ``kv_cache_dtype``
            is forced to ``"auto"`` (prefill computes at full precision).
        transfer_dtype: the default export format when a call does not name one.
        tensor_parallel_size: > 1 runs the engine's TP ranks as Ray actors (RayExecutor).
    """

    def __init__(self, engine_config: dict, transfer_dtype: str, tensor_parallel_size: int = 1):
        from kvarn.engine import EngineConfig, LLMEngine

        cfg = dict(engine_config)
        cfg["kv_cache_dtype"] = "auto"
        cfg["tensor_parallel_size"] = tensor_parallel_size
        if tensor_parallel_size > 1:
            from kvarn_ray.executor import RayExecutor

            cfg["executor"] = RayExecutor
        t0 = time.perf_counter()
        self.engine = LLMEngine(EngineConfig(**cfg))
        self._transfer_dtype = transfer_dtype
        self._metrics = prefill_metrics()
        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id if ctx else f"local-{os.getpid()}"
        self.loop = EngineLoop(self.engine, name="kvarn-prefill")
        logger.info("PrefillServer %s ready in %.1f s", self._replica_id, time.perf_counter() - t0)

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"engine loop is dead: {self.loop.error!r}")

    async def stats(self) -> dict:
        def _stats():
            return {"replica_id": self._replica_id,
                    "num_free_blocks": self.engine.num_free_blocks,
                    "num_total_blocks": self.engine.num_total_blocks,
                    "has_unfinished_requests": bool(self.engine.has_unfinished_requests()),
                    "num_steps": self.loop.num_steps}
        return await self.loop.submit(_stats)

    async def prefill(self, request: dict) -> dict:
        from kvarn import SamplingParams

        t0 = time.perf_counter()
        rid = request["request_id"]
        ids = list(request["prompt_token_ids"])
        transfer_dtype = request.get("transfer_dtype") or self._transfer_dtype
        try:
            params = SamplingParams(**request["sampling"])
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None
        queue = self.loop.register(rid)
        done = False
        try:
            await self.loop.submit(self.engine.add_request, rid, ids, params,
                                   export_kv=transfer_dtype)
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    done = True
                    break
        finally:
            self.loop.unregister(rid)
            if not done:
                self.loop.submit_nowait(self.engine.abort_request, rid)
        if out.finish_reason != "prefill" or out.payload is None:
            raise RuntimeError(f"prefill of {rid} ended with {out.finish_reason!r} and no payload")
        dt = time.perf_counter() - t0
        self._metrics.prefill_time.observe(dt)
        self._metrics.prefill_tokens.inc(len(ids))
        return {"payload": out.payload,
                "info": {"prefill_replica": self._replica_id, "prefill_s": dt,
                         "num_prompt_tokens": len(ids), "payload_dtype": transfer_dtype}}

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()
