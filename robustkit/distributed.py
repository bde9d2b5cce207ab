"""torchrun helpers: start the process group from the environment, pick each worker's device,
shard, and hand a shard's results to rank 0 through a shared folder.

No home-made transport for tensors: torch.distributed with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from robustkit.errors import UsageError, UserError


class WorkerTimeoutError(UserError):
    """Rank 0 waited too long for another worker's results."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def rank_device(device: str = "auto") -> str:
    """The device this torchrun worker uses for ``device``: with several workers, ``auto`` and
    ``cuda`` mean the GPU of its LOCAL_RANK. Raises :class:`UsageError` alike on every worker when
    the workers on this machine outnumber its GPUs or one GPU (``cuda:N``) is named for several."""
    size = world()[1] if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return device
    try:
        parsed = torch.device(device) if device != "auto" else None
    except RuntimeError:
        raise UsageError(f"Unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if parsed is not None and parsed.type == "cuda" and parsed.index is not None:
        raise UsageError(f"--device {device} names one GPU for all {size} workers; use --device cuda (each "
                         f"worker takes the GPU of its LOCAL_RANK) or --device cpu.")
    if device not in ("auto", "cuda"):
        return device
    if not torch.cuda.is_available():
        if device == "cuda":
            raise UsageError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu.")
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = max(_env_int("LOCAL_WORLD_SIZE", 0), local_rank + 1)
    gpus = torch.cuda.device_count()
    if local_size > gpus:
        raise UsageError(f"torchrun started {local_size} workers on a machine with {gpus} GPU(s); start at most "
                         f"{gpus} per machine (--nproc-per-node {gpus}) or run them on the CPU (--device cpu).")
    return f"cuda:{local_rank}"


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call started it.

    The device is checked first (:func:`rank_device`), so a bad one fails on every worker before
    any collective could wait for a worker that has stopped.
    """
    if _env_int("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        return False
    chosen = rank_device(device)
    use_cuda = chosen.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(torch.device(chosen))
    # torch.distributed.nn.functional takes ``group=group.WORLD`` as default arguments, evaluated
    # when it is first imported (DistributedDataParallel imports it through torch._dynamo). Imported
    # after the group exists, those defaults hold the group for good: destroy_process_group() then
    # leaves gloo's threads and connections alive into interpreter shutdown, where a worker can
    # abort ("terminate called without an active exception"). Imported now, the defaults are None.
    importlib.import_module("torch.distributed.nn.functional")

    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def local_device(device: str) -> str:
    """Under torchrun, the device of this worker (:func:`rank_device`); ``device`` otherwise."""
    if dist.is_available() and dist.is_initialized():
        return rank_device(device)
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


def shutdown(collect: bool = True) -> None:
    """Leave the process group. The group's last reference going joins gloo's threads and closes its
    connections, here rather than while the interpreter shuts down (where a worker can abort); so
    first collect garbage such as a finished DistributedDataParallel wrapper (reference cycles),
    which holds the group (``collect=False``: a worker that is failing leaves at once)."""
    if dist.is_available() and dist.is_initialized():
        if collect:
            gc.collect()
        dist.destroy_process_group()


def finish() -> None:
    """Wait for every rank, then leave the group (:func:`shutdown`)."""
    barrier()
    shutdown()


# -- results through a shared folder (no collective: no worker waits in gloo for another's work) ------


def _launch() -> str:
    """What the workers of one torchrun launch share (so rank 0 skips notes of an earlier launch)."""
    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    return "/".join(os.environ.get(k, "") for k in keys)


def _note(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.json"


def post_shard(folder: str | Path, payload: dict[str, Any]) -> None:
    """A worker other than rank 0: note in ``folder`` that its share is there (``payload``: JSON)."""
    rank, _ = world()
    folder = Path(folder)
    tmp = folder / f".rank_{rank:05d}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"launch": _launch(), "payload": payload}))
    os.replace(tmp, _note(folder, rank))


def _folder_state(folder: Path) -> tuple[int, float]:
    """How many entries ``folder`` has and the newest modification time (what tells progress)."""
    count, newest = 0, 0.0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                try:
                    newest = max(newest, entry.stat().st_mtime)
                except OSError:  # replaced meanwhile
                    pass
    except OSError:
        pass
    return count, newest


def wait_for_shards(folder: str | Path, timeout_s: float, what: str) -> dict[int, dict[str, Any]]:
    """Rank 0: the payloads every other worker posted in ``folder`` (:func:`post_shard`), each note
    removed once read. Waits without a collective and gives up after ``timeout_s`` seconds in which
    no worker posted and nothing new appeared in ``folder`` (their batches)."""
    _, size = world()
    folder = Path(folder)
    got: dict[int, dict[str, Any]] = {}
    seen: tuple[int, float] | None = None
    deadline = time.monotonic() + timeout_s
    while True:
        for rank in range(1, size):
            if rank in got or not _note(folder, rank).is_file():
                continue
            try:
                note = json.loads(_note(folder, rank).read_text())
            except (OSError, ValueError):
                continue
            if note.get("launch") == _launch():
                got[rank] = note["payload"]
                _note(folder, rank).unlink(missing_ok=True)
        if len(got) == size - 1:
            return got
        state = _folder_state(folder)
        if state != seen:
            seen, deadline = state, time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            missing = ", ".join(str(r) for r in range(1, size) if r not in got)
            raise WorkerTimeoutError(
                f"Worker(s) {missing} posted no results for {what} in {folder} for {timeout_s:g} s; put --db on a "
                f"folder every worker can see (several machines: a shared file system) or raise --dist-timeout.")
        time.sleep(0.2)
