"""torchrun helpers: start the process group from the environment, shard, gather to rank 0.

No home-made transport: torch.distributed with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def local_device(device: str) -> str:
    """Under torchrun with CUDA, each process uses the GPU of its LOCAL_RANK."""
    if dist.is_initialized() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """All ranks' objects on rank 0 (in rank order); None on the other ranks."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself outside torchrun), so all ranks decide alike."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Wait for every rank, then leave the group: a rank that exits while its peers still hold
    connections to it can make gloo abort them (SIGABRT, seen in CI)."""
    barrier()
    shutdown()
