"""Figures of robust accuracy against eps: from leaderboard rows and from robustness curves.

What a researcher expects of a security-evaluation plot, whatever the data: one panel per data
set and norm (their eps do not share an axis), eps in the data's own unit (``k/255`` for Linf on
8-bit images, as papers write it), each line starting at the clean accuracy at eps 0, one colour
and marker per model and one line style per attack (so the legend lists models and attacks once
each, not every pair), and the legend outside the panels, the figure growing to hold it.
matplotlib is imported lazily: it is an optional extra (``robustkit[plot]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustkit.errors import DataError, DependencyError, UsageError
from robustkit.results.labels import dataset_of_label

METRICS = ("robust_acc", "clean_acc", "seconds")
X_AXES = ("eps", "n_examples")
CURVE_COLUMNS = ("model", "defense", "checkpoint", "dataset", "norm", "attack", "n", "eps", "robust_acc",
                 "clean_acc")  # fmt: skip
# Data sets stored as 8-bit images (0-255 per channel): Linf radii are k/255 there. scikit-learn's
# 8x8 digits are 0-16 levels, so "digits" is not one of them.
EIGHT_BIT_NAMES = ("cifar", "svhn", "mnist", "imagenet", "stl10", "gtsrb", "celeba", "tiny")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)))
PANEL_SIZE = (4.4, 3.3)  # inches per panel
NORM_ORDER = ("linf", "l2", "l1", "l0")


def pyplot(output: str | Path) -> Any:
    """matplotlib.pyplot (Agg backend) after checking that ``output`` names a figure file."""
    check_output(output)
    try:
        # optional extra: matplotlib
        import matplotlib

        matplotlib.use("Agg")
        # optional extra: matplotlib
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("matplotlib", "pip install matplotlib") from None
    return plt


def check_output(output: str | Path, *, make_folder: bool = True) -> Path:
    """``output`` as a Path once it names a .png, .svg or .pdf file (its folder is created)."""
    output = Path(output)
    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"Write the plot to a .png, .svg or .pdf file, not {output.name!r}.")
    if make_folder:
        output.parent.mkdir(parents=True, exist_ok=True)
    return output


def new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure with constrained layout, outside pyplot's global state."""
    try:
        # optional extra: matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError("matplotlib", "pip install matplotlib") from None
    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, output: str | Path) -> Path:
    """Write ``fig`` (format from the suffix), growing the canvas to anything drawn outside it."""
    output = check_output(output)
    fig.savefig(output, bbox_inches="tight", pad_inches=0.15)
    return output


def eight_bit(dataset: str) -> bool:
    """Whether ``dataset`` (a registered name or ``npz:PATH``) is 8-bit image data (radii k/255)."""
    name = Path(dataset[4:]).name if dataset.startswith("npz:") else dataset
    return any(word in name.lower() for word in EIGHT_BIT_NAMES)


def panel_order(groups: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(data set, norm) pairs sorted by the data set's short name, then Linf, L2, L1, L0."""
    def key(group: tuple[str, str]) -> tuple[str, int, str]:
        dataset, norm = group
        return (dataset_label(dataset), NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER), norm)

    return sorted(set(groups), key=key)


def log_axis_numbers(axis: Any) -> None:
    """Plain numbers (``50``, ``0.2``) on a log axis instead of ``5 x 10^1``, at 1, 2 and 5 of each decade."""
    # optional extra: matplotlib
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos=None: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def dataset_label(dataset: str) -> str:
    """A short name for titles: ``npz:/data/cifar10_test1000.npz`` -> ``cifar10_test1000`` (a
    ``:train`` split suffix kept)."""
    base = dataset_of_label(dataset)
    return (Path(base[4:]).stem if base.startswith("npz:") else base) + dataset[len(base):]


def in_255ths(dataset: str, norm: str) -> bool:
    """Eps reads as k/255 for Linf on 8-bit images (L2 and L1 radii are written as decimals)."""
    return norm == "linf" and eight_bit(dataset)


@dataclass
class Series:
    """One line of a panel: ``y`` against ``x`` for a model under an attack."""

    model: str
    attack: str
    dataset: str
    norm: str
    x: np.ndarray
    y: np.ndarray
    markers: bool = True  # a marker on every point (leaderboard cells), else a few (dense curves)
    units: str = ""  # the data set whose eps units apply, when not ``dataset`` itself


def model_styles(models: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """One (colour, marker) per model: tab10 up to 10 models, tab20 up to 20, then markers vary too."""
    # optional extra: matplotlib
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(models) <= 10 else "tab20"].colors
    return {m: (palette[i % len(palette)], MARKERS[(i + i // len(palette)) % len(MARKERS)])
            for i, m in enumerate(models)}


def attack_order(attacks: Iterable[str]) -> list[str]:
    """Attacks in legend order: AutoAttack first, the worst case last, the rest by name."""
    def key(a: str) -> tuple[int, str]:
        return (0 if a.startswith("autoattack") else 2 if a.startswith("worst-case") else 1, a)

    return sorted(set(attacks), key=key)


def attack_styles(attacks: Sequence[str]) -> dict[str, Any]:
    """One line style per attack; the worst case is solid, the others dashed and dotted."""
    rest = iter(LINE_STYLES[1:] if any(a.startswith("worst-case") for a in attacks) else LINE_STYLES)
    styles = {}
    for a in attacks:
        styles[a] = "-" if a.startswith("worst-case") else next(rest, None)
        if styles[a] is None:  # more attacks than named styles: dash patterns of growing length
            n = len(styles)
            styles[a] = (0, (n, 1.5, 1, 1.5))
    return styles


def eps_formatter(scale: float) -> Any:
    """Tick text for eps: ``k/255`` when ``scale`` is 255 (fractions of a level keep 2 decimals)."""
    # optional extra: matplotlib
    from matplotlib.ticker import FuncFormatter

    def text(value: float, _pos: int | None = None) -> str:
        if value == 0:
            return "0"
        if scale == 255:
            k = value * 255
            return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{k:.2g}/255"
        return f"{value:g}"

    return FuncFormatter(text)


def _eps_ticks_255(largest: float, *, log: bool, smallest: float = 0.0) -> list[float]:
    """Ticks at whole k/255: powers of two on log axes, a round step (about 6 ticks) on linear ones."""
    top = largest * 255  # 8/255 stored through float32 comes back as 7.99999 levels: tolerances below
    if log:
        low = max(smallest * 255, 1e-12)
        return [2.0**p / 255 for p in range(math.floor(math.log2(low) + 1e-2), math.ceil(math.log2(top) - 1e-2) + 1)]
    step = next((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64) if top / s <= 6), 128)
    return [k * step / 255 for k in range(int(top / step + 1e-3) + 1)]


def format_eps_axis(ax: Any, dataset: str, norm: str, eps: np.ndarray, *, log: bool = False) -> None:
    """The x axis of one panel: eps in k/255 on 8-bit Linf data, decimals elsewhere, with its label."""
    # optional extra: matplotlib
    from matplotlib.ticker import FixedLocator

    positive = eps[eps > 0]
    # k/255 needs a level or more on the axis (and, on log axes, no tick far below one level)
    whole_levels = bool(in_255ths(dataset, norm) and positive.size and positive.max() * 255 >= 0.999
                        and (not log or positive.min() * 255 >= 0.499))
    if whole_levels:
        ax.xaxis.set_major_locator(FixedLocator(_eps_ticks_255(positive.max(), log=log, smallest=positive.min())))
        ax.xaxis.set_major_formatter(eps_formatter(255))
        if log:
            ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_xlim(left=positive.min() / 1.3 if log else 0, right=positive.max() * (1.3 if log else 1.04))
    elif not log:
        ax.set_xlim(left=0)
    ax.set_xlabel(f"eps ({norm.capitalize()}{', k/255' if whole_levels else ''})")


def draw_panels(series: list[Series], *, ylabel: str, percent: bool, log: bool = False,
                x_is_eps: bool = True, title: str | None = None) -> Any:
    """A figure with one panel per (data set, norm) of ``series`` and one legend outside them.

    Colours and markers follow the model, line styles the attack, identically in every panel.
    """
    if not series:
        raise DataError("Nothing to plot for this selection.")
    groups = panel_order((s.dataset, s.norm) for s in series)
    models = list(dict.fromkeys(sorted(s.model for s in series)))
    attacks = attack_order(s.attack for s in series)
    colours, styles = model_styles(models), attack_styles(attacks)
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    legend_width = 1.0 + 0.075 * max(len(t) for t in [*models, *attacks])
    fig = new_figure((PANEL_SIZE[0] * ncols + legend_width, PANEL_SIZE[1] * nrows + (0.3 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=percent)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (dataset, norm) in zip(axes.flat, groups, strict=False):
        panel = [s for s in series if (s.dataset, s.norm) == (dataset, norm)]
        for s in sorted(panel, key=lambda s: (models.index(s.model), attacks.index(s.attack))):
            colour, marker = colours[s.model]
            worst = s.attack.startswith("worst-case")  # wide and light, under the attacks it often equals
            ax.plot(s.x, s.y, color=colour, linestyle=styles[s.attack], marker=marker,
                    markevery=None if s.markers else max(len(s.x) // 8, 1), markersize=5 if s.markers else 4,
                    linewidth=3.2 if worst else 1.5, alpha=0.45 if worst else 0.95, zorder=1.5 if worst else 2,
                    gid=f"{s.model}|{s.attack}")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            log_axis_numbers(ax.yaxis)
        if x_is_eps:
            units = next((s.units for s in panel if s.units), dataset)
            format_eps_axis(ax, units, norm, np.concatenate([s.x for s in panel]), log=log)
        else:
            ax.set_xlabel("examples evaluated")
        if percent:
            ax.set_ylim(-3, 103)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_title(f"{dataset_label(dataset)} · {norm}")
        ax.grid(alpha=0.3)
    _legend(fig, models, attacks, colours, styles)
    if title:
        fig.suptitle(title)
    return fig


def _legend(fig: Any, models: list[str], attacks: list[str], colours: dict[str, tuple[Any, str]],
            styles: dict[str, Any]) -> Any:
    """One legend right of the panels: a "model" section (colour, marker) and an "attack" one (style)."""
    # optional extra: matplotlib
    from matplotlib.lines import Line2D

    def header() -> Any:
        return Line2D([], [], linestyle="none")

    handles = [header()] + [Line2D([], [], color=colours[m][0], marker=colours[m][1], linewidth=1.5)
                            for m in models]
    handles += [header()] + [Line2D([], [], color="0.25", linestyle=styles[a],
                                    linewidth=3.2 if a.startswith("worst-case") else 1.5,
                                    alpha=0.45 if a.startswith("worst-case") else 1.0) for a in attacks]
    labels = ["model", *models, "attack", *attacks]
    legend = fig.legend(handles, labels, loc="outside right upper", fontsize="small", handlelength=3.2,
                        frameon=False)
    for text in legend.get_texts():
        if text.get_text() in ("model", "attack") and text in (legend.get_texts()[0],
                                                              legend.get_texts()[len(models) + 1]):
            text.set_fontweight("bold")
    return legend


def _flat_config(config: Any) -> dict[str, Any]:
    """An attack config (JSON text or dict) as ``{"dotted.key": value}`` (nested dicts flattened)."""
    if isinstance(config, str):
        try:
            config = json.loads(config) if config else {}
        except ValueError:
            return {"": config}
    if not isinstance(config, dict):
        return {"": config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}".rstrip("."): v for k, v in _flat_config(value).items()})
        else:
            flat[key] = json.dumps(value) if isinstance(value, list) else value
    return flat


def _model_labels(frame: pd.DataFrame, checkpoint: str) -> pd.Series:
    """``model + defense``, with the checkpoint's first hex digits where one name has several."""
    base = frame["model"].astype(str) + frame["defense"].fillna("").map(lambda d: f" + {d}" if d else "")
    counts = frame.assign(_b=base).groupby("_b")[checkpoint].transform("nunique")
    short = frame[checkpoint].fillna("").map(lambda c: f" @{str(c)[:7]}" if c else " @no-weights")
    return base.where(counts <= 1, base + short)


def _attack_labels(frame: pd.DataFrame, model_labels: pd.Series) -> pd.Series:
    """The attack's name, with the options that set apart several runs of it on the same cell.

    Options that only follow eps (PGD's step size is eps/4) differ from cell to cell, not
    within one, so they do not split a line.
    """
    flat = frame["attack_config"].map(_flat_config)
    cells = pd.DataFrame({"m": model_labels, "d": frame["dataset"], "n": frame["norm"], "a": frame["attack"],
                          "e": frame["eps"].round(12)})
    telling: dict[str, set[str]] = {}
    for (attack, *_), rows in cells.groupby(["a", "m", "d", "n", "e"]).groups.items():
        configs = [flat[i] for i in rows]
        keys = set().union(*configs)
        telling.setdefault(attack, set()).update(
            k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1)

    def label(i: Any) -> str:
        attack = frame.at[i, "attack"]
        keys = sorted(telling.get(attack, ()))
        if not keys:
            return str(attack)
        values = ",".join(f"{k.rsplit('.', 1)[-1] if k else 'config'}={flat[i].get(k, '-')}" for k in keys)
        return f"{attack} ({values})"

    return pd.Series([label(i) for i in frame.index], index=frame.index)


def leaderboard_series(frame: pd.DataFrame, *, metric: str = "robust_acc", x: str = "eps") -> list[Series]:
    """One :class:`Series` per (model, defense, checkpoint, data set, norm, attack and its options).

    Where a point was evaluated several times, the row with the most examples (then the newest)
    counts. Robust accuracy lines start at the clean accuracy at eps 0.
    """
    frame = frame.copy()
    frame = frame.reset_index(drop=True)
    frame["model_label"] = _model_labels(frame, "checkpoint_sha256")
    frame["attack_label"] = _attack_labels(frame, frame["model_label"])
    series = []
    keys = ["model_label", "dataset", "norm", "attack_label"]
    for (model, dataset, norm, attack), rows in frame.groupby(keys, sort=True):
        rows = rows.sort_values(["n_examples", "timestamp"]).groupby(x, as_index=False).last().sort_values(x)
        xs, ys = rows[x].to_numpy(float), rows[metric].to_numpy(float)
        if metric == "robust_acc" and x == "eps" and xs[0] > 0:
            clean = rows.sort_values("n_examples")["clean_acc"].iloc[-1]
            xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[clean], ys])
        series.append(Series(model, attack, dataset, norm, xs, 100 * ys if metric.endswith("_acc") else ys))
    return series


def leaderboard_figure(frame: pd.DataFrame, *, metric: str = "robust_acc", x: str = "eps",
                       attack: str | None = None) -> Any:
    """The figure of :func:`plot_leaderboard` (a matplotlib Figure, for tests and notebooks)."""
    if metric not in METRICS:
        raise UsageError(f"Unknown metric {metric!r}; accepted: {', '.join(METRICS)}.")
    if x not in X_AXES:
        raise UsageError(f"Unknown x axis {x!r}; accepted: {', '.join(X_AXES)}.")
    if attack:
        frame = frame[frame["attack"] == attack]
    if frame.empty:
        raise DataError("The leaderboard has no rows to plot for this selection.")
    percent = metric.endswith("_acc")
    ylabel = {"robust_acc": "robust accuracy (%)", "clean_acc": "clean accuracy (%)", "seconds": "seconds"}[metric]
    return draw_panels(leaderboard_series(frame, metric=metric, x=x), ylabel=ylabel, percent=percent,
                       x_is_eps=x == "eps")


def plot_leaderboard(frame: pd.DataFrame, output: str | Path, *, metric: str = "robust_acc", x: str = "eps",
                     attack: str | None = None) -> Path:
    """One line per (model, attack) of ``metric`` against ``x``, a panel per data set and norm."""
    check_output(output)
    return save(leaderboard_figure(frame, metric=metric, x=x, attack=attack), output)


def curve_series(frame: pd.DataFrame) -> list[Series]:
    """One :class:`Series` per curve of a curve frame (columns :data:`CURVE_COLUMNS`).

    Optional columns: ``attack_config`` (runs of one attack with different options become
    different lines), ``seed`` (where one attack has curves on several sample sizes or seeds, the
    largest, then the first seed, is drawn) and ``radius_dataset`` (the data set whose units
    apply, e.g. cifar10 for images read from an npz file).
    """
    missing = [c for c in CURVE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"A curve frame needs the columns {', '.join(missing)}.")
    frame = frame.reset_index(drop=True)
    frame["model_label"] = _model_labels(frame, "checkpoint")
    frame["attack_label"] = (_attack_labels(frame, frame["model_label"]) if "attack_config" in frame.columns
                             else frame["attack"])
    if "seed" not in frame.columns:
        frame["seed"] = 0
    series = []
    for (model, dataset, norm, attack), rows in frame.groupby(["model_label", "dataset", "norm", "attack_label"]):
        n, seed = max((int(n), -int(s)) for n, s in zip(rows["n"], rows["seed"], strict=True))
        rows = rows[(rows["n"] == n) & (rows["seed"] == -seed)].sort_values("eps")
        xs, ys = rows["eps"].to_numpy(float), rows["robust_acc"].to_numpy(float)
        if xs[0] > 0:
            xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[rows["clean_acc"].iloc[0]], ys])
        units = str(rows["radius_dataset"].iloc[0]) if "radius_dataset" in rows.columns else dataset
        series.append(Series(model, attack, dataset, norm, xs, 100 * ys, markers=len(xs) <= 12, units=units))
    return series


def curves_figure(frame: pd.DataFrame, *, title: str | None = None) -> Any:
    """The figure of :func:`plot_curves` (a matplotlib Figure, for tests and notebooks)."""
    if frame.empty:
        raise DataError("No robustness curves to plot for this selection.")
    return draw_panels(curve_series(frame), ylabel="robust accuracy (%)", percent=True, title=title)


def plot_curves(frame: pd.DataFrame, output: str | Path, *, title: str | None = None) -> Path:
    """Security-evaluation curves: robust accuracy against eps, one line per model and attack,
    starting at the clean accuracy at eps 0, a panel per data set and norm."""
    check_output(output)
    return save(curves_figure(frame, title=title), output)

