"""LLM: the offline, vLLM-shaped API over one LLMEngine.

    llm = LLM("smollm2-135m", kv_cache_dtype="kvarn_k4v2_g128")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import itertools

from kvarn.engine.config import EngineConfig
from kvarn.engine.llm_engine import LLMEngine
from kvarn.engine.outputs import RequestOutput
from kvarn.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer: pass token ids (list[list[int]]) instead of strings")
        return tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or token ids (list[int] / list[list[int]])."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [list(prompts)]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a string, a list of strings, or a list of token id lists")
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self._encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(ids, texts, sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of them."""
        tok = self.engine.tokenizer
        if tok is None or tok.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        texts = [tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {})) for c in convs]
        ids = [self._encode(t, add_special_tokens=False) for t in texts]
        return self._run(ids, texts, sampling_params)

    def _run(self, ids, texts, sampling_params) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        engine = self.engine
        order = []
        for p_ids, p in zip(ids, params):
            rid = f"llm-{next(self._ids)}"
            engine.add_request(rid, p_ids, p)
            order.append(rid)
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(order):
                for out in engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            engine.step()
            raise
        results = [final[r] for r in order]
        for r, t in zip(results, texts):
            r.prompt = t
        return results

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
