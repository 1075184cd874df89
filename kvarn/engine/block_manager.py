"""Per-sequence logical -> physical block tables over the fp16 and record pools.

One table per sequence, logical block i -> a physical id; which pool the id is in
follows from the sequence's committed length n (kvarn/kernels/reference.py):

    logical   0      1 .. r                          r+1 .. len-1
    pool      fp16   records (r = max(n//G - 1, 0))  fp16 (the tail, and blocks a
              sink   'auto': r = 0 always            step is writing)

A step that computes T new tokens of a sequence (``allocate(seq, T)``):

    before   | sink | r0 | r1 | f(tail) |                    committed n = 4G + 5
    allocate | sink | r0 | r1 | f | f' | f'' |               new fp16 blocks for n+T tokens
             flush plan: f -> r2, f' -> r3 (blocks the step fills), record ids taken now
    commit   | sink | r0 | r1 | r2 | r3 | f'' |             after the step: f, f' freed

Records are taken at schedule time so nothing can fail after the model ran; the fp16
slots go back only in ``commit``. ``free`` returns every id the table holds, plus
record ids of a flush that never ran. Allocators hand out the lowest free id, so tests
can assert exact ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvarn.cache.block_allocator import BlockAllocator
from kvarn.kernels.reference import num_record_blocks


class NotEnoughBlocks(RuntimeError):
    """The cache cannot hold this sequence now (free blocks run out); try again later."""


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)     # logical -> physical
    num_records: int = 0                                # logical 1..num_records are record ids
    pending: list[tuple[int, int, int]] = field(default_factory=list)   # (logical, fp16 id, record id)


class BlockManager:
    def __init__(self, num_fp16_blocks: int, num_record_blocks: int, block_size: int, quantized: bool):
        self.block_size = block_size
        self.quantized = quantized
        self.fp16 = BlockAllocator(num_fp16_blocks, "fp16 blocks")
        self.records = BlockAllocator(num_record_blocks if quantized else 0, "record blocks")
        self.tables: dict[int, BlockTable] = {}

    # --- demand --------------------------------------------------------------------
    def _target_records(self, num_tokens: int) -> int:
        return num_record_blocks(num_tokens, self.block_size) if self.quantized else 0

    def demand(self, seq_id: int, num_computed: int, num_new: int) -> tuple[int, int]:
        """(fp16 blocks, record blocks) to take from the free lists for num_new more tokens."""
        t = self.tables.get(seq_id)
        have = len(t.blocks) if t else 0
        n_rec = (t.num_records + len(t.pending)) if t else 0
        total = num_computed + num_new
        fp = max(math.ceil(total / self.block_size) - have, 0)
        rec = max(self._target_records(total) - n_rec, 0)
        return fp, rec

    def demand_alone(self, num_tokens: int, chunk_tokens: int) -> tuple[int, int]:
        """Peak (fp16, records) for one sequence growing to num_tokens in chunks of chunk_tokens."""
        if not self.quantized:
            return math.ceil(num_tokens / self.block_size), 0
        g = self.block_size
        fp = min(math.ceil(num_tokens / g), 2 + math.ceil(min(chunk_tokens, num_tokens) / g))
        return fp, self._target_records(num_tokens)

    def can_allocate(self, seq_id: int, num_computed: int, num_new: int) -> bool:
        fp, rec = self.demand(seq_id, num_computed, num_new)
        return fp <= self.fp16.num_free and rec <= self.records.num_free

    # --- changes -------------------------------------------------------------------
    def allocate(self, seq_id: int, num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """Blocks for num_new more tokens; returns the flush plan [(fp16 id, record id)]."""
        fp, rec = self.demand(seq_id, num_computed, num_new)
        if fp > self.fp16.num_free or rec > self.records.num_free:
            raise NotEnoughBlocks(
                f"sequence {seq_id}: needs {fp} fp16 + {rec} record blocks, "
                f"{self.fp16.num_free} + {self.records.num_free} free")
        t = self.tables.setdefault(seq_id, BlockTable())
        t.blocks.extend(self.fp16.allocate_many(fp))
        first = t.num_records + len(t.pending) + 1
        plan = []
        for logical in range(first, first + rec):
            r = self.records.allocate()
            t.pending.append((logical, t.blocks[logical], r))
            plan.append((t.blocks[logical], r))
        return plan

    def append_slot(self, seq_id: int, num_computed: int) -> list[tuple[int, int]]:
        """One more token (decode)."""
        return self.allocate(seq_id, num_computed, 1)

    def commit(self, seq_id: int) -> None:
        """The step ran: flushed blocks now live in the record pool; free their fp16 slots."""
        t = self.tables.get(seq_id)
        if t is None or not t.pending:
            return
        for logical, fp_id, rec_id in t.pending:
            t.blocks[logical] = rec_id
            self.fp16.free(fp_id)
        t.num_records += len(t.pending)
        t.pending.clear()

    def allocate_imported(self, seq_id: int, num_tokens: int) -> BlockTable:
        """A committed sequence of num_tokens arriving from a payload: sink, records, tail."""
        if seq_id in self.tables:
            raise RuntimeError(f"sequence {seq_id} already has blocks")
        nb = math.ceil(num_tokens / self.block_size)
        nrec = self._target_records(num_tokens)
        nfp = nb - nrec
        if nfp > self.fp16.num_free or nrec > self.records.num_free:
            raise NotEnoughBlocks(
                f"importing {num_tokens} tokens needs {nfp} fp16 + {nrec} record blocks, "
                f"{self.fp16.num_free} + {self.records.num_free} free")
        sink = self.fp16.allocate()
        recs = self.records.allocate_many(nrec)
        rest = self.fp16.allocate_many(nfp - 1)
        t = BlockTable([sink, *recs, *rest], nrec)
        self.tables[seq_id] = t
        return t

    def free(self, seq_id: int) -> None:
        """Return every block of the sequence (safe to call for a sequence without blocks)."""
        t = self.tables.pop(seq_id, None)
        if t is None:
            return
        for logical, fp_id, rec_id in t.pending:       # a flush that never ran
            self.records.free(rec_id)
        for logical, b in enumerate(t.blocks):
            if 1 <= logical <= t.num_records:
                self.records.free(b)
            else:
                self.fp16.free(b)

    def block_table(self, seq_id: int) -> list[int]:
        t = self.tables.get(seq_id)
        return list(t.blocks) if t else []

    # --- accounting ----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.fp16.num_free + self.records.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.fp16.num_blocks + self.records.num_blocks
