"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder next to the checkout; CI has it)")
    return path


def cifar10_test(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` CIFAR-10 test images as float NCHW in [0, 1] and their labels."""
    with np.load(shared_file("cifar10_test1000.npz")) as f:
        x = torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(f["y"][:n]).long()
    return x.contiguous(), y


def mnist_test(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` MNIST test images as float N×1×28×28 in [0, 1] and their labels."""
    with np.load(shared_file("mnist.npz")) as f:
        x = torch.from_numpy(f["x_test"][:n]).float().div(255)[:, None]
        y = torch.from_numpy(f["y_test"][:n]).long()
    return x.contiguous(), y


def pyautoattack_checkpoint() -> Path:
    """pyautoattack's examples/model_test.pt (a real CIFAR-10 ResNet-18), or skip."""
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or spec.origin is None:
        pytest.skip("needs pyautoattack (pip install pyautoattack)")
    path = Path(spec.origin).parent / "examples" / "model_test.pt"
    if not path.exists():
        pytest.skip(f"pyautoattack has no {path}")
    return path


_passed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _passed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run in which no test passed (none collected, all skipped) is a failure, not a success."""
    if exitstatus == 0 and not _passed:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared,
    busy 2-core machine two threads per process run about 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
