"""BlockManager: exact physical ids in both pools, when blocks move to records, exact frees."""
import pytest

from kvarn.cache.base import CacheBudgetError, plan_pools
from kvarn.engine.block_manager import BlockManager, NotEnoughBlocks

G = 4


def bm(nfp=8, nrec=8, quantized=True):
    return BlockManager(nfp, nrec, G, quantized)


def test_prefill_chunk_quantizes_blocks_it_fills():
    m = bm()
    # 10 tokens: blocks 0 (sink), 1 (full -> record), 2 (tail: tokens 8, 9)
    plan = m.allocate(0, 0, 10)
    assert m.block_table(0) == [0, 1, 2]
    assert plan == [(1, 0)]                   # fp16 block 1 -> record 0, taken at schedule time
    assert (m.fp16.num_free, m.records.num_free) == (5, 7)
    m.commit(0)
    assert m.block_table(0) == [0, 0, 2]      # logical 1 now names record 0
    assert m.tables[0].num_records == 1
    assert (m.fp16.num_free, m.records.num_free) == (6, 7)


def test_decode_quantizes_at_exactly_the_step_that_fills_the_block():
    m = bm()
    m.allocate(0, 0, 10)
    m.commit(0)
    computed = 10
    quantized_at = {}
    for step in range(10):                    # decode tokens at positions 10, 11, ...
        plan = m.append_slot(0, computed)
        if plan:
            quantized_at[computed] = plan
        m.commit(0)
        computed += 1
    # position 11 completes block 2 (tokens 8..11): flushed in that step into record 1;
    # position 15 completes block 3 -> record 2; block 3 came from fp16 id 1 (lowest free
    # after block 1's slot went back), and so did block 4.
    assert quantized_at == {11: [(2, 1)], 15: [(1, 2)], 19: [(1, 3)]}
    assert m.block_table(0) == [0, 0, 1, 2, 3]
    m.free(0)
    assert (m.fp16.num_free, m.records.num_free) == (8, 8)


def test_sink_is_never_quantized_and_short_sequences_take_no_records():
    m = bm()
    assert m.allocate(0, 0, 4) == []          # block 0 full, but it is the sink
    assert m.allocate(0, 4, 3) == []          # block 1 partial
    assert m.allocate(0, 7, 1) == [(1, 0)]    # block 1 full at 8 tokens
    m.commit(0)
    assert m.block_table(0) == [0, 0]


def test_auto_pool_never_flushes():
    m = bm(quantized=False)
    assert m.allocate(0, 0, 10) == []
    m.commit(0)
    assert m.block_table(0) == [0, 1, 2]
    assert m.records.num_blocks == 0
    m.free(0)
    assert m.fp16.num_free == 8


def test_free_before_commit_returns_pending_records():
    m = bm()
    m.allocate(0, 0, 12)                      # plan: blocks 1, 2 -> records 0, 1
    m.free(0)                                 # aborted before the step ran
    assert (m.fp16.num_free, m.records.num_free) == (8, 8)
    m.free(0)                                 # unknown / already freed: a no-op


def test_not_enough_blocks_takes_nothing():
    m = bm(nfp=2, nrec=8)
    assert not m.can_allocate(0, 0, 12)       # needs 3 fp16 blocks
    with pytest.raises(NotEnoughBlocks):
        m.allocate(0, 0, 12)
    assert (m.fp16.num_free, m.records.num_free) == (2, 8)
    m2 = bm(nfp=8, nrec=0)
    assert not m2.can_allocate(0, 0, 8)       # block 1 needs a record at the end of the step
    assert m2.can_allocate(0, 0, 7)


def test_imported_sequence_layout():
    m = bm()
    m.allocate(5, 0, 3)                       # someone else holds fp16 0
    t = m.allocate_imported(1, 14)            # sink, records for blocks 1, 2, tail (12, 13)
    assert t.blocks == [1, 0, 1, 2] and t.num_records == 2
    m.free(1)
    m.free(5)
    assert (m.fp16.num_free, m.records.num_free) == (8, 8)
    with pytest.raises(NotEnoughBlocks):
        bm(nfp=8, nrec=1).allocate_imported(0, 14)


def test_demand_alone():
    m = bm()
    assert m.demand_alone(10, 100) == (3, 1)
    assert m.demand_alone(40, 8) == (2 + 2, 9)        # sink + tail + one 8-token chunk's blocks
    assert bm(quantized=False).demand_alone(10, 4) == (3, 0)


def test_pool_plan_counts_sink_and_tail_honestly():
    # SmolLM2-like shard: 30 layers, 3 KV heads, D=64; k4v2_g128 record = 7296 B
    f = 30 * 2 * 3 * 128 * 64 * 2
    r = 30 * 3 * 7296
    s = plan_pools(kv_cache_dtype="kvarn_k4v2_g128", budget_bytes=256 * 2**20, num_layers=30, num_kv_heads=3,
                   head_dim=64, assumed_context_len=2048, max_num_batched_tokens=256)
    assert (s.fp16_block_bytes, s.record_block_bytes) == (f, r)
    assert s.reserve_fp16_blocks == 3
    n_c = (256 * 2**20 - 3 * f) // (2 * f + 14 * r)
    assert s.capacity_seqs == n_c and s.capacity_tokens == n_c * 2048
    assert s.num_fp16_blocks == 3 + 2 * n_c
    assert s.num_record_blocks >= 14 * n_c and s.used_bytes <= 256 * 2**20
    a = plan_pools(kv_cache_dtype="auto", budget_bytes=256 * 2**20, num_layers=30, num_kv_heads=3, head_dim=64,
                   assumed_context_len=2048, max_num_batched_tokens=256)
    assert a.capacity_tokens == (256 * 2**20 // f) // 16 * 2048
    assert 3.0 < s.capacity_tokens / a.capacity_tokens < 4.5
    with pytest.raises(CacheBudgetError, match="cannot hold one"):
        plan_pools(kv_cache_dtype="kvarn_k4v2_g128", budget_bytes=10 * f, num_layers=30, num_kv_heads=3,
                   head_dim=64, assumed_context_len=2048, max_num_batched_tokens=2048)
