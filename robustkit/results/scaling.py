"""How adversarial error grows with the perturbation size: a power-law fit over an eps sweep.

For small radii the error an attack adds grows like a power of eps (a linear model gives
exponent 1, Goodfellow et al. 2015; measured exponents of deep networks are reported between
about 1 and 2). :func:`fit_power_law` fits ``err(eps) = c * eps**k`` by least squares on
log-log axes and gives ``k`` with a Student-t confidence interval. The fitted quantity is, by
default, the *excess* error ``clean_acc - robust_acc`` (the share of points the attack flips),
which goes to 0 with eps as a power law must; ``quantity="error"`` fits ``1 - robust_acc``.
Points at 0 or at the ceiling (every clean-correct point flipped) carry no slope information
and are left out of the fit (they are still listed and plotted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from robustkit.errors import DataError, UsageError
from robustkit.results.plot import (
    PANEL_SIZE,
    attack_order,
    attack_styles,
    check_output,
    dataset_label,
    format_eps_axis,
    log_axis_numbers,
    model_styles,
    new_figure,
    panel_order,
    save,
)

QUANTITIES = ("excess", "error")
GROUP_COLUMNS = ("model", "defense", "dataset", "norm", "attack")


@dataclass(frozen=True)
class PowerLawFit:
    """``err = coefficient * eps**exponent`` fitted on ``n_fit`` points of one sweep."""

    exponent: float
    ci_low: float
    ci_high: float
    coefficient: float
    r2: float
    n_fit: int
    level: float

    def predict(self, eps: np.ndarray) -> np.ndarray:
        return self.coefficient * np.power(eps, self.exponent)


@dataclass
class ScalingReport:
    """One sweep (a model, attack, norm and data set) with its measured points and fit."""

    group: dict[str, str]
    eps: np.ndarray
    value: np.ndarray
    used: np.ndarray  # bool: points inside the fit
    fit: PowerLawFit | None
    reason: str = ""  # why there is no fit
    n_examples: list[int] = field(default_factory=list)

    def model_label(self) -> str:
        defense = f" + {self.group['defense']}" if self.group.get("defense") else ""
        return f"{self.group['model']}{defense}"

    def label(self) -> str:
        return f"{self.model_label()} {self.group['attack']} {self.group['norm']}"


def fit_power_law(eps: np.ndarray, value: np.ndarray, *, level: float = 0.95) -> PowerLawFit:
    """Least squares of ``log value = log c + k log eps``; ``k``'s interval from Student's t."""
    # heavy, only for fitting power laws
    from scipy import stats

    eps, value = np.asarray(eps, dtype=float), np.asarray(value, dtype=float)
    if len(eps) < 3:
        raise DataError(f"A power-law fit needs at least 3 points strictly between 0 and the ceiling; got {len(eps)}.")
    x, y = np.log(eps), np.log(value)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    dof = len(x) - 2
    sxx = float(((x - x.mean()) ** 2).sum())
    if sxx == 0:
        raise DataError("A power-law fit needs at least two different eps values.")
    se = math.sqrt(float((residual**2).sum()) / dof / sxx)
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return PowerLawFit(float(slope), float(slope - half), float(slope + half), float(math.exp(intercept)), r2,
                       len(x), level)


def scaling_reports(frame: pd.DataFrame, *, quantity: str = "excess", level: float = 0.95) -> list[ScalingReport]:
    """One :class:`ScalingReport` per (model, defense, dataset, norm, attack) of a leaderboard frame.

    At each eps the row with the most examples is used (a re-run on more data supersedes a
    quick one).
    """
    if quantity not in QUANTITIES:
        raise UsageError(f"Unknown quantity {quantity!r}; accepted: {', '.join(QUANTITIES)}.")
    if not 0 < level < 1:
        raise UsageError(f"The confidence level must be between 0 and 1, not {level}.")
    if frame.empty:
        raise DataError("The leaderboard has no rows for this selection; run an eps sweep first, e.g. "
                        "`robustkit eval --eps 0.02,0.05,0.1,0.2`.")
    reports = []
    for key, rows in frame.groupby(list(GROUP_COLUMNS), sort=True, dropna=False):
        rows = rows.sort_values("n_examples").groupby("eps", as_index=False).last().sort_values("eps")
        eps = rows["eps"].to_numpy(float)
        clean = rows["clean_acc"].to_numpy(float)
        robust = rows["robust_acc"].to_numpy(float)
        value = clean - robust if quantity == "excess" else 1.0 - robust
        ceiling = clean if quantity == "excess" else np.ones_like(clean)
        used = (eps > 0) & (value > 0) & (value < ceiling)
        group = dict(zip(GROUP_COLUMNS, (str(k) for k in key), strict=True))
        fit, reason = None, ""
        try:
            fit = fit_power_law(eps[used], value[used], level=level)
        except DataError as e:
            reason = str(e)
        reports.append(ScalingReport(group, eps, value, used, fit, reason, rows["n_examples"].astype(int).tolist()))
    return reports


def reports_frame(reports: list[ScalingReport]) -> pd.DataFrame:
    """One row per sweep: the fit (NaN where none) and the eps range it covers."""
    records = []
    for r in reports:
        f = r.fit
        records.append({**r.group, "points": len(r.eps), "fitted": int(r.used.sum()),
                        "eps_min": float(r.eps[r.used].min()) if r.used.any() else math.nan,
                        "eps_max": float(r.eps[r.used].max()) if r.used.any() else math.nan,
                        "exponent": f.exponent if f else math.nan, "ci_low": f.ci_low if f else math.nan,
                        "ci_high": f.ci_high if f else math.nan, "coefficient": f.coefficient if f else math.nan,
                        "r2": f.r2 if f else math.nan, "note": r.reason})
    return pd.DataFrame(records)


def scaling_figure(reports: list[ScalingReport], *, quantity: str = "excess") -> Any:
    """Measured points and fitted lines on log-log axes, one panel per data set and norm.

    Colour and marker follow the model, the fitted line's style the attack (as in ``robustkit
    plot``); below each panel a legend gives each sweep's exponent k with its interval.
    """
    # optional extra: matplotlib
    from matplotlib.lines import Line2D

    if not reports:
        raise DataError("No eps sweeps to plot for this selection.")
    groups = panel_order((r.group["dataset"], r.group["norm"]) for r in reports)
    models = sorted({r.model_label() for r in reports})
    colours = model_styles(models)
    styles = attack_styles(attack_order(r.group["attack"] for r in reports))
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    per_panel = max(sum((r.group["dataset"], r.group["norm"]) == g for r in reports) for g in groups)
    fig = new_figure((PANEL_SIZE[0] * ncols + 0.6, (PANEL_SIZE[1] + 0.2 + 0.2 * per_panel) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (dataset, norm) in zip(axes.flat, groups, strict=False):
        panel = [r for r in reports if (r.group["dataset"], r.group["norm"]) == (dataset, norm)]
        panel.sort(key=lambda r: (r.model_label(), r.group["attack"]))
        shown_eps, handles, labels = [], [], []
        for r in panel:
            colour, marker = colours[r.model_label()]
            shown = (r.eps > 0) & (r.value > 0)
            shown_eps.append(r.eps[shown])
            fit = (f"k = {r.fit.exponent:.2f} [{r.fit.ci_low:.2f}, {r.fit.ci_high:.2f}], R² {r.fit.r2:.2f}"
                   if r.fit else "no fit (< 3 points inside)")
            label = f"{r.model_label()} · {r.group['attack']}: {fit}"
            ax.plot(r.eps[shown], 100 * r.value[shown], linestyle="none", marker=marker, color=colour,
                    markerfacecolor=colour if r.fit else "none")
            handles.append(Line2D([], [], color=colour, marker=marker, markerfacecolor=colour if r.fit else "none",
                                  linestyle=styles[r.group["attack"]] if r.fit else "none"))
            labels.append(label)
            if r.fit is not None:
                grid = np.geomspace(r.eps[r.used].min(), r.eps[r.used].max(), 50)
                ax.plot(grid, 100 * r.fit.predict(grid), linestyle=styles[r.group["attack"]], color=colour,
                        linewidth=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_axis_numbers(ax.yaxis)
        eps = np.concatenate(shown_eps)
        if eps.size:
            format_eps_axis(ax, dataset, norm, eps, log=True)
        if not ax.xaxis.get_label_text().endswith("k/255)"):
            log_axis_numbers(ax.xaxis)
        ax.set_ylabel("clean − robust accuracy (%)" if quantity == "excess" else "adversarial error (%)")
        ax.set_title(f"{dataset_label(dataset)} · {norm}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="x-small", frameon=False,
                  handlelength=2.8)
    return fig


def plot_scaling(reports: list[ScalingReport], output: str, *, quantity: str = "excess") -> None:
    """:func:`scaling_figure` written to ``output`` (matplotlib; the format follows the suffix)."""
    check_output(output)
    save(scaling_figure(reports, quantity=quantity), output)
