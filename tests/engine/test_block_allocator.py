"""BlockAllocator: exact ids, free list order, double-free detection."""
import pytest

from kvarn.cache.block_allocator import BlockAllocator, DoubleFree, NoFreeBlocks


def test_lowest_id_first_and_exact_counts():
    a = BlockAllocator(5)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    assert (a.num_free, a.num_allocated) == (2, 3)
    a.free(1)
    a.free(0)
    assert a.allocate() == 0                 # lowest free id, whatever the free order
    assert a.allocate() == 1
    assert a.allocate_many(2) == [3, 4]
    assert a.num_free == 0
    with pytest.raises(NoFreeBlocks):
        a.allocate()


def test_double_free_and_foreign_ids_raise():
    a = BlockAllocator(3)
    b = a.allocate()
    a.free(b)
    with pytest.raises(DoubleFree, match="already free"):
        a.free(b)
    with pytest.raises(DoubleFree):
        a.free(2)                            # never allocated
    with pytest.raises(DoubleFree, match="out of range"):
        a.free(7)
    assert a.num_free == 3


def test_allocate_many_is_all_or_nothing():
    a = BlockAllocator(4)
    a.allocate()
    with pytest.raises(NoFreeBlocks):
        a.allocate_many(4)
    assert a.num_free == 3
    a.free_many(a.allocate_many(3))
    assert a.num_free == 3 and a.is_allocated(0) and not a.is_allocated(1)


def test_empty_pool():
    a = BlockAllocator(0)
    assert a.num_free == 0
    with pytest.raises(NoFreeBlocks):
        a.allocate()
    with pytest.raises(ValueError):
        BlockAllocator(-1)
