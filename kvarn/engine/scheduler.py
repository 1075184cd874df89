"""Continuous batching with chunked prefill, one step at a time.

Each step spends a budget of ``max_num_batched_tokens`` query tokens:

    1. running sequences, oldest first: decode takes 1 token, an unfinished prompt
       takes min(rest, budget) (a chunk). When blocks run out, the newest running
       sequence is preempted by recompute (blocks freed, back to the front of the
       queue with num_computed_tokens = 0) until the older one fits.
    2. waiting sequences, first come first served, while the budget lasts, fewer than
       ``max_num_seqs`` run, and their first chunk's blocks are free. No admission in a
       step that preempted (the pool is tight).

A scheduled sequence samples when its chunk reaches its last token
(num_computed + chunk == num_tokens). Sequences continued from a KV payload enter the
queue already holding their blocks, with only their first sampled token to compute.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvarn.engine.block_manager import BlockManager
from kvarn.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq_id: int
    token_ids: list[int]          # the tokens to compute this step
    start_pos: int                # position of token_ids[0] (= num_computed_tokens)
    block_table: list[int]
    sample: bool
    params: dict | None           # SamplingParams.to_wire() when sample


@dataclass
class SchedulerOutput:
    """One step's input to every rank (compact: it is broadcast each step)."""
    seqs: list[ScheduledSeq] = field(default_factory=list)
    flush_src: list[int] = field(default_factory=list)     # fp16 blocks quantized after the step
    flush_dst: list[int] = field(default_factory=list)     # their record ids
    finished_seq_ids: list[int] = field(default_factory=list)   # ranks drop per-sequence state

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self._by_id: dict[int, Sequence] = {}
        self.num_preemptions = 0

    # --- queue ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.seq_id] = seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, seq_id: int) -> Sequence | None:
        return self._by_id.get(seq_id)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Remove a sequence, free its blocks, remember to tell the ranks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        self.bm.free(seq.seq_id)
        self._by_id.pop(seq.seq_id, None)
        self._finished_ids.append(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # --- one step ------------------------------------------------------------------
    def _schedule_seq(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        plan = self.bm.allocate(seq.seq_id, seq.num_computed_tokens, n)
        for src, dst in plan:
            out.flush_src.append(src)
            out.flush_dst.append(dst)
        start = seq.num_computed_tokens
        sample = start + n == seq.num_tokens
        out.seqs.append(ScheduledSeq(seq.seq_id, seq.token_slice(start, start + n), start,
                                     self.bm.block_table(seq.seq_id), sample,
                                     seq.params.to_wire() if sample else None))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.can_allocate(seq.seq_id, seq.num_computed_tokens, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._schedule_seq(out, seq, n)
                budget -= n
                i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.bm.can_allocate(seq.seq_id, seq.num_computed_tokens, n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule_seq(out, seq, n)
            budget -= n
        if out.is_empty:              # nothing runs: tell the ranks with the next real step
            self._finished_ids = out.finished_seq_ids + self._finished_ids
            out.finished_seq_ids = []
        return out

    def postprocess(self, out: SchedulerOutput) -> None:
        """The step ran: advance computed lengths and commit flushed blocks."""
        for s in out.seqs:
            seq = self.find(s.seq_id)
            if seq is None:
                continue
            seq.num_computed_tokens += len(s.token_ids)
            self.bm.commit(s.seq_id)
