"""``robustkit report``: analyses of the leaderboard (today: ``scaling``, the power law in eps)."""

from __future__ import annotations

import math

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


@click.group("report")
def report_group() -> None:
    """Analyses of the leaderboard's results."""


@report_group.command("scaling")
@click.option("--model", help="Only rows of this model.")
@click.option("--dataset", help="Only rows of this data set.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--attack", help="Only rows of this attack (e.g. pgd or worst-case).")
@click.option("--quantity", type=click.Choice(["excess", "error"]), default="excess", show_default=True,
              help="excess: clean acc - robust acc (the points the attack flips); error: 1 - robust acc.")
@click.option("--level", type=float, default=0.95, show_default=True, help="Confidence level of the interval.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False),
              help="Also plot the points and fits here (.png, .svg or .pdf; needs matplotlib).")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def scaling_cmd(model: str | None, dataset: str | None, norm: str | None, attack: str | None, quantity: str,
                level: float, fmt: str, output: str | None, db: str | None) -> None:
    """Fit err(eps) = c * eps^k to each eps sweep in the leaderboard; print k with its confidence interval.

    One fit per model, defense, data set, norm and attack with at least 3 radii whose error is
    strictly between 0 and the ceiling.

    \b
    Example:
      robustkit eval --eps 0.02,0.03,0.05,0.07,0.1,0.15 --attack pgd
      robustkit report scaling --output scaling.png
    """
    # lazy: these import torch and pandas (the CLI must not import torch at import time)
    from robustkit.results.leaderboard import Leaderboard
    from robustkit.results.scaling import plot_scaling, reports_frame, scaling_reports

    frame = Leaderboard(db, create=False).frame(dataset=dataset, norm=norm, model=model, attack=attack)
    reports = scaling_reports(frame, quantity=quantity, level=level)
    if output:
        plot_scaling(reports, output, quantity=quantity)
        err.print(Text(f"Wrote {output}."))
    table = reports_frame(reports)
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
        return
    if fmt == "json":
        click.echo(table.to_json(orient="records", indent=2))
        return
    shown = Table(title=f"Power-law fits: {'clean - robust acc' if quantity == 'excess' else '1 - robust acc'} "
                  f"= c * eps^k ({level:.0%} interval)")
    rows = []
    for _, r in table.iterrows():
        name = f"{r['model']} + {r['defense']}" if r["defense"] else r["model"]
        fitted = math.isfinite(r["exponent"])
        rows.append([name, r["attack"], r["norm"], f"{r['fitted']}/{r['points']}",
                     f"{r['eps_min']:.3g}–{r['eps_max']:.3g}" if fitted else "",
                     f"{r['exponent']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if fitted else r["note"],
                     f"{r['r2']:.3f}" if fitted else ""])
    names = ("model", "attack", "norm", "fit/pts", "eps range", "k [interval]", "R²")
    for i, col in enumerate(names):
        numeric = i >= 3  # never shortened; the names are
        shown.add_column(col, justify="right" if numeric else "left", no_wrap=numeric,
                         min_width=max([len(col)] + [len(row[i]) for row in rows]) if numeric and i != 5 else None)
    for row in rows:
        shown.add_row(*row)
    out.print(shown)
