"""Plots a researcher can read: one panel per data set and norm, eps in k/255 on 8-bit Linf
data, clean accuracy at eps 0, a colour per model and a line style per attack, the legend
outside the panels. Checked on the matplotlib Figure objects built from synthetic frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from robustkit.cli import main
from robustkit.errors import DataError, UsageError

pytest.importorskip("matplotlib")

from robustkit.results.plot import curves_figure, eight_bit, leaderboard_figure, plot_curves  # noqa: E402
from robustkit.results.scaling import scaling_figure, scaling_reports  # noqa: E402

CIFAR = "npz:/data/cifar10_test1000.npz"
GROUPS = {(CIFAR, "linf"): [1 / 255, 2 / 255, 4 / 255, 8 / 255], (CIFAR, "l2"): [0.1, 0.25, 0.5, 1.0],
          ("digits", "linf"): [0.05, 0.1, 0.2, 0.3]}
ATTACKS = ("fgsm", "pgd", "apgd-ce", "worst-case")


def leaderboard(models: list[str], groups: dict[tuple[str, str], list[float]] = GROUPS) -> pd.DataFrame:
    """A leaderboard frame: every model, attack and radius of ``groups``; accuracy falls with eps."""
    rows = []
    for m, model in enumerate(models):
        clean = 0.95 - 0.01 * m
        for (dataset, norm), radii in groups.items():
            for a, attack in enumerate(ATTACKS):
                for i, eps in enumerate(radii):
                    rows.append({"model": model, "defense": "", "checkpoint_sha256": f"{m:064x}", "dataset": dataset,
                                 "norm": norm, "eps": eps, "attack": attack, "attack_config": "{}", "seed": 0,
                                 "clean_acc": clean, "robust_acc": clean * (0.8 - 0.05 * a) ** (i + 1),
                                 "n_examples": 32, "seconds": 1.0, "timestamp": "2026-01-01T00:00:00"})
    return pd.DataFrame(rows)


def curve_frame(models: list[str], n_points: int = 60) -> pd.DataFrame:
    """A curve frame as robustkit.results.curves gives it: one row per eps point of each curve."""
    rows = []
    for m, model in enumerate(models):
        for norm, top in (("linf", 16 / 255), ("l2", 2.0)):
            for eps in np.linspace(top / n_points, top, n_points):
                rows.append({"model": model, "defense": "", "checkpoint": f"{m:064x}", "dataset": CIFAR, "norm": norm,
                             "attack": "fmn", "n": 64, "eps": eps, "robust_acc": 0.9 * np.exp(-eps / top * 4),
                             "clean_acc": 0.9})
    return pd.DataFrame(rows)


def drawn(fig: Any) -> Any:
    fig.canvas.draw()
    return fig


def panels(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_visible()]


def lines_by(fig: Any) -> dict[tuple[str, str, str], Any]:
    """The plotted lines keyed by (panel title, model, attack)."""
    return {(ax.get_title(), *line.get_gid().split("|")): line for ax in panels(fig) for line in ax.get_lines()}


def test_one_panel_per_data_set_and_norm_with_titles_and_labels() -> None:
    fig = drawn(leaderboard_figure(leaderboard(["resnet20", "resnet4b"])))
    axes = panels(fig)
    assert sorted(ax.get_title() for ax in axes) == ["cifar10_test1000 · l2", "cifar10_test1000 · linf",
                                                     "digits · linf"]
    for ax in axes:
        assert ax.get_xlabel().startswith("eps (") and ax.get_ylabel() == "robust accuracy (%)"
        assert ax.xaxis.label.get_window_extent().y0 >= 0  # the x label lies inside the saved canvas
        assert len(ax.get_lines()) == 2 * len(ATTACKS)


def test_eps_ticks_are_k_over_255_on_8_bit_linf_data_only() -> None:
    fig = drawn(leaderboard_figure(leaderboard(["resnet20"])))
    ticks = {ax.get_title(): [t.get_text() for t in ax.get_xticklabels() if t.get_text()] for ax in panels(fig)}
    assert ticks["cifar10_test1000 · linf"] == ["0", "2/255", "4/255", "6/255", "8/255"]
    assert not any("/255" in t for t in ticks["cifar10_test1000 · l2"])
    assert not any("/255" in t for t in ticks["digits · linf"]) and "0.1" in ",".join(ticks["digits · linf"])
    assert eight_bit("cifar10") and eight_bit("npz:/x/svhn_test.npz") and eight_bit("mnist")
    assert not eight_bit("digits") and not eight_bit("npz:/x/points.npz")


def test_every_line_starts_at_the_clean_accuracy_at_eps_0() -> None:
    frame = leaderboard(["resnet20", "resnet4b"])
    for (_, model, _), line in lines_by(leaderboard_figure(frame)).items():
        clean = frame.loc[frame["model"] == model, "clean_acc"].iloc[0]
        assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == pytest.approx(100 * clean)
        assert len(line.get_xdata()) == 5  # eps 0 and the four radii
    clean_only = leaderboard_figure(frame, metric="clean_acc")
    assert all(line.get_xdata()[0] > 0 for line in lines_by(clean_only).values())


@pytest.mark.parametrize("n_models", [3, 12, 25])
def test_one_colour_and_marker_per_model_one_line_style_per_attack(n_models: int) -> None:
    fig = leaderboard_figure(leaderboard([f"model-{i:02d}" for i in range(n_models)], {(CIFAR, "linf"): [2 / 255]}))
    lines = lines_by(fig)
    look = {}
    for (_, model, _), line in lines.items():
        look.setdefault(model, set()).add((tuple(np.round(line.get_color(), 4)), line.get_marker()))
    assert all(len(v) == 1 for v in look.values())  # the same colour and marker under every attack
    distinct = {next(iter(v)) for v in look.values()}
    assert len(distinct) == n_models
    if n_models <= 20:
        assert len({c for c, _ in distinct}) == n_models  # colours alone tell them apart up to 20
    styles: dict[str, set[Any]] = {}
    for (_, _, attack), line in lines.items():
        styles.setdefault(attack, set()).add(str(line.get_linestyle()) + str(line.get_dashes() if hasattr(
            line, "get_dashes") else ""))
    assert all(len(v) == 1 for v in styles.values())
    assert len({next(iter(v)) for v in styles.values()}) == len(ATTACKS)


def test_the_legend_is_outside_every_panel_and_lists_models_and_attacks_once() -> None:
    fig = drawn(leaderboard_figure(leaderboard([f"model-{i}" for i in range(8)])))
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in panels(fig):
        assert not box.overlaps(ax.get_window_extent())
    assert box.x1 <= fig.bbox.x1 + 1 and box.y0 >= fig.bbox.y0 - 1  # the figure grew to hold it
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["model", *[f"model-{i}" for i in range(8)], "attack", "apgd-ce", "fgsm", "pgd", "worst-case"]


def test_checkpoints_and_attack_options_are_told_apart() -> None:
    frame = leaderboard(["resnet20"], {(CIFAR, "linf"): [2 / 255, 8 / 255]})
    other = frame.assign(checkpoint_sha256="f" * 64, robust_acc=frame["robust_acc"] / 2)
    steps = frame[frame["attack"] == "pgd"].assign(attack_config='{"steps": 20}')
    keys = set(lines_by(leaderboard_figure(pd.concat([frame, other, steps]))))
    assert ("cifar10_test1000 · linf", "resnet20 @fffffff", "fgsm") in keys
    assert ("cifar10_test1000 · linf", "resnet20 @0000000", "pgd (steps=20)") in keys
    assert ("cifar10_test1000 · linf", "resnet20 @0000000", "pgd (steps=-)") in keys


def test_repeated_cells_keep_the_largest_run() -> None:
    frame = leaderboard(["m"], {(CIFAR, "linf"): [2 / 255]})
    bigger = frame.assign(n_examples=1000, robust_acc=0.123)
    line = lines_by(leaderboard_figure(pd.concat([bigger, frame])))[("cifar10_test1000 · linf", "m", "pgd")]
    assert line.get_ydata()[1] == pytest.approx(12.3)


def test_curves_one_panel_per_norm_clean_at_0_and_legend_outside(tmp_path: Path) -> None:
    frame = curve_frame(["resnet20", "resnet4b"])
    fig = drawn(curves_figure(frame))
    assert sorted(ax.get_title() for ax in panels(fig)) == ["cifar10_test1000 · l2", "cifar10_test1000 · linf"]
    linf = next(ax for ax in panels(fig) if ax.get_title().endswith("linf"))
    assert [t.get_text() for t in linf.get_xticklabels() if t.get_text()][-1] == "16/255"
    for line in lines_by(fig).values():
        assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == pytest.approx(90)
        assert len(line.get_xdata()) == 61
    (legend,) = fig.legends
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in panels(fig))
    path = plot_curves(frame, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="columns"):
        curves_figure(frame.drop(columns=["clean_acc"]))
    with pytest.raises(UsageError, match=".png, .svg or .pdf"):
        plot_curves(frame, tmp_path / "c.txt")


def test_curves_of_several_runs_units_from_the_radius_data_set() -> None:
    base = curve_frame(["resnet4b"], n_points=20).assign(dataset="npz:/x/points.npz", radius_dataset="cifar10",
                                                         seed=0, attack_config='{"steps": 100}')
    longer = base.assign(attack_config='{"steps": 1000}', robust_acc=base["robust_acc"] / 2)
    small = base.assign(n=16, robust_acc=0.0)  # a smaller run of the same attack is not drawn
    fig = drawn(curves_figure(pd.concat([base, longer, small])))
    lines = lines_by(fig)
    assert {k[2] for k in lines} == {"fmn (steps=100)", "fmn (steps=1000)"}
    line = lines[("points · linf", "resnet4b", "fmn (steps=100)")]
    assert len(line.get_xdata()) == 21 and line.get_ydata()[-1] > 0
    linf = next(ax for ax in panels(fig) if ax.get_title() == "points · linf")
    assert "16/255" in [t.get_text() for t in linf.get_xticklabels()]


def test_scaling_plot_one_panel_per_group_with_each_exponent_below() -> None:
    frame = leaderboard(["resnet20", "resnet4b"])
    fig = drawn(scaling_figure(scaling_reports(frame)))
    axes = panels(fig)
    assert len(axes) == 3
    for ax in axes:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(texts) == 2 * len(ATTACKS) and all("k = " in t for t in texts)
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # below the panel
    linf = next(ax for ax in axes if ax.get_title() == "cifar10_test1000 · linf")
    assert [t.get_text() for t in linf.get_xticklabels() if t.get_text()] == ["1/255", "2/255", "4/255", "8/255"]


def test_plot_command_draws_the_leaderboard(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from robustkit.results.leaderboard import Leaderboard, ResultRow

    db = tmp_path / "b.db"
    board = Leaderboard(db)
    for row in leaderboard(["resnet20", "resnet4b"]).to_dict("records"):
        row = {k: v for k, v in row.items() if k != "timestamp"} | {"attack_config": {}}
        board.add(ResultRow(**row, robustkit_version="x",
                            torch_version="x", device="cpu"))
    with pytest.raises(SystemExit) as exc:
        main(["plot", "--db", str(db), "--output", str(tmp_path / "p.png")])
    assert exc.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:
        main(["plot", "--db", str(db), "--attack", "nope", "--output", str(tmp_path / "q.png")])
    assert exc.value.code != 0 and "no rows" in capsys.readouterr().err


def test_plot_curve_command_draws_the_stored_curves(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    db = str(tmp_path / "b.db")
    with pytest.raises(SystemExit) as exc:  # curves of FMN and DDN (and their ensemble) on digits-cnn
        main(["eval", "--attack", "fmn,ddn", "--norm", "l2", "--n-examples", "16", "--attack-kwargs", "steps=10",
              "--db", db, "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["plot", "--curve", "--db", db, "--norm", "l2", "--output", str(tmp_path / "c.png")])
    assert exc.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, message in ((["--model", "nope"], "No robustness curves"), (["--metric", "seconds"], "leave out")):
        with pytest.raises(SystemExit) as exc:
            main(["plot", "--curve", "--db", db, *args, "--output", str(tmp_path / "d.png")])
        assert exc.value.code != 0 and message in capsys.readouterr().err
