"""Shared helpers for the benchmarks: the real models and images of ../shared/data, timing."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cifar10(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(SHARED / "cifar10_test1000.npz") as f:
        x = torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2).float().div(255).contiguous()
        y = torch.from_numpy(f["y"][:n]).long()
    return x, y


def model(name: str) -> torch.nn.Module:
    from robustkit.models import load_model

    files = {"resnet20": "resnet20-12fca82f.th", "resnet4b": "abcrown_resnet4b.pth"}
    return load_model(name, SHARED / "models" / files[name]).eval()


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time over ``repeat`` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"
