"""Bounds-checked loads and stores for kernels run by the Triton interpreter (CPU).

On a GPU an out-of-bounds unmasked load is an illegal address (or silently reads a
neighbour); under ``TRITON_INTERPRET=1`` it reads whatever host memory sits there, so a
kernel can pass its CPU tests with a pointer bug. ``checked()`` makes the interpreter
check every load and store a kernel issues (masked-off lanes excepted) against the
memory of the tensors passed to that launch, and raise ``OutOfBounds`` naming the
first offending address. tests/conftest.py turns it on for every test when the
interpreter is in use (tests/ is on sys.path: pytest puts a rootdir conftest's folder there).

Covered: ``tl.load`` / ``tl.store`` through pointers (masked or not) and atomics.
Block pointers and tensor descriptors (not used by kvarn's kernels) are not checked.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np


class OutOfBounds(IndexError):
    pass


_state = threading.local()


def _ranges():
    return getattr(_state, "ranges", None)


def _check(ptrs, mask, elem_bytes: int, what: str):
    ranges = _ranges()
    if ranges is None:               # a launch outside checked() or not through GridExecutor
        return
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    addr = addr.ravel()
    if addr.size == 0:
        return
    ok = np.zeros(addr.shape, dtype=bool)
    for lo, hi in ranges:
        ok |= (addr >= lo) & (addr + np.uint64(elem_bytes) <= hi)
    if ok.all():
        return
    bad = int(addr[~ok][0])
    near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
    raise OutOfBounds(f"{what} of {int((~ok).sum())} lanes outside every tensor of the launch; first at "
                      f"0x{bad:x}, {bad - near[0]:+d} bytes from the start of the nearest tensor "
                      f"[0x{near[0]:x}, 0x{near[1]:x}) ({near[1] - near[0]} bytes)")


def _elem_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def checked():
    """Check the interpreter's memory accesses inside this block (no-op without it)."""
    from triton.runtime import interpreter as itp

    builder, grid = itp.InterpreterBuilder, itp.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_init = grid._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        ranges = []
        for a in list(args_hst) + list(kwargs_hst.values()):
            if hasattr(a, "untyped_storage"):
                st = a.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        _state.ranges = ranges
        return args_hst, kwargs_hst

    def load(self, ptrs, mask, other, *a, **k):
        _check(ptrs, mask, _elem_bytes(ptrs), "load")
        return saved["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        _check(ptrs, mask, _elem_bytes(ptrs), "store")
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def rmw(self, op, ptr, val, mask, *a, **k):
        _check(ptr, mask, _elem_bytes(ptr), "atomic")
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *a, **k)

    def cas(self, ptr, cmp, val, *a, **k):
        _check(ptr, None, _elem_bytes(ptr), "atomic cas")
        return saved["create_atomic_cas"](self, ptr, cmp, val, *a, **k)

    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_atomic_rmw, builder.create_atomic_cas = rmw, cas
    grid._init_args_hst = init_args
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        grid._init_args_hst = saved_init
        _state.ranges = None
