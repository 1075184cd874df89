"""Test environment: the Triton interpreter on machines without CUDA, offline HF, quiet Ray.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is
set here, before the tests import the kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _interpreter_memcheck():
    """Under the Triton interpreter, every kernel's loads and stores are bounds-checked
    against the tensors of its launch (tests/memcheck.py): a pointer bug fails on the CPU
    instead of reading host memory that happens to be there."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from memcheck import checked
    with checked():
        yield
