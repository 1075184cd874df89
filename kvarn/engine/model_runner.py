"""One rank's forward pass: SchedulerOutput -> metadata tensors -> model -> flush -> tokens.

Metadata for a step with sequences a (decode), b (a 3-token chunk), G = 4:

    input_ids      [ta | tb0 tb1 tb2]              T = 4 rows, sequences back to back
    positions      [ 9 |  4   5   6 ]              start_pos .. start_pos + len - 1
    cu_seqlens_q   [0, 1, 4]
    context_lens   [10, 7]                          start_pos + len
    block_tables   [[a0 a1 a2], [b0 b1 0]]          int32 [B, max_blocks], padded with 0
    slot_mapping   [a2*4+1 | b1*4+0, b1*4+1, b1*4+2]   table[p // G] * G + p % G

After the forward: the store launch quantizes the blocks the step filled
(``flush_src`` -> ``flush_dst``, every layer at once), then rank 0 samples the rows
of sequences whose chunk reached their last token.

CUDA graphs (CUDA, TP=1, not enforce_eager): pure-decode steps of up to
``max_cudagraph_batch_size`` sequences replay a graph captured per batch-size bucket
(1, 2, 4, 8, 16, 24, 32, ... ); rows past the real batch are padding that write to and
read from the pool's scratch block (id = num_fp16_blocks, never handed out).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from kvarn.attention.base import AttentionMetadata
from kvarn.engine.sampler import Sampler
from kvarn.engine.scheduler import SchedulerOutput
from kvarn.models.context import ForwardContext, set_forward_context

logger = logging.getLogger(__name__)


def cudagraph_buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, max_bs + 1, 8))
    return sorted({min(s, max_bs) for s in sizes} | {max_bs})


class ModelRunner:
    def __init__(self, model, pool, backend, *, max_model_len: int, sampler: Sampler | None,
                 use_cuda_graphs: bool = False, max_cudagraph_batch_size: int = 256,
                 cudagraph_capture_sizes: tuple | None = None):
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = pool.device
        self.block_size = pool.block_size
        self.max_blocks = math.ceil(max_model_len / self.block_size)
        self.sampler = sampler
        self.scratch_block = pool.sizing.num_fp16_blocks
        self.graphs: dict[int, tuple] = {}
        if use_cuda_graphs:
            try:
                self.capture_cuda_graphs(max_cudagraph_batch_size, cudagraph_capture_sizes)
            except Exception as e:  # a model or kernel that cannot be captured: run eagerly
                logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self.graphs = {}

    # --- metadata ------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput):
        g = self.block_size
        q_lens = [len(s.token_ids) for s in out.seqs]
        ctx = [s.start_pos + n for s, n in zip(out.seqs, q_lens)]
        input_ids = np.fromiter((t for s in out.seqs for t in s.token_ids), dtype=np.int64, count=sum(q_lens))
        positions = np.concatenate([np.arange(s.start_pos, c, dtype=np.int64) for s, c in zip(out.seqs, ctx)])
        width = max(len(s.block_table) for s in out.seqs)
        tables = np.zeros((len(out.seqs), width), dtype=np.int32)
        for i, s in enumerate(out.seqs):
            tables[i, :len(s.block_table)] = s.block_table
        row = np.repeat(np.arange(len(out.seqs)), q_lens)
        slots = tables[row, positions // g].astype(np.int64) * g + positions % g
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.from_numpy(cu).to(dev),
            query_lens=q_lens,
            context_lens_host=ctx,
            is_decode=all(n == 1 for n in q_lens),
            dense_prefill=all(s.start_pos == 0 for s in out.seqs),
        )
        logits_rows = [int(cu[i + 1]) - 1 for i, s in enumerate(out.seqs) if s.sample]
        return torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), md, logits_rows

    # --- step ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        """-> (token ids, logprobs) for the sampling sequences in order (rank 0), else None."""
        if self.sampler is not None and out.finished_seq_ids:
            self.sampler.forget(out.finished_seq_ids)
        if out.is_empty:
            return [], []
        input_ids, positions, md, rows = self.prepare(out)
        bs = len(out.seqs)
        if md.is_decode and self.graphs and bs <= max(self.graphs):
            hidden = self._replay(input_ids, positions, md, bs)
        else:
            with set_forward_context(ForwardContext(self.backend, md)):
                hidden = self.model(input_ids, positions)
        self.pool.flush(out.flush_src, out.flush_dst)
        if not rows:
            return [], []
        logits = self.model.compute_logits(hidden[rows])
        if self.sampler is None:
            return None
        sampling = [s for s in out.seqs if s.sample]
        return self.sampler(logits, [s.seq_id for s in sampling], [s.params for s in sampling])

    # --- CUDA graphs ---------------------------------------------------------------
    def capture_cuda_graphs(self, max_bs: int, sizes: tuple | None = None) -> None:
        dev = self.device
        self._buckets = sorted(sizes) if sizes else cudagraph_buckets(max_bs)
        n = self._buckets[-1]
        g = self.block_size
        self._s_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self._s_slots = torch.full((n,), self.scratch_block * g, dtype=torch.long, device=dev)
        self._s_tables = torch.full((n, self.max_blocks), self.scratch_block, dtype=torch.int32, device=dev)
        self._s_ctx = torch.ones(n, dtype=torch.int32, device=dev)
        self._s_cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        mempool = torch.cuda.graph_pool_handle()
        for bs in reversed(self._buckets):
            md = AttentionMetadata(self._s_slots[:bs], self._s_tables[:bs], self._s_ctx[:bs], self._s_cu[:bs + 1],
                                   [1] * bs, [1] * bs, is_decode=True, dense_prefill=False)
            with set_forward_context(ForwardContext(self.backend, md)):
                self.model(self._s_ids[:bs], self._s_pos[:bs])            # warm up (kernel compiles)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    hidden = self.model(self._s_ids[:bs], self._s_pos[:bs])
            self.graphs[bs] = (graph, hidden)
        torch.cuda.synchronize()

    def _replay(self, input_ids, positions, md: AttentionMetadata, bs: int):
        bucket = next(b for b in self._buckets if b >= bs)
        g = self.block_size
        self._s_ids[:bs] = input_ids
        self._s_pos[:bs] = positions
        self._s_slots[:bs] = md.slot_mapping
        self._s_slots[bs:bucket] = self.scratch_block * g
        w = md.block_tables.shape[1]
        self._s_tables[:bs, :w] = md.block_tables
        self._s_tables[bs:bucket] = self.scratch_block
        self._s_ctx[:bs] = md.context_lens
        self._s_ctx[bs:bucket] = 1
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:bs]
