"""What a person sees while a run goes: the cost line before an eval, progress that moves per
attack step from the first batch, plain lines when the output goes to a file (a log, a batch job)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_host_syncs import SyncCounter, small_model

from robustkit import ThreatModel
from robustkit.attack import watch
from robustkit.attacks import PGD, AutoAttack, Square
from robustkit.cli import console
from robustkit.cli.budget import budget_of, cost_line

ROOT = Path(__file__).resolve().parents[1]
LINF = ThreatModel("linf", 8 / 255)


def test_the_cost_line_counts_points_attacks_and_budgets() -> None:
    line = cost_line(256, [("pgd", PGD(LINF, steps=10)), ("square", Square(LINF, n_queries=5000))])
    assert line.startswith("256 points × 2 attacks (pgd 10 steps, square 5000 queries) "
                           "≈ 2,560 forward+backward + 1.28M queries")
    aa = budget_of("autoattack", AutoAttack(LINF), num_classes=10)
    # apgd-ce 100 + apgd-t 100 x 9 targets + fab-t 100 x 9 targets; square 5000 queries
    assert (aa.grads, aa.queries, aa.calls) == (100 + 900 + 900, 5000, 1900 + 5000)
    assert cost_line(10, [("pgd", PGD(LINF, steps=5, restarts=2))], cells=3).startswith(
        "3 cells × 10 points × 1 attack (pgd 5 steps × 2 restarts) ≈ 300 forward+backward")


def test_watching_an_attack_adds_no_host_sync() -> None:
    model = small_model()
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    events: list[str] = []
    counts = []
    for listen in (False, True):
        with SyncCounter() as counter:
            if listen:
                with watch(lambda event, attack, n: events.append(event)):
                    PGD(ThreatModel("linf", 2 / 255), steps=8)(model, x, y)
            else:
                PGD(ThreatModel("linf", 2 / 255), steps=8)(model, x, y)
        counts.append(counter.count)
    assert counts[0] == counts[1]
    assert events[0] == "start" and events[-1] == "end" and events.count("call") >= 8


def test_the_clock_prints_every_tenth_and_after_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    clock = console._LineClock(interval=10)
    assert clock.due(0.0)
    assert not clock.due(0.05)
    assert clock.due(0.12)  # a new tenth
    assert not clock.due(0.15)
    now[0] = 11.0
    assert clock.due(0.16)  # 10 s without a line
    assert clock.due(0.0)  # a new run (fraction went back) starts the tenths over


def test_a_single_batch_moves_per_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """64 points in one batch: the display moves while PGD runs, not only when the batch ends."""
    from robustkit.evaluation.grid import EvalSpec, run_grid

    buffer = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buffer, width=200))
    spec = EvalSpec(n_examples=64, attack=["pgd"], attack_kwargs={"steps": 40}, eps=[0.3], device="cpu")
    with console.ProgressBars(enabled=True, cells=1, lines=True) as bars:
        bars.clock.interval = bars.redraw_s = 0.0  # a line at every step, however fast the machine
        run_grid(spec, db=tmp_path / "lb.db", progress=bars)
    text = buffer.getvalue()
    assert "64 points × 1 attack (pgd 40 steps)" in text.splitlines()[0]
    steps = [int(m) for m in re.findall(r"pgd step (\d+)/40", text)]
    assert any(0 < s < 40 for s in steps), text
    partial = [float(m) for m in re.findall(r": (\d+)/64 points", text)]
    assert any(0 < p < 64 for p in partial), text  # the points move within the one batch
    assert re.search(r"64/64 points \(100%\), robust \d+\.\d% of 64", text), text


def _run_redirected(tmp_path: Path, *args: str) -> str:
    """The CLI with stdout and stderr going to one file, as in a batch job (``> log 2>&1``)."""
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("FORCE_COLOR", None)
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "robustkit", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def test_eval_to_a_file_prints_progress_lines_before_the_table(tmp_path: Path) -> None:
    text = _run_redirected(tmp_path, "eval", "--db", str(tmp_path / "lb.db"), "--n-examples", "48", "--attack",
                           "pgd", "--attack-kwargs", "steps=20", "--batch-size", "16")
    table = text.index("robust acc")
    lines = [m.start() for m in re.finditer(r"eval digits-cnn linf eps=0\.1: \d+/48 points \(\d+%\)", text)]
    assert len(lines) >= 3 and max(lines) < table, text
    assert text.index("48 points × 1 attack (pgd 20 steps)") < lines[0]
    assert "\x1b[" not in text  # no terminal codes in a log
    assert re.search(r"elapsed, ~[^,;]+ left", text), text


def test_training_to_a_file_prints_progress_lines_before_the_table(tmp_path: Path) -> None:
    text = _run_redirected(tmp_path, "train", "standard", "--epochs", "2", "--n-examples", "256", "--batch-size",
                           "32", "--val-size", "32", "--out", str(tmp_path / "run"))
    table = text.index("train acc")
    steps = [m.start() for m in re.finditer(r"epoch [12]/2: step \d+/8 \(\d+%\)", text)]
    assert len(steps) >= 4 and max(steps) < table, text
    assert re.search(r"epoch 1/2 done: .*elapsed", text), text
    assert "\x1b[" not in text


def test_torchrun_shows_one_display_with_every_ranks_figures(tmp_path: Path) -> None:
    """Two workers writing to one log: one cost line, progress lines from rank 0 only, and the last
    one has the global figures (all 96 points; the robust accuracy of the table)."""
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "robustkit",
           "eval", "--db", str(tmp_path / "lb.db"), "--n-examples", "96", "--batch-size", "16", "--attack", "pgd",
           "--attack-kwargs", "steps=20", "--device", "cpu"]
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count("96 points × 1 attack (pgd 20 steps)") == 1 and "on 2 workers" in text, text
    lines = re.findall(r"eval digits-cnn linf eps=0\.1: (\d+)/96 points \(\d+%\)( \(2 workers\))?, (.*)", text)
    assert lines and all(workers for _, workers, _ in lines), text  # rank 0's lines only
    done, _, rest = lines[-1]
    robust = re.search(r"robust (\d+\.\d)% of (\d+)", rest)
    table = re.search(r"│ pgd\s+│\s+[\d.]+% │\s+([\d.]+)% │", text)
    assert done == "96" and robust and robust.group(2) == "96" and table, text
    assert abs(float(robust.group(1)) - float(table.group(1))) < 0.06, text
