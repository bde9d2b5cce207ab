"""Curves from the leaderboard, e.g. robust accuracy against eps per model (matplotlib, PNG/SVG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from robustkit.errors import DataError, DependencyError, UsageError

METRICS = ("robust_acc", "clean_acc", "seconds")
X_AXES = ("eps", "n_examples")


def pyplot(output: str | Path) -> Any:
    """matplotlib.pyplot (Agg backend) after checking that ``output`` names a figure file."""
    if Path(output).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"Write the plot to a .png, .svg or .pdf file, not {Path(output).name!r}.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("matplotlib", "pip install matplotlib") from None
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return plt


def plot_leaderboard(frame: pd.DataFrame, output: str | Path, *, metric: str = "robust_acc", x: str = "eps",
                     attack: str | None = None) -> Path:
    """One line per (model, attack) of ``metric`` against ``x``; the format follows the file suffix."""
    if metric not in METRICS:
        raise UsageError(f"Unknown metric {metric!r}; accepted: {', '.join(METRICS)}.")
    if x not in X_AXES:
        raise UsageError(f"Unknown x axis {x!r}; accepted: {', '.join(X_AXES)}.")
    output = Path(output)
    plt = pyplot(output)
    if attack:
        frame = frame[frame["attack"] == attack]
    if frame.empty:
        raise DataError("The leaderboard has no rows to plot for this selection.")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (model, dataset, norm, name), group in frame.groupby(["model", "dataset", "norm", "attack"]):
        group = group.sort_values(x)
        values = 100 * group[metric] if metric.endswith("_acc") else group[metric]
        ax.plot(group[x], values, marker="o", label=f"{model} / {name} ({dataset}, {norm})")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (%)" if metric.endswith("_acc") else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output
