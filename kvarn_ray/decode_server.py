"""DecodeServer: a decode replica that orchestrates its own prefill (decode-as-orchestrator).

One request through one replica:

    generate(request)                       asyncio (the replica's event loop)
      │ admit: wait in a bounded FIFO until the cache fits prompt + max_tokens
      │        (reserving those blocks), else 503 + Retry-After
      │ payload = await prefill.prefill.remote(...)     return value: this replica owns it
      │ loop.submit(import)  ──────────────────────────▶ EngineLoop thread
      │                                                   add_request_from_payload
      │                                                   (PayloadError: re-prefill once)
      │ yield the first token  ◀── the call's result ───  engine.take_output
      │ async for out in queue  ◀──── call_soon_threadsafe ── engine.step() outputs
      ▼ yield events (dicts) to the ingress

``EngineLoop`` owns the engine: one thread runs every engine call. Callers on the
event loop ``submit`` a function, which runs between two steps, and get an asyncio
future; step outputs go to per-request ``asyncio.Queue``s. Nothing else touches the
engine, so it needs no lock.

Time to first token: the prefill replica samples the first token and ships it in the
payload; the import call returns it (``engine.take_output``) and ``generate`` yields it
as its first event right away, before the engine's next step (which would otherwise
carry it together with the second token).

Admission reserves blocks for a request from the moment it is admitted until its
payload is imported (the engine only knows about a request once it is imported, and
prefill takes a while): a request fits when the engine can admit it *plus* every
reservation. A request that ends, however it ends, releases its reservation or, once
imported, is aborted in the engine, which frees its blocks; the payload object is
dropped right after the import, so nothing stays pinned in the object store.

Events yielded by ``generate`` (the ingress turns them into OpenAI objects):

    {"type": "delta", "text", "token_ids", "logprobs", "tokens", "top_logprobs",
     "finish_reason", "num_prompt_tokens", "num_generated_tokens", "kvarn": {...} on the
     last event}
      logprobs/tokens: per new token (None unless the request asked for logprobs);
      top_logprobs: per new token, [[token text, logprob], ...] best first (logprobs=N > 0)
    {"type": "error", "status", "message", "error_type", "code", "param", "retry_after_s"}
      (the first and only event, or the last one when the engine fails mid-stream)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ray import serve

from kvarn_ray.metrics import decode_metrics
from kvarn_ray.protocol import APIError, ServiceUnavailable

logger = logging.getLogger("ray.serve")

__all__ = ["DecodeServer", "EngineLoop"]


# --------------------------------------------------------------------------- engine loop


class EngineDead(RuntimeError):
    """The engine thread stopped (an exception in step(), or shutdown)."""


# Errors engine calls raise by design (bad payload, no blocks yet, a refused request).
_EXPECTED_ERRORS = (ValueError, APIError)


class EngineLoop:
    """Runs ``engine.step()`` in a background thread; asyncio callers get queues and futures.

        submit(fn, *args) -> asyncio.Future   fn(*args) runs in the loop thread, between steps
        register(request_id) -> asyncio.Queue every RequestOutput of that request, in order;
                                              an EngineDead instance if the engine dies
        unregister(request_id)

    ``before_step`` (optional) runs in the loop thread before every step and after the
    queued calls, also while idle when woken: admission control lives there.

    ``hold_steps(True)`` (a test hook) keeps the loop from stepping the engine while
    submitted calls still run, until ``hold_steps(False)``.
    """

    def __init__(self, engine, name: str = "kvarn-engine",
                 before_step: Callable[[], None] | None = None,
                 after_step: Callable[[list], None] | None = None):
        self.engine = engine
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._before_step = before_step
        self._after_step = after_step
        self._stop = False
        self._hold = False
        self.error: BaseException | None = None
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def wake(self) -> None:
        self._wake.set()

    def hold_steps(self, hold: bool) -> None:
        self._hold = bool(hold)
        self._wake.set()

    def submit(self, fn: Callable, *args, **kwargs) -> asyncio.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(EngineDead(f"engine loop is not running: {self.error!r}"))
        else:
            self._calls.append((fn, args, kwargs, fut))
            self._wake.set()
        return asyncio.wrap_future(fut)

    def submit_nowait(self, fn: Callable, *args, **kwargs) -> None:
        """Fire and forget (safe from ``finally`` blocks of cancelled coroutines)."""
        if self.alive:
            self._calls.append((fn, args, kwargs, None))
            self._wake.set()

    def register(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    def unregister(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)

    def shutdown(self) -> None:
        """Stop the loop thread, then shut the engine down (its TP ranks included)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort at replica teardown
            pass

    # -- loop thread -------------------------------------------------------------------

    def _run_calls(self) -> None:
        while self._calls:
            fn, args, kwargs, fut = self._calls.popleft()
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if fut is None or not isinstance(e, _EXPECTED_ERRORS):
                    logger.warning("engine call %s failed", getattr(fn, "__name__", fn),
                                   exc_info=True)
                # The traceback's frames hold the call's arguments (a payload: a pinned
                # object-store buffer) in a reference cycle that only the cyclic GC would
                # break; the caller needs the error, not our frames.
                e.__traceback__ = e.__context__ = e.__cause__ = None
                if fut is not None:
                    fut.set_exception(e)
                del e
            else:
                if fut is not None:
                    fut.set_result(result)

    def _deliver(self, outputs: list) -> None:
        with self._streams_lock:
            targets = [(o, self._streams.get(o.request_id)) for o in outputs]
        for out, target in targets:
            if target is not None:
                loop, q = target
                loop.call_soon_threadsafe(q.put_nowait, out)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._run_calls()
                if self._before_step is not None:
                    self._before_step()
                if self.engine.has_unfinished_requests() and not self._hold:
                    outputs = self.engine.step()
                    self.num_steps += 1
                    if outputs:
                        self._deliver(outputs)
                    if self._after_step is not None:
                        self._after_step(outputs)
                else:
                    # Idle: sleep until a call arrives; the timeout only bounds how
                    # stale an idle replica's gauges get.
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    if self._after_step is not None:
                        self._after_step([])
        except BaseException as e:  # noqa: BLE001 - every waiter must learn of it
            logger.exception("engine loop died")
            self.error = e
        finally:
            dead = EngineDead(f"engine loop stopped: {self.error!r}")
            with self._streams_lock:
                streams = list(self._streams.values())
            for loop, q in streams:
                loop.call_soon_threadsafe(q.put_nowait, dead)
            while self._calls:
                _, _, _, fut = self._calls.popleft()
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_exception(dead)


# --------------------------------------------------------------------------- admission


@dataclass
class _Admission:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class _Admitter:
    """Bounded FIFO admission with block reservations; all methods run in the loop thread.

    A request fits when ``engine.can_admit`` says so *and* the free blocks also cover
    every reservation (requests admitted whose payload is not imported yet), counted
    per sequence with the engine's own demand arithmetic. Running sequences' future
    growth is not reserved (the engine preempts by recompute when it runs out, as
    vLLM does); a late NotEnoughBlocks at import puts the request back at the head of
    the queue.
    """

    def __init__(self, engine, max_waiting: int):
        self.engine = engine
        self.max_waiting = max_waiting
        self.waiting: collections.deque[_Admission] = collections.deque()
        self.reserved: dict[str, tuple[int, int]] = {}

    def _fits(self, n: int, m: int) -> bool:
        e = self.engine
        if not e.can_admit(n, m):
            return False
        if not self.reserved:
            return True
        # LLMEngine.can_admit has no notion of reservations: redo its sum with them.
        bm = getattr(e, "block_manager", None)
        if bm is None or not hasattr(bm, "demand_alone"):
            return not self.reserved
        chunk = e.config.max_num_batched_tokens
        fp, rec = bm.demand_alone(n + m, chunk)
        for rn, rm in self.reserved.values():
            f, r = bm.demand_alone(rn + rm, chunk)
            fp, rec = fp + f, rec + r
        for seq in e.scheduler.waiting:
            if seq.seq_id not in bm.tables:
                f, r = bm.demand_alone(seq.num_tokens, chunk)
                fp, rec = fp + f, rec + r
        return fp <= bm.fp16.num_free and rec <= bm.records.num_free

    def enqueue(self, adm: _Admission, at_head: bool = False) -> None:
        if not at_head and len(self.waiting) >= self.max_waiting:
            raise ServiceUnavailable(
                f"decode replica is full: {len(self.waiting)} requests already wait for KV "
                f"cache blocks", retry_after_s=2.0)
        (self.waiting.appendleft if at_head else self.waiting.append)(adm)
        self.admit_waiting()

    def admit_waiting(self) -> None:
        while self.waiting:
            head = self.waiting[0]
            if head.future.cancelled():
                self.waiting.popleft()
                continue
            if not self._fits(head.num_prompt_tokens, head.max_tokens):
                return
            self.waiting.popleft()
            if head.future.set_running_or_notify_cancel():
                self.reserved[head.request_id] = (head.num_prompt_tokens, head.max_tokens)
                head.future.set_result(True)

    def withdraw(self, request_id: str) -> None:
        """Forget a request: out of the queue, its reservation released."""
        self.waiting = collections.deque(a for a in self.waiting if a.request_id != request_id)
        if self.reserved.pop(request_id, None) is not None:
            self.admit_waiting()

    def import_payload(self, request_id: str, payload, params):
        """add_request_from_payload, turning the reservation into engine-held blocks.

        Returns the RequestOutput of the payload's first token (sampled by the prefill
        replica), taken out of the engine now: no later step's outputs repeat it.
        """
        self.engine.add_request_from_payload(request_id, payload, params)
        self.reserved.pop(request_id, None)
        return self.engine.take_output(request_id)


# --------------------------------------------------------------------------- deployment


def _error_event(e: APIError) -> dict:
    return {"type": "error", "status": e.status_code, "message": e.message, "error_type": e.type,
            "code": e.code, "param": e.param, "retry_after_s": e.retry_after_s}


def _payload_corrupted(payload):
    """A copy of ``payload`` whose checksum no longer matches (fault injection)."""
    import copy

    bad = copy.copy(payload)
    bad.header = dict(payload.header)
    bad.header["checksum"] = (int(bad.header.get("checksum") or 0) + 1) & 0xFFFFFFFF
    return bad


@serve.deployment
class DecodeServer:
    """A decode replica: a KVarN-cache engine, continuous batching, remote prefill.

    Args:
        prefill: DeploymentHandle to PrefillServer.
        engine_config: ``kvarn.engine.EngineConfig`` keyword arguments (kv_cache_dtype
            is the decode preset).
        transfer_dtype: what the prefill replica ships (a preset or ``"auto"`` for fp16).
        max_waiting: requests that may wait for cache blocks before 503s.
        admission_timeout_s: how long one waits before a 503.
    """

    def __init__(self, prefill, engine_config: dict, transfer_dtype: str,
                 max_waiting: int = 64, admission_timeout_s: float = 60.0,
                 tensor_parallel_size: int = 1):
        from kvarn.engine import EngineConfig, LLMEngine

        self._prefill = prefill
        self._transfer_dtype = transfer_dtype
        self._admission_timeout_s = admission_timeout_s
        self._prefill_retries = 2
        cfg = dict(engine_config)
        if tensor_parallel_size > 1:
            from kvarn_ray.executor import RayExecutor

            cfg["executor"] = RayExecutor
        cfg["tensor_parallel_size"] = tensor_parallel_size
        t0 = time.perf_counter()
        self.engine = LLMEngine(EngineConfig(**cfg))
        self._tokenizer = self.engine.tokenizer
        self._admitter = _Admitter(self.engine, max_waiting)
        self._baseline_free_blocks = self.engine.num_free_blocks
        self._metrics = decode_metrics()
        self._last_gauges = 0.0
        self._fail_next_payloads = 0
        self._payload_refs: list[weakref.ref] = []   # every payload received, weakly
        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id if ctx else f"local-{os.getpid()}"
        self.loop = EngineLoop(self.engine, name="kvarn-decode",
                               before_step=self._admitter.admit_waiting,
                               after_step=self._update_gauges)
        logger.info("DecodeServer %s ready in %.1f s: %s, %d blocks", self._replica_id,
                    time.perf_counter() - t0, cfg.get("kv_cache_dtype"),
                    self.engine.num_total_blocks)

    # -- loop-thread helpers -----------------------------------------------------------

    def _update_gauges(self, outputs: list) -> None:
        now = time.monotonic()
        if now - self._last_gauges < 0.5:
            return
        self._last_gauges = now
        m = self._metrics
        m.kv_cache_usage.set(float(self.engine.kv_cache_usage))
        m.num_free_blocks.set(float(self.engine.num_free_blocks))
        m.num_waiting.set(float(len(self._admitter.waiting)))
        m.num_running.set(float(self.engine.get_num_unfinished_requests()))

    def _stats(self) -> dict:
        e = self.engine
        return {
            "replica_id": self._replica_id,
            "num_free_blocks": e.num_free_blocks,
            "num_total_blocks": e.num_total_blocks,
            "baseline_free_blocks": self._baseline_free_blocks,
            "kv_cache_usage": float(e.kv_cache_usage),
            "capacity_tokens": e.capacity_tokens,
            "has_unfinished_requests": bool(e.has_unfinished_requests()),
            "num_waiting": len(self._admitter.waiting),
            "num_reserved": len(self._admitter.reserved),
            "num_streams": len(self.loop._streams),
            "num_live_payloads": sum(r() is not None for r in self._payload_refs),
            "num_steps": self.loop.num_steps,
            "transfer_dtype": self._transfer_dtype,
            "tensor_parallel_size": e.config.tensor_parallel_size,
            "executor": type(e.executor).__name__,
        }

    # -- public methods ----------------------------------------------------------------

    async def stats(self) -> dict:
        """Debug/test view of this replica's cache and queues (taken between two steps)."""
        return await self.loop.submit(self._stats)

    async def debug_fail_next_payloads(self, n: int) -> None:
        """Test hook: corrupt the next ``n`` payloads this replica receives."""
        self._fail_next_payloads = int(n)

    async def debug_hold_steps(self, hold: bool) -> None:
        """Test hook: stop (True) or resume (False) engine steps; calls (imports, stats)
        still run, so a request is admitted, prefilled and imported, but not decoded."""
        self.loop.hold_steps(hold)

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"engine loop is dead: {self.loop.error!r}")

    async def generate(self, request: dict):
        """Async generator of events for one request (module docstring)."""
        try:
            async for ev in self._generate(request):
                yield ev
        except APIError as e:
            self._metrics.rejected.inc(tags={"reason": str(e.code or e.status_code)})
            yield _error_event(e)
        except EngineDead as e:
            yield _error_event(APIError(503, f"decode engine is not running: {e}",
                                        "service_unavailable", code="engine_dead",
                                        retry_after_s=5.0))
        except Exception as e:  # noqa: BLE001 - the client gets a 500 body, the log the trace
            logger.exception("request %s failed", request.get("request_id"))
            yield _error_event(APIError(500, f"{type(e).__name__}: {e}", "server_error"))

    # -- the request path --------------------------------------------------------------

    async def _admit(self, rid: str, n: int, max_tokens: int, at_head: bool = False) -> None:
        """Wait for a reservation of the request's blocks (503 when the queue is full or slow)."""
        adm = _Admission(rid, n, max_tokens)
        await self.loop.submit(self._admitter.enqueue, adm, at_head)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(adm.future)),
                                   self._admission_timeout_s)
        except asyncio.TimeoutError:
            self.loop.submit_nowait(self._admitter.withdraw, rid)
            raise ServiceUnavailable(
                f"no KV cache blocks freed up for this request within "
                f"{self._admission_timeout_s:.0f} s", retry_after_s=5.0) from None
        except BaseException:
            self.loop.submit_nowait(self._admitter.withdraw, rid)
            raise

    async def _prefill_once(self, rid: str, ids: list[int], sampling: dict, attempt: int):
        """One prefill call (retried on another replica if the one serving it dies).

        Returns (payload, info). The payload is deserialized from this call's return
        object, which this replica owns; its ObjectRef rides along as
        ``payload._kvarn_ray_ref`` so TP ranks can read the same object zero-copy.
        Dropping the payload drops the last reference and frees the object.
        """
        import ray.exceptions

        t0 = time.perf_counter()
        for call in range(1 + self._prefill_retries):
            response = self._prefill.prefill.remote(
                {"request_id": f"{rid}-p{attempt}.{call}", "prompt_token_ids": ids,
                 "sampling": sampling, "transfer_dtype": self._transfer_dtype})
            try:
                if response.by_reference:
                    ref = await response._to_object_ref()
                    result = await ref
                else:
                    ref, result = None, await response
                break
            except asyncio.CancelledError:
                response.cancel()
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if call == self._prefill_retries:
                    raise APIError(503, f"prefill failed: the prefill replica died ({e})",
                                   "service_unavailable", code="prefill_unavailable",
                                   retry_after_s=5.0) from None
                logger.warning("request %s: prefill replica died, retrying: %s", rid, e)
            finally:
                del response
        payload, info = result["payload"], result["info"]
        del result
        if self._fail_next_payloads > 0:
            self._fail_next_payloads -= 1
            payload = _payload_corrupted(payload)
        payload._kvarn_ray_ref = ref
        del ref
        self._payload_refs = [r for r in self._payload_refs if r() is not None]
        self._payload_refs.append(weakref.ref(payload))
        info["prefill_call_s"] = time.perf_counter() - t0
        return payload, info

    async def _generate(self, request: dict):
        from kvarn.engine import NotEnoughBlocks
        from kvarn.transfer import PayloadError
        from kvarn import SamplingParams

        arrival = time.perf_counter()
        rid = request["request_id"]
        ids = list(request["prompt_token_ids"])
        sampling = dict(request["sampling"])
        try:
            params = SamplingParams(**sampling)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None
        max_model_len = self.engine.max_model_len
        max_tokens = params.max_tokens or (max_model_len - len(ids))
        if not self.loop.alive:
            raise APIError(503, "decode engine is not running", "service_unavailable",
                           code="engine_dead", retry_after_s=5.0)

        await self._admit(rid, len(ids), max_tokens)
        queue = first = None
        imported = finished = False
        meta: dict[str, Any] = {"decode_replica": self._replica_id,
                                "transfer_dtype": self._transfer_dtype, "reprefills": 0}
        try:
            # prefill -> import, re-prefilling once on a payload that fails validation
            t_transfer = time.perf_counter()
            for attempt in range(2):
                payload, info = await self._prefill_once(rid, ids, sampling, attempt)
                meta.update(info)
                meta["payload_bytes"] = int(payload.nbytes)
                meta["fp16_equivalent_bytes"] = int(payload.fp16_equivalent_nbytes)
                meta["payload_element_dtype"] = payload.header.get("dtype")
                if queue is None:
                    queue = self.loop.register(rid)
                t_import = time.perf_counter()
                try:
                    while True:
                        try:
                            first = await self.loop.submit(self._admitter.import_payload, rid,
                                                           payload, params)
                            break
                        except PayloadError:
                            raise
                        except ValueError as e:  # the engine refused the request itself
                            raise APIError(400, str(e)) from None
                        except NotEnoughBlocks:
                            # reservations undercount a little: wait for blocks, first in line
                            self.loop.submit_nowait(self._admitter.withdraw, rid)
                            await self._admit(rid, len(ids), max_tokens, at_head=True)
                    imported = True
                    break
                except PayloadError as e:
                    meta["reprefills"] += 1
                    self._metrics.reprefills.inc()
                    logger.warning("request %s: payload rejected (%s); %s", rid, e,
                                   "prefilling again" if attempt == 0 else "giving up")
                    if attempt == 1:
                        raise APIError(502, f"the KV payload failed validation twice: {e}",
                                       "server_error", code="payload_invalid") from None
                finally:
                    meta["import_s"] = time.perf_counter() - t_import
                    del payload
            meta["transfer_s"] = time.perf_counter() - t_transfer
            m = self._metrics
            m.prompt_tokens.inc(len(ids))
            m.payload_bytes.observe(meta["payload_bytes"],
                                    tags={"transfer_dtype": self._transfer_dtype})
            m.transfer_time.observe(meta["transfer_s"])
            if meta["payload_bytes"]:
                m.compression_ratio.observe(
                    meta["fp16_equivalent_bytes"] / meta["payload_bytes"],
                    tags={"transfer_dtype": self._transfer_dtype})

            # stream: the payload's first token at once, then the engine's outputs
            t_first = None
            num_generated = 0
            while not finished:
                if first is not None:
                    batch, first = [first], None
                else:
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                for it in batch:
                    if isinstance(it, BaseException):
                        raise APIError(500, f"decode engine failed: {it}", "server_error",
                                       code="engine_error")
                ev = self._merge(batch, params)
                finished = ev["finish_reason"] is not None
                num_generated = ev["num_generated_tokens"]
                now = time.perf_counter()
                if t_first is None and ev["token_ids"]:
                    t_first = now
                    meta["ttft_s"] = now - arrival
                    m.ttft.observe(now - arrival)
                m.generation_tokens.inc(len(ev["token_ids"]))
                if finished:
                    if t_first is not None and num_generated > 1:
                        tpot = (now - t_first) / (num_generated - 1)
                        meta["tpot_s"] = tpot
                        m.tpot.observe(tpot)
                    meta["e2e_s"] = now - arrival
                    ev["kvarn"] = meta
                yield ev
        finally:
            if queue is not None:
                self.loop.unregister(rid)
            if imported and not finished:
                self.loop.submit_nowait(self.engine.abort_request, rid)
            elif not imported:
                self.loop.submit_nowait(self._admitter.withdraw, rid)

    def _merge(self, outputs: list, params) -> dict:
        """Several RequestOutputs of one request (queued while the client was busy) -> one event."""
        last = outputs[-1]
        token_ids: list[int] = []
        logprobs: list[float] | None = [] if params.logprobs is not None else None
        tops: list | None = [] if params.logprobs else None
        text = []
        for o in outputs:
            token_ids.extend(o.new_token_ids)
            text.append(o.new_text or "")
            if logprobs is not None and o.logprobs is not None:
                logprobs.extend(o.logprobs)
            if tops is not None and o.top_logprobs is not None:
                tops.extend(o.top_logprobs)
        tokens = top_logprobs = None
        if logprobs is not None:
            dec = self._tokenizer.decode
            tokens = [dec([t]) for t in token_ids]
            if tops is not None:
                top_logprobs = [[[dec([t]), lp] for t, lp in top] for top in tops]
        return {
            "type": "delta",
            "text": "".join(text),
            "token_ids": token_ids,
            "logprobs": logprobs,
            "tokens": tokens,
            "top_logprobs": top_logprobs,
            "finish_reason": last.finish_reason if last.finished else None,
            "num_prompt_tokens": last.num_prompt_tokens,
            "num_generated_tokens": len(last.token_ids),
        }

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()
