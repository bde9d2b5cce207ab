"""Tables at 80 columns (a default terminal): names never cut, every line within the width,
columns left out in the stated order; eps shown one way everywhere."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from robustkit.catalog import catalog
from robustkit.cli import listing, report
from robustkit.cli.main import main
from robustkit.results.leaderboard import Leaderboard, ResultRow
from robustkit.units import eps_label, eps_str

ROOT = Path(__file__).resolve().parents[1]


def _narrow(monkeypatch: pytest.MonkeyPatch, module: object, width: int = 80) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(module, "out", Console(file=buffer, width=width))
    return buffer


def _check(text: str, names: list[str], width: int = 80) -> None:
    lines = text.splitlines()
    assert lines and max(cell_len(line) for line in lines) <= width, text
    assert "…" not in text, text
    cells = {part.strip() for line in lines for part in line.split("│")}
    missing = [n for n in names if n not in cells]
    assert not missing, f"names cut or wrapped: {missing}\n{text}"


@pytest.mark.parametrize("what", ["models", "attacks", "defenses", "datasets"])
def test_list_fits_80_columns_without_cutting_a_name(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    buffer = _narrow(monkeypatch, listing)
    with pytest.raises(SystemExit) as exc:
        main(["list", what])
    assert exc.value.code == 0
    rows = catalog(what, source="robustkit", dataset=None, threat_model=None)
    _check(buffer.getvalue(), [name for name, _, _ in rows])
    if any(aliases for _, aliases, _ in rows):  # moved into the description, not lost
        assert "(aliases:" in buffer.getvalue()


def test_list_models_with_columns_80_in_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "robustkit", "list", "models"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _check(proc.stdout, [name for name, _, _ in catalog("models", source="robustkit", dataset=None,
                                                        threat_model=None)])


def _sweep(db: Path) -> None:
    board = Leaderboard(db)
    for model, defense in (("robust-resnet-down-inverted-dw-small", ""), ("digits-cnn", "aaa")):
        for attack in ("pgd", "worst-case"):
            for eps in (2 / 255, 4 / 255, 8 / 255, 16 / 255):
                board.add(ResultRow(model=model, defense=defense, dataset="cifar10", n_examples=100, norm="linf",
                                    eps=eps, attack=attack, attack_config={}, seed=0, clean_acc=0.9,
                                    robust_acc=0.9 - 0.1 * float(np.sqrt(eps * 255 / 16)), seconds=1.0,
                                    robustkit_version="0", torch_version="0", device="cpu"))


@pytest.mark.parametrize("width", [80, 120])
def test_report_scaling_fits_the_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                         tmp_path: Path, width: int) -> None:
    _sweep(tmp_path / "lb.db")
    buffer = _narrow(monkeypatch, report, width)
    with pytest.raises(SystemExit) as exc:
        main(["report", "scaling", "--db", str(tmp_path / "lb.db")])
    assert exc.value.code == 0
    text = buffer.getvalue()
    _check(text, ["robust-resnet-down-inverted-dw-small", "digits-cnn + aaa", "worst-case"], width)
    assert "on cifar10, linf" in text and "2/255–16/255" in text or width == 80
    assert "k [95% interval]" in text and "0.50 [0.50, 0.50]" in text
    note = capsys.readouterr().err
    if width == 80:
        assert "R²" not in text and "not shown at 80 columns: R²" in note
    else:
        assert "R²" in text and not note


def test_eps_is_shown_one_way() -> None:
    assert [eps_label(e) for e in (8 / 255, 2 / 255, 0.2, 0.1, 0.5, 0.0, 1.0, 0.031)] == [
        "8/255", "2/255", "0.2", "0.1", "0.5", "0", "1", "0.031"]
    assert eps_label(float(np.float32(8 / 255))) == "8/255"  # through float32 (a checkpoint's sidecar)
    assert eps_label(0.03137255) == "8/255"  # 8/255 written with 7 significant digits
    assert eps_str(0.2) == "51/255"  # the stored key is unchanged
