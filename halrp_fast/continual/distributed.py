"""The process group of a ``torchrun`` launch and the few collectives the runners need.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` joins that group (NCCL when the device is CUDA, gloo otherwise) and pins each process to
its local GPU.  Without those variables everything runs as one process and the collectives return their input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """``rank`` of this process among ``world_size``; ``device`` this process computes on."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "cpu", backend: str | None = None) -> DistContext:
    """Join the process group described by ``torchrun``'s environment (a no-op for one process).

    ``device``: ``"cpu"`` or ``"cuda"`` (each process then uses ``cuda:LOCAL_RANK``); ``backend`` defaults to
    NCCL for CUDA and gloo for CPU.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(0, 1, device)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.startswith("cuda") else "gloo"))
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; tensors should be on the CPU)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, ctx: DistContext, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst`` (``None`` elsewhere)."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (no-op without an active context)."""
    if ctx is not None and ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
