"""The forward context: what the engine hands the attention layers for one forward pass.

The model's forward signature stays ``(input_ids, positions)``; everything that
describes the batch for attention (which tokens belong to which sequence, where
their K/V go in the paged cache) travels here instead:

    with set_forward_context(ForwardContext(backend, metadata)):
        hidden = model(input_ids, positions)      # each Attention layer calls
                                                  # backend.forward(layer_idx, q, k, v, metadata)

Without a context (``get_forward_context() is None``) each Attention layer runs
dense causal attention over the tokens it is given, as one sequence.
The context is thread-local.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["ForwardContext", "set_forward_context", "get_forward_context"]


@dataclass
class ForwardContext:
    attn_backend: Any
    attn_metadata: Any


_local = threading.local()


def get_forward_context() -> ForwardContext | None:
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext | None) -> Iterator[ForwardContext | None]:
    """Make ``ctx`` the current context for the enclosed block; restores the previous one."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous
