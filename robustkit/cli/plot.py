"""`robustkit plot`: robustness curves from the leaderboard."""

from __future__ import annotations

import click
from rich.text import Text

from robustkit.cli.console import err


@click.command("plot")
@click.option("--metric", default="robust_acc", show_default=True,
              type=click.Choice(["robust_acc", "clean_acc", "seconds"]))
@click.option("--x", "x_axis", default="eps", show_default=True, type=click.Choice(["eps", "n_examples"]))
@click.option("--output", default="robustness.png", show_default=True, type=click.Path(dir_okay=False),
              help="A .png, .svg or .pdf file.")
@click.option("--dataset", help="Only rows of this dataset.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--attack", help="Only rows of this attack (e.g. worst-case).")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def plot_cmd(metric: str, x_axis: str, output: str, dataset: str | None, norm: str | None, model: str | None,
             attack: str | None, db: str | None) -> None:
    """Plot a metric against eps from the leaderboard, one line per model and attack (needs matplotlib).

    \b
    Example:
      robustkit plot --metric robust_acc --x eps --dataset cifar10 --output curves.svg
    """
    from robustkit.results.leaderboard import Leaderboard
    from robustkit.results.plot import plot_leaderboard

    frame = Leaderboard(db, create=False).frame(dataset=dataset, norm=norm, model=model)
    path = plot_leaderboard(frame, output, metric=metric, x=x_axis, attack=attack)
    err.print(Text(f"Wrote {path}."))

