"""What a step returns per request, and the incremental detokenizer behind its text.

    RequestOutput   request_id, prompt_token_ids, token_ids (all so far), new_token_ids,
                    text (all so far), new_text, finished, finish_reason, logprobs (of
                    the new tokens), top_logprobs (logprobs=N > 0: per new token, the N
                    most likely [(token id, logprob)]), num_prompt_tokens, payload, metrics
                    .outputs[0].text / .token_ids    (vLLM's shape)

Detokenization is incremental (vLLM's scheme): decode ids[prefix:] and ids[prefix:read]
and emit the difference, holding back while the text ends in an incomplete UTF-8
sequence. The context starts with the last few prompt tokens so a first output token
that begins with a space detokenizes as it would in the full text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_CONTEXT_TOKENS = 5


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[float] | None
    num_prompt_tokens: int
    payload: Any = None
    metrics: dict = field(default_factory=dict)
    prompt: str | None = None
    all_logprobs: list[float] | None = field(default=None, repr=False)
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)

    @property
    def outputs(self) -> list[CompletionOutput]:
        return [CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.all_logprobs)]


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completes (possibly empty)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
