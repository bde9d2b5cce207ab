"""torchrun helpers: leaving the process group without gloo threads left for interpreter shutdown."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from robustkit import distributed
from robustkit.distributed import init_from_env

# -- leaving the group -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


def _train_a_step() -> None:
    net = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))  # imports torch._dynamo, after the group exists
    net(torch.randn(4, 3)).sum().backward()  # the wrapper is now garbage in a reference cycle


def _leaving_worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    gc.disable()  # as when no collection happens to run before the group is left
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    assert init_from_env("cpu", timeout_s=60)
    during = _threads()
    _train_a_step()
    distributed.finish()
    Path(folder, f"threads-{rank}.txt").write_text(f"{','.join(during)}\n{','.join(_threads())}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_leaving_the_group_after_ddp_stops_gloo_threads(tmp_path: Path) -> None:
    """A worker that leaves the group must not keep gloo's threads and connections until the
    interpreter shuts down (where torchrun saw it abort: `terminate called without an active exception`)."""
    mp.start_processes(_leaving_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        during, after = (tmp_path / f"threads-{rank}.txt").read_text().split("\n")
        assert "gloo" in during, during  # the check can see gloo's threads
        assert "gloo" not in after, f"rank {rank} still runs {after} after leaving the group"
