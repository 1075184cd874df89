"""How one request samples and when it stops (vLLM's SamplingParams, the subset we run)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0                # (0, 1]: nucleus
    top_k: int = -1                   # -1 or 0: off; else keep the k most likely
    seed: int | None = None           # per-request generator: same seed, same tokens
    max_tokens: int | None = 16       # None: up to max_model_len
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None       # not None: the sampled tokens' logprobs; N > 0: also the N most likely
    skip_special_tokens: bool = True
    _stop_list: list[str] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not self.temperature >= 0.0:           # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer (-1 or 0 disables it), got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or >= 1, got {self.top_k}")
        if self.top_k == 0:
            self.top_k = -1
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
                raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if self.stop is None:
            stops = []
        elif isinstance(self.stop, str):
            stops = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            stops = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stop_list = stops
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0:
                raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict:
        """What a worker needs to sample (small, msgpack/pickle friendly)."""
        return {"t": self.temperature, "p": self.top_p, "k": self.top_k, "s": self.seed,
                "lp": self.logprobs is not None, "top": self.logprobs or 0}
