"""`robustkit leaderboard`: show or export the results store, or compare it with RobustBench."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import err, out

if TYPE_CHECKING:
    from robustkit.results.leaderboard import ResultRow


@click.command("leaderboard")
@click.option(
    "--format", "fmt", default="table", show_default=True,
    type=click.Choice(["table", "csv", "md", "json", "html", "robustbench"]),
    help="robustbench: one RobustBench model-info JSON per model, into the folder --output.",
)
@click.option("--output", type=click.Path(), help="Write to this file (a folder for robustbench) instead of stdout.")
@click.option("--compare", "compare_with", type=click.Path(),
              help="Show robustkit's numbers beside those of RobustBench model-info JSON (a file or a folder).")
@click.option("--dataset", help="Only rows of this dataset.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def leaderboard_cmd(
    fmt: str, output: str | None, compare_with: str | None, dataset: str | None, norm: str | None,
    model: str | None, db: str | None
) -> None:
    """Show or export the leaderboard, or compare it with RobustBench's numbers.

    \b
    Examples:
      robustkit leaderboard
      robustkit leaderboard --format csv --output results.csv --dataset cifar10
      robustkit leaderboard --format md --norm linf
      robustkit leaderboard --format robustbench --output model_info
      robustkit leaderboard --compare robustbench/model_info/cifar10/Linf
    """
    from robustkit.results.leaderboard import Leaderboard, export

    board = Leaderboard(db, create=False)
    if fmt == "robustbench" or compare_with is not None:
        _robustbench_leaderboard(board.rows(dataset=dataset, norm=norm, model=model), fmt, output, compare_with)
        return
    frame = board.frame(dataset=dataset, norm=norm, model=model)
    if fmt == "table" and output is None:
        cols = ["model", "dataset", "norm", "eps_str", "attack", "clean_acc", "robust_acc", "n_examples"]
        table = Table(title=f"leaderboard ({len(frame)} rows)")
        for c in cols:
            table.add_column(c, justify="right" if frame[c].dtype.kind in "fi" else "left")
        for _, r in frame[cols].iterrows():
            table.add_row(
                *(
                    f"{100 * v:.2f}%" if c.endswith("_acc") else f"{v:.1f}" if c == "seconds" else str(v)
                    for c, v in r.items()
                )
            )
        out.print(table)
        return
    text = export(frame, fmt, output)
    if output is None:
        click.echo(text)
    else:
        err.print(Text(f"Wrote {len(frame)} rows to {output}."))


def _robustbench_leaderboard(rows: list[ResultRow], fmt: str, output: str | None, compare_with: str | None) -> None:
    """``--format robustbench`` (model-info files) and ``--compare`` (a table of differences)."""
    from robustkit.errors import UsageError
    from robustkit.results import robustbench as rbf
    from robustkit.results.leaderboard import export

    if compare_with is None:
        if output is None:
            raise UsageError("--format robustbench writes one JSON file per model into a folder; give --output DIR.")
        written, skipped = rbf.export_model_info(rows, output)
        for name in skipped:
            err.print(Text(f"skipped {name}: RobustBench has no leaderboard for it.", style="yellow"), soft_wrap=True)
        err.print(Text(f"Wrote {len(written)} RobustBench model-info file(s) to {output}:"))
        for path in written:
            click.echo(path)
        return
    if fmt == "robustbench":
        raise UsageError("--compare shows a table; use --format table, csv, md, json or html with it.")
    frame, missing = rbf.compare(rows, compare_with)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        err.print(Text(f"{len(missing)} model(s) in {compare_with} have no robustkit result: {shown}",
                       style="yellow"), soft_wrap=True)
    if fmt != "table" or output is not None:
        text = export(frame, fmt, output)
        if output is None:
            click.echo(text, nl=False)
        else:
            err.print(Text(f"Wrote {len(frame)} rows to {output}."))
        return
    table = Table(title="robustkit vs RobustBench model info (accuracy in %)",
                  caption="diff = robustkit - file; attacks and file paths: --format csv")
    heads = {"model": "model", "eps": "eps", "clean_acc": "clean", "clean_acc_file": "file", "clean_diff": "diff",
             "robust_acc": "robust", "robust_acc_file": "file", "robust_diff": "diff", "n_examples": "n"}
    longest = max([len(str(m)) for m in frame["model"]] + [5])
    for column, head in heads.items():
        table.add_column(head, justify="left" if column == "model" else "right", no_wrap=True,
                         min_width=longest if column == "model" else None)
    for _, r in frame.iterrows():
        table.add_row(*(f"{r[c]:+.2f}" if c.endswith("_diff") else f"{r[c]:.2f}" if c.endswith(("_acc", "_file"))
                        else str(r[c]) for c in heads))
    out.print(table)

