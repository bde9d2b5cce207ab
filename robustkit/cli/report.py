"""``robustkit report``: analyses of the leaderboard: ``scaling`` (the power law in eps) and
``optimality`` (AttackBench's ranking of minimum-norm attacks against the per-sample envelope)."""

from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import fitted_table
from robustkit.errors import DataError
from robustkit.units import eps_label

out = Console()
err = Console(stderr=True)


@click.group("report")
def report_group() -> None:
    """Analyses of the leaderboard's results."""


SCALING_DROP = ("R²", "eps range", "fit/pts")  # left out in this order when the terminal is narrow


@report_group.command("scaling")
@click.option("--model", help="Only rows of this model.")
@click.option("--dataset", help="Only rows of this data set (its training split: NAME:train).")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1", "l0"]), help="Only rows of this norm.")
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

    The table fits the terminal: model and attack names are never cut; on a narrow terminal the
    columns R², eps range and fit/pts are left out, in that order (--format csv has them all).

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
    title = f"Power-law fits: {'clean - robust acc' if quantity == 'excess' else '1 - robust acc'} = c * eps^k"
    same = [c for c in ("dataset", "norm") if table[c].nunique() == 1] if len(table) else []
    if same:  # one data set / norm: said once, in the title
        title += " on " + ", ".join(str(table[c].iloc[0]) for c in same)
    rows = []
    for _, r in table.iterrows():
        name = f"{r['model']} + {r['defense']}" if r["defense"] else r["model"]
        fitted = math.isfinite(r["exponent"])
        rows.append([name, r["attack"], r["dataset"], r["norm"], f"{r['fitted']}/{r['points']}",
                     f"{eps_label(r['eps_min'])}–{eps_label(r['eps_max'])}" if fitted else "",
                     f"{r['exponent']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if fitted else r["note"],
                     f"{r['r2']:.3f}" if fitted else ""])
    columns = [("model", "key"), ("attack", "key"), ("dataset", "key"), ("norm", "key"), ("fit/pts", "number"),
               ("eps range", "number"), (f"k [{level:.0%} interval]", "text"), ("R²", "number")]
    keep = [i for i, (c, _) in enumerate(columns) if c not in same]
    shown, dropped = fitted_table(title, [columns[i] for i in keep], [[row[i] for i in keep] for row in rows],
                                  width=out.width, drop=SCALING_DROP, text_min=18)
    out.print(shown)
    if dropped:
        err.print(Text(f"(not shown at {out.width} columns: {', '.join(dropped)}; --format csv has every column)",
                       style="dim"))


@report_group.command("optimality")
@click.option("--model", help="Only curves of this model.")
@click.option("--dataset", help="Only curves of this data set.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1", "l0"]), help="Only curves of this norm.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def optimality_cmd(model: str | None, dataset: str | None, norm: str | None, fmt: str, db: str | None) -> None:
    """Rank the minimum-norm attacks run on the same points by AttackBench's optimality.

    For each model (checkpoint, defense), data set, n, norm and seed, the envelope is the
    smallest distance any stored attack found per point; an attack's optimality is
    1 - (A - A*) / (clean_acc * D - A*), A and A* the areas under its and the envelope's
    robustness curves up to the envelope's largest distance D (Cinà et al., 2024): 1 matches the
    envelope, 0 finds nothing. best-on: the share of points where the attack reaches the envelope.

    \b
    Example:
      robustkit eval --model resnet20 --checkpoint resnet20-12fca82f.th --attack fmn,ddn,alma --norm l2
      robustkit report optimality --norm l2
    """
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.curves import optimality_frame

    table = optimality_frame(db, model=model, dataset=dataset, norm=norm)
    if table.empty:
        raise DataError("No minimum-norm curves match in the leaderboard; `robustkit eval --attack fmn,ddn --norm l2` "
                        "(no --eps) stores them.")
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
        return
    if fmt == "json":  # attack_config nested, as eval --json has it; NaN as null
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        for record in records:  # inf (a median past the points found) as null too: JSON has no inf
            record.update({k: None for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)})
            record["attack_config"] = json.loads(record["attack_config"])
        click.echo(json.dumps(records, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        return
    for _, group in table.groupby(["model", "defense", "dataset", "norm", "n", "seed"], sort=False):
        first = group.iloc[0]
        defense = f" + {first['defense']}" if first["defense"] else ""
        shown = Table(title=f"Optimality: {first['model']}{defense} on {first['dataset']} (n={first['n']}, "
                            f"seed {first['seed']}), {first['norm']}")
        for col in ("rank", "attack", "optimality", "best on", "found", "median dist", "seconds"):
            shown.add_column(col, justify="left" if col == "attack" else "right", no_wrap=col != "attack")
        for _, r in group.iterrows():
            shown.add_row(str(r["rank"]), r["attack"], f"{r['optimality']:.4f}", f"{100 * r['best_on']:.1f}%",
                          f"{100 * r['found']:.1f}%", _distance(r["median_distance"], r["norm"]),
                          f"{r['seconds']:.1f}")
        out.print(shown)


def _distance(value: float, norm: str) -> str:
    """A distance, in k/255 for Linf (the images' unit)."""
    if math.isnan(value):
        return "-"
    if norm == "linf" and math.isfinite(value):
        return f"{value * 255:.2f}/255"
    return f"{value:.4g}"
