"""Paged KV-cache kernels: Triton on CUDA, the torch reference everywhere.

    store_tiles, quantize_blocks_triton     fp16 tiles -> KVarN records     (store.py)
    paged_decode_attention                  one token per sequence, split-K (decode_attention.py;
                                            on CUDA its records for k4v2_g128 at D=64/128/256 by a
                                            Gluon kernel, decode_gluon.py, GPU only)
    paged_extend_attention                  varlen new tokens, causal       (extend_attention.py)

The cache layouts and the reference semantics every kernel meets live in
``kvarn.kernels.reference``. The Triton modules load lazily, on first use of one of
these names, so importing ``kvarn.kernels`` (or its reference) needs neither CUDA nor
Triton; on a machine without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set before the first kernel is defined). Never imports Ray.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "store_tiles": "kvarn.kernels.store",
    "quantize_blocks_triton": "kvarn.kernels.store",
    "paged_decode_attention": "kvarn.kernels.decode_attention",
    "paged_extend_attention": "kvarn.kernels.extend_attention",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvarn.kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
