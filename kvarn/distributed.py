"""Tensor-parallel group state for one model replica.

One process per TP rank; all ranks of a replica form one torch.distributed group
(NCCL on CUDA, gloo on CPU). The model layers call the collectives below; every one
of them is the identity when the group has one rank or was never initialized, so
the same model code runs unchanged without torch.distributed.

    tp_all_reduce(x)           x: any shape, summed over ranks (in place), returned
    tp_all_gather(x, dim)      x: [..., n, ...] per rank -> [..., tp_size * n, ...],
                               rank r's slice at [r * n : (r + 1) * n] along dim
    tp_broadcast_object(obj)   a picklable object from rank src to every rank

With NCCL, each process must have selected its GPU (``torch.cuda.set_device``)
before ``init_tp``. Never imports Ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_tp",
    "destroy_tp",
    "tp_is_initialized",
    "tp_rank",
    "tp_size",
    "tp_all_reduce",
    "tp_all_gather",
    "tp_broadcast_object",
]

_group: Any = None
_rank: int = 0
_size: int = 1
_owns_process_group = False


def init_tp(
    rank: int,
    world_size: int,
    backend: str | None = None,
    init_method: str | None = None,
) -> None:
    """Join the TP group as ``rank`` of ``world_size``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``;
    ``init_method`` is a torch.distributed URL (``tcp://host:port``, ``file:///path``),
    defaulting to ``env://`` (MASTER_ADDR / MASTER_PORT). A world of one needs no
    torch.distributed at all and initializes nothing.
    """
    global _group, _rank, _size, _owns_process_group
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if _group is not None:
        raise RuntimeError("the TP group is already initialized; call destroy_tp() first")
    _rank, _size = rank, world_size
    if world_size == 1:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
        )
        _owns_process_group = True
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"torch.distributed is already initialized as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, not {rank} of {world_size}"
        )
    _group = dist.group.WORLD


def destroy_tp() -> None:
    """Leave the TP group (and tear down the process group if ``init_tp`` created it)."""
    global _group, _rank, _size, _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _group, _rank, _size, _owns_process_group = None, 0, 1, False


def tp_is_initialized() -> bool:
    return _group is not None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP ranks, in place; returns ``x``."""
    if _group is None:
        return x
    dist.all_reduce(x, group=_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    if _group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x, group=_group)
    return torch.cat(parts, dim=dim)


def tp_broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable ``obj`` from rank ``src``; every rank returns rank ``src``'s object."""
    if _group is None:
        return obj
    box = [obj if _rank == src else None]
    dist.broadcast_object_list(box, src=src, group=_group)
    return box[0]
