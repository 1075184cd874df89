"""Scheduler: chunked prefill, continuous batching, max_num_seqs, preemption, flush plans.

No model: a step is simulated by ``postprocess`` plus appending a token to every
sequence that sampled.
"""
from kvarn.engine.block_manager import BlockManager
from kvarn.engine.sampling_params import SamplingParams
from kvarn.engine.scheduler import Scheduler
from kvarn.engine.sequence import Sequence, SequenceStatus

G = 4


def make(nfp=16, nrec=16, quantized=True, max_num_seqs=8, budget=8):
    return Scheduler(BlockManager(nfp, nrec, G, quantized), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def seq(i, n):
    return Sequence(i, f"r{i}", list(range(100, 100 + n)), SamplingParams(temperature=0))


def run_step(s: Scheduler):
    out = s.schedule()
    s.postprocess(out)
    for sc in out.seqs:
        if sc.sample:
            s.find(sc.seq_id).append_token(7, None)
    return out


def shape(out):
    return [(x.seq_id, len(x.token_ids), x.start_pos, x.sample) for x in out.seqs]


def test_chunked_prefill_then_decode():
    s = make(budget=4)
    a = seq(0, 10)
    s.add(a)
    assert shape(run_step(s)) == [(0, 4, 0, False)]
    assert shape(run_step(s)) == [(0, 4, 4, False)]
    out = run_step(s)
    assert shape(out) == [(0, 2, 8, True)]              # last chunk samples
    assert out.seqs[0].token_ids == [108, 109]
    assert shape(run_step(s)) == [(0, 1, 10, True)]     # decode: the sampled token
    assert a.num_computed_tokens == 11 and a.output_token_ids == [7, 7]


def test_flush_plan_in_step_output():
    s = make(budget=8)
    s.add(seq(0, 6))
    out = run_step(s)                                    # 6 tokens: sink + a partial block
    assert (out.flush_src, out.flush_dst) == ([], [])
    run_step(s)                                          # position 6
    out = run_step(s)                                    # position 7 fills block 1
    assert (out.flush_src, out.flush_dst) == ([1], [0])
    assert s.bm.block_table(0) == [0, 0]


def test_continuous_batching_running_first_and_max_num_seqs():
    s = make(budget=6, max_num_seqs=2)
    for i, n in enumerate([3, 5, 2]):
        s.add(seq(i, n))
    out = run_step(s)
    assert shape(out) == [(0, 3, 0, True), (1, 3, 0, False)]   # budget 6 split, seq 2 waits
    out = run_step(s)
    assert shape(out) == [(0, 1, 3, True), (1, 2, 3, True)]    # max_num_seqs=2: seq 2 still waits
    s.finish(s.find(0), SequenceStatus.FINISHED_STOPPED)
    out = run_step(s)
    assert shape(out) == [(1, 1, 5, True), (2, 2, 0, True)]
    assert out.finished_seq_ids == [0]


def test_preemption_by_recompute_newest_first():
    # 4 fp16 blocks, 'auto'-style pool: two sequences of 7 tokens (2 blocks each) fill it
    s = make(nfp=4, nrec=0, quantized=False, budget=16)
    a, b = seq(0, 7), seq(1, 7)
    s.add(a)
    s.add(b)
    run_step(s)                                          # both prefilled: 8 tokens each now
    assert s.bm.fp16.num_free == 0
    out = run_step(s)                                    # position 7: still in block 1
    assert shape(out) == [(0, 1, 7, True), (1, 1, 7, True)]
    out = run_step(s)                                    # position 8 needs a third block: b goes
    assert shape(out) == [(0, 1, 8, True)]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b] and s.bm.block_table(1) == []
    assert s.bm.block_table(0) == [0, 1, 2]
    s.finish(a, SequenceStatus.FINISHED_LENGTH)
    assert s.bm.fp16.num_free == 4
    out = run_step(s)                                    # recompute prompt + both outputs
    assert shape(out) == [(1, 9, 0, True)]
    assert out.seqs[0].token_ids == list(range(100, 107)) + [7, 7]
    assert b.output_token_ids == [7, 7, 7]


def test_sequence_preempts_itself_when_alone_and_stuck():
    s = make(nfp=2, nrec=0, quantized=False, budget=16)
    a = seq(0, 8)
    s.add(a)
    run_step(s)
    out = run_step(s)                                    # needs a third block: nothing to evict
    assert out.is_empty and a.status == SequenceStatus.WAITING
    assert s.bm.fp16.num_free == 2


def test_abort_frees_blocks():
    s = make()
    a, b = seq(0, 9), seq(1, 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert s.bm.fp16.num_free == 16 and s.bm.records.num_free == 16
    assert not s.has_unfinished()


def test_engine_preempts_under_memory_pressure_and_frees_everything():
    """A pool too small for the batch: requests are preempted (recomputed) yet all finish,
    with exact lengths, and every block comes back."""
    from kvarn.engine import EngineConfig, LLMEngine, SamplingParams as SP

    # tiny dummy Llama, 'auto' cache: 4 * 128-token blocks in total
    e = LLMEngine(EngineConfig(model="dummy:tiny-llama", load_format="dummy", kv_cache_dtype="auto", device="cpu",
                               max_model_len=512, kv_cache_memory_bytes=4 * 2 * 2 * 2 * 128 * 64 * 4,
                               max_num_batched_tokens=512))
    try:
        assert e.num_total_blocks == 4
        for i in range(3):
            e.add_request(f"p{i}", list(range(10 + i, 110 + i)), SP(temperature=0, max_tokens=60, ignore_eos=True))
        done = {}
        while e.has_unfinished_requests():
            for o in e.step():
                if o.finished:
                    done[o.request_id] = o
        assert sorted(done) == ["p0", "p1", "p2"]
        assert all(len(o.token_ids) == 60 and o.finish_reason == "length" for o in done.values())
        assert e.scheduler.num_preemptions > 0
        assert sum(o.metrics["num_preemptions"] for o in done.values()) == e.scheduler.num_preemptions
        assert e.num_free_blocks == e.num_total_blocks
    finally:
        e.shutdown()
