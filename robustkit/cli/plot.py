"""`robustkit plot`: robust accuracy against eps from the leaderboard, or its stored curves."""

from __future__ import annotations

import click
from rich.text import Text

from robustkit.cli.console import err
from robustkit.errors import DataError, UsageError


@click.command("plot")
@click.option("--curve", is_flag=True,
              help="Security-evaluation curves stored by minimum-norm runs (eval --attack fmn ...), "
                   "not the leaderboard's rows.")
@click.option("--metric", default="robust_acc", show_default=True,
              type=click.Choice(["robust_acc", "clean_acc", "seconds"]))
@click.option("--x", "x_axis", default="eps", show_default=True, type=click.Choice(["eps", "n_examples"]))
@click.option("--output", default="robustness.png", show_default=True, type=click.Path(dir_okay=False),
              help="A .png, .svg or .pdf file.")
@click.option("--dataset", help="Only rows of this dataset (its training split: NAME:train).")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1", "l0"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--attack", help="Only rows of this attack (e.g. worst-case).")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def plot_cmd(curve: bool, metric: str, x_axis: str, output: str, dataset: str | None, norm: str | None,
             model: str | None, attack: str | None, db: str | None) -> None:
    """Plot robust accuracy against eps: a panel per data set and norm, a colour per model, a line
    style per attack, each line starting at the clean accuracy at eps 0 (needs matplotlib).

    \b
    Examples:
      robustkit plot --output robustness.png
      robustkit plot --dataset cifar10 --norm linf --attack worst-case --output curves.svg
      robustkit plot --curve --output curve.png      # curves of minimum-norm attacks
    """
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.plot import check_output

    check_output(output, make_folder=False)  # before reading anything
    if curve:
        path = _plot_curves(db, output, dataset=dataset, norm=norm, model=model, attack=attack,
                            metric=metric, x_axis=x_axis)
    else:
        # lazy: the CLI must not import pandas at import time
        from robustkit.results.leaderboard import Leaderboard
        from robustkit.results.plot import plot_leaderboard

        frame = Leaderboard(db, create=False).frame(dataset=dataset, norm=norm, model=model)
        path = plot_leaderboard(frame, output, metric=metric, x=x_axis, attack=attack)
    err.print(Text(f"Wrote {path}."))


def _plot_curves(db: str | None, output: str, *, metric: str, x_axis: str, **filters: str | None) -> object:
    """``plot --curve``: the stored curves, filtered like the leaderboard's rows."""
    if metric != "robust_acc" or x_axis != "eps":
        raise UsageError("--curve draws robust accuracy against eps; leave out --metric and --x.")
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.plot import plot_curves

    frame = _curve_frame(db)
    for column, value in filters.items():
        if value is not None:
            frame = frame[frame[column] == value]
    if frame.empty:
        raise DataError("No robustness curves stored for this selection; run a minimum-norm attack first, e.g. "
                        "`robustkit eval --attack fmn --norm l2`.")
    return plot_curves(frame, output)


def _curve_frame(db: str | None) -> object:
    """The leaderboard's stored curves, one row per eps point (robustkit.results.curves)."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.curves import curve_frame

    return curve_frame(db)
