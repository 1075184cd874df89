"""Logits -> next tokens, one row per sequence that samples this step.

    logits fp32 [N, vocab] --temperature--> --top-k mask--> --top-p mask--> softmax
           --multinomial(generator of that request)--> token;  greedy rows: argmax

Each request draws from its own torch.Generator (seeded from its ``seed``, else from
the engine seed and its sequence id), so a request's tokens do not depend on what
else is in the batch. The logprob reported is that of the sampled token under the
model's raw distribution (log_softmax of the unprocessed logits), as vLLM reports it.
"""
from __future__ import annotations

import torch


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def processed_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    x = logits / temperature
    x = apply_top_k(x, top_k)
    return apply_top_p(x, top_p)


class Sampler:
    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[int, torch.Generator] = {}

    def generator(self, seq_id: int, seed: int | None, device) -> torch.Generator:
        g = self._generators.get(seq_id)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(seed if seed is not None else (self.seed * 1_000_003 + seq_id) % (2**63))
            self._generators[seq_id] = g
        return g

    def forget(self, seq_ids) -> None:
        for s in seq_ids:
            self._generators.pop(s, None)

    def __call__(self, logits: torch.Tensor, seq_ids: list[int], params: list[dict]):
        """-> (token ids list[int], logprobs list).

        A logprobs entry is None (not asked for), the sampled token's logprob (a float),
        or, for rows whose params ask for ``top`` > 0 alternatives, a tuple
        ``(logprob, [(token id, logprob), ...])`` of the sampled token and the ``top``
        most likely tokens, in descending order.
        """
        logits = logits.float()
        tokens = torch.argmax(logits, dim=-1)
        for i, (sid, p) in enumerate(zip(seq_ids, params)):
            if p["t"] == 0.0:
                continue
            x = processed_logits(logits[i], p["t"], p["k"], p["p"])
            probs = torch.softmax(x, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=self.generator(sid, p["s"], logits.device))[0]
        want_lp = [p["lp"] for p in params]
        logprobs: list[float | None] = [None] * len(params)
        if any(want_lp):
            lsm = torch.log_softmax(logits, dim=-1)
            lp = lsm.gather(1, tokens[:, None])[:, 0].tolist()
            logprobs = [v if w else None for v, w in zip(lp, want_lp)]
            tops = [p.get("top", 0) if w else 0 for p, w in zip(params, want_lp)]
            k = min(max(tops), lsm.shape[-1])
            if k > 0:
                vals, idx = torch.topk(lsm, k, dim=-1)
                vals, idx = vals.tolist(), idx.tolist()
                for i, n in enumerate(tops):
                    if n:
                        logprobs[i] = (logprobs[i], list(zip(idx[i][:n], vals[i][:n])))
        return tokens.tolist(), logprobs
