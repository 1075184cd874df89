"""Attention backends: the torch reference ops (CPU) and the Triton kernels (CUDA)."""
from kvarn.attention.base import AttentionBackend, AttentionMetadata


def backend_name(device, requested: str | None = None) -> str:
    """'triton' on CUDA, 'torch' elsewhere, unless asked (triton on CPU: TRITON_INTERPRET=1)."""
    import torch

    if requested is not None:
        if requested not in ("torch", "triton"):
            raise ValueError(f"attention_backend must be None, 'torch' or 'triton', got {requested!r}")
        return requested
    return "triton" if torch.device(device).type == "cuda" else "torch"


def make_backend(pool, device, requested: str | None = None) -> AttentionBackend:
    if backend_name(device, requested) == "triton":
        from kvarn.attention.triton_backend import TritonBackend
        return TritonBackend(pool)
    from kvarn.attention.torch_backend import TorchBackend
    return TorchBackend(pool)


__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]
