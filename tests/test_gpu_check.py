"""benchmarks/gpu_check.py, the one-command GPU check, runs on the CPU with tiny sizes so it never
rots: every check passes (no exception, attacks inside the ball, fp32 success, fp16/bf16 within
the tolerance, one training epoch, the peers' numbers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import pyautoattack_checkpoint, shared_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_quick_cpu_run_passes_every_check(tmp_path: Path, one_thread: None) -> None:
    shared_file("cifar10_train1000.npz")
    pyautoattack_checkpoint()
    pytest.importorskip("torchattacks")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check
    spec.loader.exec_module(gpu_check)
    data, table = tmp_path / "gpu", tmp_path / "gpu.md"
    assert gpu_check.main(["--prepare", str(data)]) == 0
    code = gpu_check.main(["--data", str(data), "--device", "cpu", "--quick", "--output", str(table)])
    text = table.read_text()
    assert "**FAIL**" not in text and code == 0, text
    for part in ("| attacks | pgd linf", "| attacks | square l2", "| precision | pgd-10 fp16", "| training | dat",
                 "| timing | resnet18", "AutoAttack standard"):
        assert part in text, part
    assert "0 failed of" in text
