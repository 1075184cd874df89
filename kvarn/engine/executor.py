"""Executors: how the driver's step reaches the ranks.

    Executor (ABC)       info, execute_model(step) -> (tokens, logprobs), export_kv, import_kv, shutdown
    UniProcExecutor      one Worker in this process (TP=1)
    MultiprocExecutor    rank 0 in this process, ranks 1..t-1 spawned (torch.multiprocessing);
                         torch.distributed (gloo on CPU, NCCL on CUDA) carries the model's
                         collectives, a pipe per rank carries the control messages

Control message per step (MultiprocExecutor): the SchedulerOutput is pickled once
(protocol 5) and written to every rank's pipe; rank 0 runs its own shard meanwhile;
a rank answers only when it fails (its traceback), checked before the next step. Only
rank 0 samples. ``step_overhead_s`` keeps the driver-side time spent on this per step
(error poll, pickle, pipe writes), for benchmarks.

kvarn_ray plugs in by subclassing Executor (Ray actors each holding a Worker); the
engine only calls the methods below, in the order the ranks must see them.
"""
from __future__ import annotations

import pickle
import socket
import time
import traceback
from abc import ABC, abstractmethod

from kvarn.engine.config import EngineConfig
from kvarn.engine.scheduler import SchedulerOutput


class Executor(ABC):
    """Runs every step on every rank. ``info`` is rank 0's ``Worker.info()``."""

    info: dict

    @abstractmethod
    def __init__(self, config: EngineConfig): ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> tuple[list[int], list]:
        """Run one step; returns (token ids, logprobs) of the sampling sequences, in order."""

    @abstractmethod
    def export_kv(self, block_table: list[int], num_tokens: int, quantize_to: str | None = None) -> dict:
        """A committed sequence's KV, every head: {records, sink, tail} head-major numpy;
        ``quantize_to``: an 'auto' cache's KV packed to that KVarN preset by each rank."""

    @abstractmethod
    def import_kv(self, block_table: list[int], num_tokens: int, payload) -> None:
        """Write a validated KVPayload into the blocks; rank r takes its heads' slice."""

    @abstractmethod
    def shutdown(self) -> None: ...


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        from kvarn.engine.worker import Worker

        if config.tensor_parallel_size != 1:
            raise ValueError("UniProcExecutor runs tensor_parallel_size=1 only; use MultiprocExecutor")
        self.worker = Worker(config, 0, 1)
        self.info = self.worker.info()

    def execute_model(self, scheduler_output):
        return self.worker.execute_model(scheduler_output)

    def export_kv(self, block_table, num_tokens, quantize_to=None):
        return self.worker.export_kv(block_table, num_tokens, quantize_to)

    def import_kv(self, block_table, num_tokens, payload):
        self.worker.import_kv(block_table, num_tokens, payload.buffers(), payload.header)

    def shutdown(self):
        self.worker.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(config: EngineConfig, rank: int, world_size: int, init_method: str, conn) -> None:
    """A spawned rank: build its Worker, then serve the driver's calls until 'shutdown'."""
    from kvarn.engine.worker import Worker

    try:
        worker = Worker(config, rank, world_size, init_method)
        conn.send(("ok", worker.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    heads = worker.model.num_kv_heads_local
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:             # the driver is gone
            break
        try:
            if method == "execute_model":
                worker.execute_model(*args)          # no reply: the driver does not wait
            elif method == "export_kv":
                conn.send(("ok", worker.export_kv(*args)))
            elif method == "import_kv":
                table, n, payload = args
                part = payload.slice_heads(rank * heads, (rank + 1) * heads)
                worker.import_kv(table, n, part.buffers(), part.header)
                conn.send(("ok", None))
            elif method == "shutdown":
                worker.shutdown()
                conn.send(("ok", None))
                break
        except BaseException:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
            if method == "shutdown":
                break


class RankError(RuntimeError):
    """A spawned rank raised; the message holds its traceback."""


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0):
        import torch.multiprocessing as mp

        from kvarn.engine.worker import Worker

        t = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(1, t):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(config, rank, t, init_method, child), daemon=True,
                            name=f"kvarn-tp-rank{rank}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.step_overhead_s = 0.0
        self.num_steps = 0
        self._closed = False
        try:
            self.worker = Worker(config, 0, t, init_method)
            deadline = time.monotonic() + start_timeout_s
            for rank, conn in enumerate(self.conns, 1):
                self._recv(conn, rank, deadline)
        except BaseException:
            self._kill()
            raise
        self.info = self.worker.info()
        self.heads = self.worker.model.num_kv_heads_local

    def _recv(self, conn, rank: int, deadline: float | None = None):
        while not conn.poll(0.5):
            if not self.procs[rank - 1].is_alive():
                raise RankError(f"TP rank {rank} died (exit code {self.procs[rank - 1].exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                raise RankError(f"TP rank {rank} did not answer in time")
        msg = conn.recv_bytes()
        if msg == b"ok":
            return None
        status, value = pickle.loads(msg)
        if status == "error":
            raise RankError(f"TP rank {rank} failed:\n{value}")
        return value

    def _broadcast(self, method: str, *args) -> None:
        blob = pickle.dumps((method, args), protocol=5)
        for conn in self.conns:
            conn.send_bytes(blob)

    def _raise_pending_errors(self) -> None:
        """A rank answers an execute_model only when it failed: surface that now."""
        for rank, conn in enumerate(self.conns, 1):
            if conn.poll():
                self._recv(conn, rank)
                raise RankError(f"TP rank {rank} sent an unexpected message")
            if not self.procs[rank - 1].is_alive():
                raise RankError(f"TP rank {rank} died (exit code {self.procs[rank - 1].exitcode})")

    def execute_model(self, scheduler_output):
        t0 = time.perf_counter()
        self._raise_pending_errors()
        self._broadcast("execute_model", scheduler_output)
        self.step_overhead_s += time.perf_counter() - t0
        self.num_steps += 1
        # the ranks' collectives keep them in step with this one; their own results are unused
        return self.worker.execute_model(scheduler_output)

    def export_kv(self, block_table, num_tokens, quantize_to=None):
        import numpy as np

        self._broadcast("export_kv", block_table, num_tokens, quantize_to)
        parts = [self.worker.export_kv(block_table, num_tokens, quantize_to)]
        parts += [self._recv(conn, rank) for rank, conn in enumerate(self.conns, 1)]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def import_kv(self, block_table, num_tokens, payload):
        self._broadcast("import_kv", block_table, num_tokens, payload)
        mine = payload.slice_heads(0, self.heads)
        self.worker.import_kv(block_table, num_tokens, mine.buffers(), mine.header)
        for rank, conn in enumerate(self.conns, 1):
            self._recv(conn, rank)

    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        try:
            self._broadcast("shutdown")
            self.worker.shutdown()
            for rank, conn in enumerate(self.conns, 1):
                self._recv(conn, rank, time.monotonic() + 30)
        except Exception:
            pass
        self._kill()

    def _kill(self):
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self.conns:
            c.close()


def make_executor(config: EngineConfig) -> Executor:
    ex = config.executor
    if ex is None:
        return UniProcExecutor(config) if config.tensor_parallel_size == 1 else MultiprocExecutor(config)
    if isinstance(ex, type):
        if not issubclass(ex, Executor):
            raise TypeError(f"executor must be an Executor subclass or instance, got class {ex.__name__}")
        return ex(config)
    if isinstance(ex, Executor):
        return ex
    if isinstance(ex, str):
        table = {"uniproc": UniProcExecutor, "mp": MultiprocExecutor, "multiproc": MultiprocExecutor}
        if ex in table:
            return table[ex](config)
    raise TypeError(f"executor must be None, an Executor subclass or instance, got {ex!r}")
