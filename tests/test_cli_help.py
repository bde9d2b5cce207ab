"""One help style: click's [default: x] everywhere, the common options first in `train --help`,
--output everywhere (--out still works)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from robustkit.cli.helpstyle import _commands
from robustkit.cli.main import cli, main

COMMANDS = [[], ["eval"], ["list"], ["leaderboard"], ["plot"], ["poison"], ["report"], ["report", "scaling"],
            ["train"], ["train", "prompt"], ["train", "rift"], ["train", "pubdef"], ["train", "distill"]]


def _help(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "robustkit")
def test_defaults_are_shown_one_way(capsys: pytest.CaptureFixture, args: list[str]) -> None:
    text = " ".join(_help(capsys, args).split())  # unwrapped
    assert "(default" not in text and "[default: (" not in text, text
    assert "--out " not in text and "--out," not in text, text


def test_every_command_is_covered() -> None:
    assert {c.name for c in _commands(cli)} >= {"eval", "list", "train", "prompt", "rift", "pubdef", "distill",
                                                "poison", "leaderboard", "plot", "scaling"}


def test_train_help_starts_with_the_common_options(capsys: pytest.CaptureFixture) -> None:
    text = _help(capsys, ["train"])
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert options[:8] == ["--model", "--checkpoint", "--dataset", "--data-dir", "--n-examples", "--norm", "--eps",
                           "--epochs"]
    assert options.index("--output") < 12 and options.index("--trick") > options.index("--weight-decay")
    sections = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[:2] == ["Common options:", "Data and held-out metrics:"], sections
    assert "[default: digits-cnn]" in text and "[default: 10]" in text  # --model, --epochs


@pytest.mark.parametrize("flag", ["--output", "--out"])
def test_output_and_its_old_spelling_both_work(capsys: pytest.CaptureFixture, tmp_path: Path, flag: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "standard", "--dump-config", flag, str(tmp_path / "run")])
    assert exc.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["out"] == str(tmp_path / "run")
    db = tmp_path / "lb.db"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--db", str(db), "--quiet", "--n-examples", "8", "--attack", "fgsm"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["leaderboard", "--db", str(db), "--format", "csv", flag, str(tmp_path / "rows.csv")])
    assert exc.value.code == 0 and "fgsm" in (tmp_path / "rows.csv").read_text()
    npz = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y=np.arange(8) % 2)
    with pytest.raises(SystemExit) as exc:
        main(["poison", "ops", "--dataset", f"npz:{npz}", flag, str(tmp_path / "p.npz")])
    assert exc.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "p.npz").exists()
