"""The README's Python examples run as printed (each block in a fresh namespace), and so does
ARCHITECTURE.md's "add a training method" (in its own process: it registers a method)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index: int, one_thread: None) -> None:
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_architecture_example_adds_a_training_method_the_loop_runs() -> None:
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "ARCHITECTURE.md").read_text(), flags=re.S)
    script = textwrap.dedent(block) + textwrap.dedent("""
        import torch
        from robustkit.training.loop import TrainConfig, train
        torch.set_num_threads(1)
        result = train(TrainConfig(method="pgd-at-ls", epochs=1, n_examples=128, val_size=64, batch_size=64))
        print(result.history[-1]["loss"] > 0, type(result.model.net).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "True"
