"""LLMEngine: requests in, RequestOutputs out, one ``step()`` at a time.

    add_request ──▶ Scheduler.waiting ──schedule()──▶ SchedulerOutput ──Executor──▶ ranks
                                                                                     │ forward, flush,
    RequestOutput ◀── stop checks, detokenize ◀── postprocess ◀── sampled tokens ◀───┘ sample (rank 0)

Disaggregation hooks: ``add_request(..., export_kv=dtype)`` runs the prompt, samples
the first token and returns a KVPayload instead of decoding; ``add_request_from_payload``
validates a payload (nothing is allocated unless it passes), writes it into fresh blocks
and continues decoding from the payload's first token; ``take_output`` hands that first
token out at once (a caller streaming to a client need not wait for the next step).

Block accounting (``num_free_blocks`` / ``num_total_blocks``) adds the fp16 pool and the
record pool; ``kv_cache_usage`` weights them by their bytes.
"""
from __future__ import annotations

import itertools
import logging
import time

import numpy as np

from kvarn.engine.block_manager import BlockManager, NotEnoughBlocks
from kvarn.engine.config import EngineConfig
from kvarn.engine.executor import make_executor
from kvarn.engine.outputs import IncrementalDetokenizer, RequestOutput
from kvarn.engine.sampling_params import SamplingParams
from kvarn.engine.scheduler import Scheduler
from kvarn.engine.sequence import Sequence, SequenceStatus
from kvarn.format import KV_CACHE_DTYPES, KVarNConfig, is_kvarn
from kvarn.transfer import PAYLOAD_VERSION, KVPayload, PayloadError

logger = logging.getLogger(__name__)


class _Request:
    """Engine-side state of one request: its sequence, text, and what was already emitted."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)
        self.stop_len = max((len(s) for s in seq.params.stop_strings), default=0)
        self.text = ""                 # final visible text (stop string cut)
        self.emitted_tokens = 0
        self.emitted_chars = 0
        self.emitted_logprobs = 0
        self.emitted_top_logprobs = 0


def load_tokenizer(config: EngineConfig):
    from transformers import AutoTokenizer

    from kvarn.models.resolve import resolve

    src = config.tokenizer
    if src is None:
        model = config.model
        if not isinstance(model, str) or model.startswith("dummy:") or model.endswith(".json"):
            return None, None
        src = model
    try:
        folder = resolve(src)
    except Exception:
        if config.tokenizer is not None:
            raise
        return None, None
    tok = AutoTokenizer.from_pretrained(folder)
    return tok, folder


def _generation_eos_ids(folder) -> list[int]:
    if folder is None:
        return []
    try:
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except Exception:
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        if config is None:
            config = EngineConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either an EngineConfig or keyword arguments, not both")
        self.config = config
        self.tokenizer, folder = load_tokenizer(config)
        self.eos_token_ids = set(_generation_eos_ids(folder))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.executor = make_executor(config)
        info = self.executor.info
        self.info = info
        s = info["sizing"]
        self.sizing = s
        self.max_model_len = info["max_model_len"]
        self.model_fingerprint: str = info["model_fingerprint"]
        self.block_size = s["block_size"]
        self.quantized = is_kvarn(config.kv_cache_dtype)
        self.block_manager = BlockManager(s["num_fp16_blocks"], s["num_record_blocks"], self.block_size,
                                          self.quantized)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.vocab_size = None
        try:
            from kvarn.models.loader import load_hf_config
            self.vocab_size = load_hf_config(config.model).vocab_size
        except Exception:
            pass
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._pending: list[RequestOutput] = []       # outputs produced outside step()
        self._seq_ids = itertools.count()
        self._closed = False

    # --- capacity ------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds as whole max_model_len sequences (kvarn/cache/base.py)."""
        return self.sizing["capacity_tokens"]

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_total_blocks

    @property
    def kv_cache_usage(self) -> float:
        bm, s = self.block_manager, self.sizing
        total = bm.fp16.num_blocks * s["fp16_block_bytes"] + bm.records.num_blocks * s["record_block_bytes"]
        used = bm.fp16.num_allocated * s["fp16_block_bytes"] + bm.records.num_allocated * s["record_block_bytes"]
        return used / total if total else 0.0

    def can_admit(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        """Could a request of this size get all its blocks now (after what is queued)?"""
        n = num_prompt_tokens + max_tokens
        if n > self.max_model_len:
            return False
        fp, rec = self.block_manager.demand_alone(n, self.config.max_num_batched_tokens)
        q_fp = q_rec = 0
        for seq in self.scheduler.waiting:
            if seq.seq_id not in self.block_manager.tables:
                f, r = self.block_manager.demand_alone(seq.num_tokens, self.config.max_num_batched_tokens)
                q_fp, q_rec = q_fp + f, q_rec + r
        bm = self.block_manager
        return fp + q_fp <= bm.fp16.num_free and rec + q_rec <= bm.records.num_free

    # --- requests ------------------------------------------------------------------
    def _check_new(self, request_id, prompt_token_ids, params) -> int:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise ValueError("prompt_token_ids must be a non-empty list of token ids")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt_token_ids):
            raise ValueError("prompt_token_ids must hold integers")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids must be in [0, {self.vocab_size})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens leaves no room to generate under "
                             f"max_model_len={self.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        fp, rec = self.block_manager.demand_alone(n + max_tokens, self.config.max_num_batched_tokens)
        bm = self.block_manager
        if fp > bm.fp16.num_blocks or rec > bm.records.num_blocks:
            raise ValueError(f"a request of {n + max_tokens} tokens can never fit this KV cache "
                             f"({bm.fp16.num_blocks} fp16 + {bm.records.num_blocks} record blocks)")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    *, export_kv: str | None = None, arrival_time: float | None = None) -> None:
        params = params if params is not None else SamplingParams()
        if export_kv is not None:
            if export_kv not in KV_CACHE_DTYPES:
                raise ValueError(f"export_kv must be None or one of {', '.join(KV_CACHE_DTYPES)}, got {export_kv!r}")
            if self.quantized and export_kv != self.config.kv_cache_dtype:
                raise ValueError(f"a {self.config.kv_cache_dtype} engine exports only {self.config.kv_cache_dtype} "
                                 f"payloads (its cache is already quantized), not {export_kv!r}; prefill with an "
                                 f"'auto' engine to export any format")
        self._check_new(request_id, prompt_token_ids, params)
        seq = Sequence(next(self._seq_ids), request_id, [int(t) for t in prompt_token_ids], params,
                       export_kv=export_kv, arrival_time=arrival_time)
        req = _Request(seq, self.tokenizer)
        self._requests[request_id] = req
        self._by_seq[seq.seq_id] = req
        self.scheduler.add(seq)

    def payload_expectations(self) -> dict:
        i = self.info
        return {"kv_cache_dtype": self.config.kv_cache_dtype, "model_fingerprint": self.model_fingerprint,
                "num_layers": i["num_layers"], "num_kv_heads": i["num_kv_heads"], "head_dim": i["head_dim"],
                "group_size": self.block_size, "max_model_len": self.max_model_len,
                **({"vocab_size": self.vocab_size} if self.vocab_size else {})}

    def add_request_from_payload(self, request_id: str, payload: KVPayload, params: SamplingParams | None = None,
                                 *, arrival_time: float | None = None) -> None:
        params = params if params is not None else SamplingParams()
        if not isinstance(payload, KVPayload):
            raise PayloadError(f"expected a KVPayload, got {type(payload).__name__}")
        payload.validate(self.payload_expectations())
        if payload.header["head_range"] != [0, payload.header["num_kv_heads"]]:
            raise PayloadError("a head slice cannot be imported; pass the whole payload")
        prompt = list(payload.prompt_token_ids)
        self._check_new(request_id, prompt, params)
        n = len(prompt)
        seq = Sequence(next(self._seq_ids), request_id, prompt, params, arrival_time=arrival_time)
        seq.imported = True
        req = _Request(seq, self.tokenizer)
        finish = self._append_token(req, payload.first_token_id, payload.header.get("first_token_logprob"),
                                    payload.header.get("first_token_top_logprobs"))
        seq.first_token_time = time.time()
        if finish is None:
            table = self.block_manager.allocate_imported(seq.seq_id, n)    # NotEnoughBlocks: nothing taken
            try:
                self.executor.import_kv(table.blocks, n, payload)
            except BaseException:
                self.block_manager.free(seq.seq_id)
                raise
            seq.num_computed_tokens = n
        self._requests[request_id] = req
        self._by_seq[seq.seq_id] = req
        if finish is None:
            self.scheduler.add(seq)
        else:
            seq.status = finish
            seq.finished_time = time.time()
            self._pending.append(self._output(req))
            self._forget(req)

    def abort_request(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        self.scheduler.finish(req.seq, SequenceStatus.FINISHED_ABORTED)
        req.seq.finished_time = time.time()
        self._pending.append(self._output(req))
        self._forget(req)

    def take_output(self, request_id: str) -> RequestOutput | None:
        """What ``request_id`` produced since its last output, now, outside ``step()``.

        E.g. the first token of a request just added from a payload. What this returns is
        not in a later step's outputs; None when there is nothing new.
        """
        for i, o in enumerate(self._pending):
            if o.request_id == request_id:
                return self._pending.pop(i)
        req = self._requests.get(request_id)
        if req is None or req.emitted_tokens == req.seq.num_output_tokens:
            return None
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # --- step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return outputs
        tokens, logprobs = self.executor.execute_model(out)
        self.scheduler.postprocess(out)
        now = time.time()
        sampling = [s for s in out.seqs if s.sample]
        for s, tok, lp in zip(sampling, tokens, logprobs):
            req = self._by_seq[s.seq_id]
            seq = req.seq
            if seq.num_output_tokens == 0:
                seq.first_token_time = now
            lp, top = lp if isinstance(lp, tuple) else (lp, None)
            if seq.export_kv is not None:
                self._append_token(req, tok, lp, top)
                seq.payload = self._build_payload(seq, tok, lp, top)
                self._finish(req, SequenceStatus.FINISHED_PREFILL)
            else:
                finish = self._append_token(req, tok, lp, top)
                if finish is not None:
                    self._finish(req, finish)
            outputs.append(self._output(req))
        return outputs

    def _finish(self, req: _Request, status: SequenceStatus) -> None:
        self.scheduler.finish(req.seq, status)
        req.seq.finished_time = time.time()
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        self._requests.pop(req.seq.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)

    def _append_token(self, req: _Request, tok: int, lp, top=None) -> SequenceStatus | None:
        """Add a sampled token; returns the finish status it causes, if any."""
        seq, p = req.seq, req.seq.params
        if p.logprobs:
            top = [(int(t), float(v)) for t, v in (top or [])][:p.logprobs]
        seq.append_token(tok, lp if p.logprobs is not None else None, top if p.logprobs else None)
        req.detok.add(tok)
        text = req.detok.text
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            req.text = text
            return SequenceStatus.FINISHED_STOPPED
        if req.stop_len:
            start = max(0, len(req.text) - req.stop_len)
            hits = [i for i in (text.find(s, start) for s in p.stop_strings) if i >= 0]
            if hits:
                req.text = text[:min(hits)]
                return SequenceStatus.FINISHED_STOPPED
        req.text = text
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.is_finished
        visible = req.text if finished or not req.stop_len else req.text[:max(0, len(req.text) - req.stop_len + 1)]
        visible_len = max(len(visible), req.emitted_chars)
        new_text = req.text[req.emitted_chars:visible_len]
        new_ids = seq.output_token_ids[req.emitted_tokens:]
        lps = tops = None
        if seq.params.logprobs is not None:
            lps = seq.output_logprobs[req.emitted_logprobs:]
            req.emitted_logprobs = len(seq.output_logprobs)
        if seq.params.logprobs:
            tops = seq.output_top_logprobs[req.emitted_top_logprobs:]
            req.emitted_top_logprobs = len(seq.output_top_logprobs)
        req.emitted_tokens = seq.num_output_tokens
        req.emitted_chars = visible_len
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids), new_token_ids=new_ids,
            text=req.text[:visible_len], new_text=new_text, finished=finished,
            finish_reason=seq.status.value if finished else None, logprobs=lps,
            num_prompt_tokens=seq.num_prompt_tokens, payload=seq.payload,
            metrics={"arrival": seq.arrival_time, "arrival_time": seq.arrival_time,
                     "first_token_time": seq.first_token_time,
                     "finished_time": seq.finished_time, "num_preemptions": seq.num_preemptions,
                     "imported_kv": seq.imported},
            all_logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            top_logprobs=tops,
        )

    # --- export --------------------------------------------------------------------
    def _build_payload(self, seq: Sequence, first_token: int, first_lp, first_top=None) -> KVPayload:
        n = seq.num_prompt_tokens
        target = seq.export_kv
        # an 'auto' cache exporting a KVarN payload: each rank packs its heads on its device
        pack = target if target != "auto" and not self.quantized else None
        bufs = self.executor.export_kv(self.block_manager.block_table(seq.seq_id), n, pack)
        i = self.info
        quant = target != "auto"
        cfg = KVarNConfig.from_name(target, i["head_dim"]) if quant else None
        records = bufs.get("records")
        if records is None:
            records = np.zeros((i["num_kv_heads"], i["num_layers"], 0, 0), dtype=np.uint8)
        header = {
            "version": PAYLOAD_VERSION, "kv_dtype": target, "model_fingerprint": self.model_fingerprint,
            "num_layers": i["num_layers"], "num_kv_heads": i["num_kv_heads"], "head_dim": i["head_dim"],
            "group_size": cfg.group_size if quant else self.block_size, "num_tokens": n,
            "prompt_token_ids": list(seq.prompt_token_ids), "first_token_id": int(first_token),
            "first_token_logprob": None if first_lp is None else float(first_lp),
            "frame": "rotated" if quant else "model", "dtype": "float16" if quant else i["dtype"],
            "record_bytes": cfg.record_bytes if quant else 0,
        }
        if first_top is not None:      # logprobs=N > 0: the first token's N most likely
            header["first_token_top_logprobs"] = [[int(t), float(v)] for t, v in first_top]
        return KVPayload.build(header, records, bufs["sink"], bufs["tail"])

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


__all__ = ["LLMEngine", "NotEnoughBlocks"]
