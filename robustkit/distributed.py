"""torchrun helpers: start the process group from the environment, shard, gather to rank 0.

No home-made transport: torch.distributed with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import gc
import importlib
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
    # torch.distributed.nn.functional takes ``group=group.WORLD`` as default arguments, evaluated
    # when it is first imported (DistributedDataParallel imports it through torch._dynamo). Imported
    # after the group exists, those defaults hold the group for good: destroy_process_group() then
    # leaves gloo's threads and connections alive into interpreter shutdown, where a worker can
    # abort ("terminate called without an active exception"). Imported now, the defaults are None.
    importlib.import_module("torch.distributed.nn.functional")
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


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. The group's last reference going joins gloo's threads and closes its
    connections, here rather than while the interpreter shuts down (where a worker can abort); so
    first collect garbage such as a finished DistributedDataParallel wrapper (reference cycles),
    which holds the group."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def finish() -> None:
    """Wait for every rank, then leave the group (:func:`shutdown`)."""
    barrier()
    shutdown()
