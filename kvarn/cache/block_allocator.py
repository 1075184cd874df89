"""Physical block ids of one pool: a free list with exact, checkable accounting.

    allocate() -> id      the lowest free id (deterministic: tests assert exact ids)
    free(id)              returns it; freeing an id that is not allocated raises DoubleFree

Ids are 0 .. num_blocks-1. A min-heap keeps allocation order independent of the order
in which blocks were freed, so a run of requests allocates the same ids every time.
"""
from __future__ import annotations

import heapq


class DoubleFree(RuntimeError):
    """A block id was freed twice, or freed without being allocated."""


class NoFreeBlocks(RuntimeError):
    """allocate() on an empty pool (the block manager checks first; reaching this is a bug)."""


class BlockAllocator:
    def __init__(self, num_blocks: int, name: str = "blocks"):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.name = name
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))          # already a valid heap
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocks(f"{self.name}: all {self.num_blocks} blocks are allocated")
        block_id = heapq.heappop(self._free)
        self._allocated.add(block_id)
        return block_id

    def allocate_many(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"{self.name}: asked for {n} blocks, {len(self._free)} free")
        return [self.allocate() for _ in range(n)]

    def free(self, block_id: int) -> None:
        if block_id not in self._allocated:
            state = "never allocated" if 0 <= block_id < self.num_blocks else "out of range"
            raise DoubleFree(f"{self.name}: freeing block {block_id}, which is {state} or already free")
        self._allocated.remove(block_id)
        heapq.heappush(self._free, block_id)

    def free_many(self, block_ids) -> None:
        for b in block_ids:
            self.free(b)

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._allocated

    def __repr__(self) -> str:
        return f"BlockAllocator({self.name}: {self.num_free}/{self.num_blocks} free)"
