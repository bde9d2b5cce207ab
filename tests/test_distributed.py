"""torchrun helpers: each worker's device (faked GPU counts, no GPU needed), leaving the process
group without gloo threads left for interpreter shutdown, and the shard notes rank 0 waits for."""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robustkit import distributed
from robustkit.cli import main
from robustkit.distributed import WorkerTimeoutError, init_from_env, post_shard, rank_device, wait_for_shards
from robustkit.errors import UsageError
from robustkit.evaluation.grid import EvalSpec, run_grid


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Worker ``rank`` of two on one machine with ``gpus`` fake GPUs; init_process_group must not run."""

    def fake(rank: int = 0, gpus: int = 0, world: int = 2) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    def no_group(*_a: object, **_k: object) -> None:
        raise AssertionError("init_process_group was reached")

    monkeypatch.setattr(dist, "init_process_group", no_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _d: None)
    return fake


def test_each_worker_takes_the_gpu_of_its_local_rank(torchrun_env) -> None:  # noqa: ANN001
    torchrun_env(rank=1, gpus=2)
    assert rank_device("auto") == rank_device("cuda") == "cuda:1"
    assert rank_device("cpu") == "cpu"
    torchrun_env(rank=1, gpus=0)
    assert rank_device("auto") == "auto"  # CPU (gloo)
    with pytest.raises(UsageError, match="CUDA is not available"):
        rank_device("cuda")
    torchrun_env(rank=0, gpus=1, world=1)
    assert rank_device("cuda:0") == "cuda:0"  # one process: any device


@pytest.mark.parametrize("rank", [0, 1])
def test_more_workers_than_gpus_fail_on_every_worker_before_any_collective(torchrun_env, rank: int) -> None:  # noqa: ANN001
    torchrun_env(rank=rank, gpus=1)  # rank 0 has a GPU, but rank 1 has none: both refuse
    with pytest.raises(UsageError) as e:
        init_from_env("auto")
    assert str(e.value) == ("torchrun started 2 workers on a machine with 1 GPU(s); start at most 1 per machine "
                            "(--nproc-per-node 1) or run them on the CPU (--device cpu).")


def test_one_named_gpu_for_several_workers_is_refused(torchrun_env) -> None:  # noqa: ANN001
    torchrun_env(rank=1, gpus=2)
    with pytest.raises(UsageError, match=r"^--device cuda:0 names one GPU for all 2 workers; use --device cuda"):
        init_from_env("cuda:0")


def test_eval_cli_refuses_a_bad_device_under_torchrun(torchrun_env, capsys: pytest.CaptureFixture,
                                                     tmp_path: Path) -> None:  # noqa: ANN001
    torchrun_env(rank=0, gpus=1)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--db", str(tmp_path / "b.db"), "--device", "cuda:0", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "names one GPU for all 2 workers" in err


def test_eval_passes_dist_timeout_to_the_process_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []

    class Stop(Exception):
        pass

    def fake(device: str = "auto", timeout_s: float = 600.0) -> bool:
        seen.append((device, timeout_s))
        raise Stop

    monkeypatch.setattr(distributed, "init_from_env", fake)
    with pytest.raises(Stop):
        run_grid(EvalSpec(dist_timeout=42, device="cpu"), db=tmp_path / "b.db")
    assert seen == [("cpu", 42)]
    with pytest.raises(UsageError, match="--dist-timeout must be a positive number of seconds, got 0"):
        EvalSpec(dist_timeout=0)


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


# -- shard notes -----------------------------------------------------------------------------------------


def test_rank_0_reads_the_notes_of_the_other_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    post_shard(tmp_path, {"seconds": {"clean": 1.5}})
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    assert wait_for_shards(tmp_path, 5, "cell") == {1: {"seconds": {"clean": 1.5}}}
    assert list(tmp_path.iterdir()) == []  # read once


def test_rank_0_gives_up_on_a_silent_worker_and_skips_old_notes(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "an-earlier-launch")
    post_shard(tmp_path, {"seconds": {}})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-launch")
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.raises(WorkerTimeoutError) as e:
        wait_for_shards(tmp_path, 0.5, "digits-cnn linf eps=0.1")
    assert str(e.value) == (f"Worker(s) 1 posted no results for digits-cnn linf eps=0.1 in {tmp_path} for 0.5 s; put "
                            "--db on a folder every worker can see (several machines: a shared file system) or "
                            "raise --dist-timeout.")
