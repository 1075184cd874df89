"""tests/memcheck.py: the interpreter's bounds check catches a planted out-of-bounds
load and store, and lets masked-off lanes and in-bounds views through."""
import os

import pytest
import torch
import triton
import triton.language as tl

from memcheck import checked

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the Triton interpreter (CPU runs)")


def raises_oob(what):
    """The interpreter re-raises a kernel's exception as InterpreterError(repr(e))."""
    return pytest.raises(Exception, match="OutOfBounds.'%s" % what)


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr, SHIFT: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if MASKED:
        x = tl.load(x_ptr + offs + SHIFT, mask=mask, other=0.0)
        tl.store(y_ptr + offs, x, mask=mask)
    else:
        x = tl.load(x_ptr + offs + SHIFT)
        tl.store(y_ptr + offs, x)


def test_in_bounds_and_masked_pass():
    x = torch.arange(40, dtype=torch.float32)
    y = torch.zeros(40)
    with checked():
        _copy[(1,)](x, y, 40, BLOCK=64, MASKED=True, SHIFT=0)       # lanes 40..63 masked off
    assert torch.equal(x, y)
    view = torch.arange(100, dtype=torch.float32)[30:70]             # a view: its storage is in range
    with checked():
        _copy[(1,)](view, y, 40, BLOCK=64, MASKED=True, SHIFT=0)
    assert torch.equal(view, y)


def test_unmasked_overrun_caught():
    x = torch.arange(40, dtype=torch.float32)
    y = torch.zeros(64)
    with checked(), raises_oob("load of 24 lanes"):
        _copy[(1,)](x, y, 40, BLOCK=64, MASKED=False, SHIFT=0)


def test_store_overrun_and_negative_offset_caught():
    x = torch.arange(64, dtype=torch.float32)
    y = torch.zeros(40)
    with checked(), raises_oob("store of 24 lanes"):
        _copy[(1,)](x, y, 40, BLOCK=64, MASKED=False, SHIFT=0)
    with checked(), raises_oob("load of 1 lanes"):
        _copy[(1,)](x, y, 40, BLOCK=64, MASKED=True, SHIFT=-1)    # x[-1]: one lane before the tensor


def test_fixture_is_on():
    """tests/conftest.py's autouse fixture: kernels in any test are checked."""
    x = torch.arange(40, dtype=torch.float32)
    with raises_oob("load"):
        _copy[(1,)](x, torch.zeros(64), 40, BLOCK=64, MASKED=False, SHIFT=0)
