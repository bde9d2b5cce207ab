"""`robustkit report scaling`: the power-law fit recovers known exponents, its interval is
calibrated, saturated points are left out, and the CLI fits a real eps sweep of the leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustkit.cli import main
from robustkit.errors import DataError, UsageError
from robustkit.results.scaling import fit_power_law, scaling_reports


def test_exact_power_law_is_recovered() -> None:
    eps = np.array([0.01, 0.02, 0.05, 0.1])
    fit = fit_power_law(eps, 3.0 * eps**1.5)
    assert fit.exponent == pytest.approx(1.5)
    assert fit.coefficient == pytest.approx(3.0)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.ci_low == pytest.approx(1.5) and fit.ci_high == pytest.approx(1.5)


def test_interval_covers_the_true_exponent_at_its_level() -> None:
    rng = np.random.default_rng(0)
    eps = np.geomspace(0.01, 0.2, 6)
    trials = 400
    covered = 0
    for _ in range(trials):
        value = 0.5 * eps**1.2 * np.exp(rng.normal(0, 0.2, eps.shape))
        fit = fit_power_law(eps, value, level=0.9)
        covered += fit.ci_low <= 1.2 <= fit.ci_high
    assert 0.86 <= covered / trials <= 0.94  # binomial sd 1.5 pp around 90%


def test_too_few_points_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="at least 3 points"):
        fit_power_law(np.array([0.1, 0.2]), np.array([0.1, 0.3]))


def _frame(rows: list[tuple[str, float, float, float, int]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "defense": "", "dataset": "d", "norm": "linf", "attack": attack, "eps": eps,
                          "clean_acc": clean, "robust_acc": robust, "n_examples": n}
                         for attack, eps, clean, robust, n in rows])


def test_saturated_points_are_listed_but_not_fitted_and_larger_runs_win() -> None:
    frame = _frame([("pgd", 0.0, 0.9, 0.9, 100), ("pgd", 0.01, 0.9, 0.89, 100), ("pgd", 0.02, 0.9, 0.86, 100),
                    ("pgd", 0.04, 0.9, 0.74, 100), ("pgd", 0.04, 0.9, 0.70, 1000), ("pgd", 0.5, 0.9, 0.0, 100),
                    ("fgsm", 0.01, 0.9, 0.8, 100)])
    pgd, fgsm = sorted(scaling_reports(frame), key=lambda r: r.group["attack"] != "pgd")
    assert pgd.eps.tolist() == [0.0, 0.01, 0.02, 0.04, 0.5]
    assert pgd.used.tolist() == [False, True, True, True, False]
    assert pgd.value[3] == pytest.approx(0.2)  # the 1000-example row at 0.04
    expected = fit_power_law(np.array([0.01, 0.02, 0.04]), np.array([0.01, 0.04, 0.2]))
    assert pgd.fit is not None and pgd.fit.exponent == pytest.approx(expected.exponent)
    assert fgsm.fit is None and "at least 3 points" in fgsm.reason
    error = scaling_reports(frame, quantity="error")[1]
    assert error.value[1] == pytest.approx(0.11)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(UsageError, match="Unknown quantity"):
        scaling_reports(_frame([("pgd", 0.1, 0.9, 0.5, 10)]), quantity="loss")
    with pytest.raises(DataError, match="no rows"):
        scaling_reports(_frame([]))


def test_cli_fits_an_eps_sweep_from_the_leaderboard(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    db = str(tmp_path / "b.db")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--db", db, "--quiet", "--n-examples", "200", "--attack", "pgd", "--eps",
              "0.03,0.05,0.1,0.15"])
    assert exc.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["report", "scaling", "--db", db, "--format", "json", "--output", str(tmp_path / "fit.png")])
    assert exc.value.code == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "digits-cnn" and row["fitted"] == 4
    assert 1.0 < row["exponent"] < 3.0  # error grows faster than linearly on this robust model
    assert row["ci_low"] < row["exponent"] < row["ci_high"]
    assert (tmp_path / "fit.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as exc:
        main(["report", "scaling", "--db", db, "--model", "nope"])
    assert exc.value.code != 0
    assert "no rows" in capsys.readouterr().err
