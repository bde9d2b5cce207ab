"""`robustkit leaderboard`: the ranked view (default), the raw rows (--rows), exports, and the
comparison with RobustBench."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

import robustkit.cli.console as cli_console
from robustkit import radii
from robustkit.cli.console import err, out
from robustkit.errors import UsageError
from robustkit.paths import check_file, make_dir
from robustkit.units import eps_str

if TYPE_CHECKING:
    from robustkit.results.leaderboard import Leaderboard, ResultRow
    from robustkit.results.ranked import ExtraColumn, Group

VIEW_FORMATS = ("table", "csv", "md", "json", "html")


@click.command("leaderboard")
@click.option(
    "--format", "fmt", default="table", show_default=True,
    type=click.Choice([*VIEW_FORMATS, "robustbench"]),
    help="Export the view shown (the ranked one, or --rows); robustbench: one RobustBench model-info JSON "
         "per model, into the folder --output.",
)
@click.option("--rows", "raw", is_flag=True,
              help="Every stored row (one per model, checkpoint, eps, attack and config) instead of the ranked view.")
@click.option("--output", type=click.Path(), help="Write to this file (a folder for robustbench) instead of stdout.")
@click.option("--compare", "compare_with", type=click.Path(),
              help="Show robustkit's numbers beside those of RobustBench model-info JSON (a file or a folder).")
@click.option("--dataset", help="Only rows of this dataset (its training split: NAME:train).")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1", "l0"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def leaderboard_cmd(
    fmt: str, raw: bool, output: str | None, compare_with: str | None, dataset: str | None, norm: str | None,
    model: str | None, db: str | None
) -> None:
    """Show the leaderboard ranked like RobustBench's, export it, or compare it with RobustBench.

    Per data set and norm, one row per model (with its defense, checkpoint and number of points),
    ranked by robust accuracy at the radius marked *: the data set's standard one (CIFAR-10: 8/255
    Linf, 0.5 L2; MNIST: 0.3 Linf, 2 L2), else the largest radius every model has. Each radius
    column is the worst case over every attack stored there, followed by the attack that gave it;
    RobustBench reports AutoAttack, whose own accuracy gets a column (AA) when it ran. Accuracy in %.

    The terminal table leaves out an n column that every row shares (the title gives n) and an
    all-empty defense column; on a narrow terminal it drops, in this order: the attack names
    after the numbers (those at the ranking radius last), then radii other than the ranking one
    (smallest first), then wraps model names. The raw rows (--rows) drop seconds, then an
    all-empty defense column, then wrap the attack labels. The exports (--format) always hold every column.

    \b
    Examples:
      robustkit leaderboard
      robustkit leaderboard --dataset cifar10 --norm linf
      robustkit leaderboard --rows --model resnet20          # every stored row
      robustkit leaderboard --format html --output board.html
      robustkit leaderboard --format csv --output ranked.csv
      robustkit leaderboard --rows --format csv --output results.csv
      robustkit leaderboard --format robustbench --output model_info
      robustkit leaderboard --compare robustbench/model_info/cifar10/Linf
    """
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.leaderboard import Leaderboard

    board = Leaderboard(db, create=False)
    rows = board.rows(dataset=dataset, norm=norm, model=model)
    if fmt == "robustbench" or compare_with is not None:
        _robustbench_leaderboard(rows, fmt, output, compare_with)
        return
    if raw:
        _raw_view(board, rows, fmt, output, dataset, norm, model)
    else:
        _ranked_view(board, rows, fmt, output)


def standard_eps(dataset: str, norm: str, models: Sequence[str]) -> float | None:
    """The data set's standard radius: RobustBench's (CIFAR-10/100, ImageNet), else the papers' one
    robustkit eval uses (MNIST); images from a file (npz:) count as the data set their models are
    built for (only they import the model registry, and with it torch)."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.labels import dataset_of_label

    name = dataset_of_label(dataset).lower()  # the training split has the test split's radius
    if name.startswith("npz:"):
        # lazy: the model registry imports torch; only images from a file need it
        from robustkit.evaluation.grid import default_dataset

        built_for = {default_dataset(m) for m in models}
        if len(built_for) != 1:
            return None
        name = built_for.pop()
    return radii.standard_eps(name, norm)


def extra_columns(board: Leaderboard) -> list[ExtraColumn]:
    """Per-model columns added to the ranked view and all its exports: where minimum-norm attacks
    stored robustness curves for a model entry (same model, checkpoint, defense, data, n, norm),
    the smallest median distance over those curves and the attack that gave it."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.curves import CurveStore
    from robustkit.results.ranked import ExtraColumn
    curves = CurveStore(board, create=False).curves()
    if not curves:
        return []

    def key(obj: object) -> tuple[object, ...]:
        return tuple(getattr(obj, f) for f in ("model", "checkpoint_sha256", "defense", "dataset", "norm",
                                               "n_examples"))

    def median_distance(entry_rows: list[ResultRow]) -> str | None:
        mine = [c for c in curves if key(c) == key(entry_rows[0]) and c.summary.median is not None]
        if not mine:
            return None
        best = min(mine, key=lambda c: c.summary.median)
        return f"{best.summary.median:.4g} ({best.attack})"

    return [ExtraColumn("median distance", median_distance)]


def _write(text: str, output: str | None, what: str) -> None:
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    path = check_file(output, "--output")
    make_dir(path.parent, "--output")
    path.write_text(text, encoding="utf-8")
    err.print(Text(f"Wrote {what} to {output}."))


def _ranked_view(board: Leaderboard, rows: list[ResultRow], fmt: str, output: str | None) -> None:
    # lazy: the CLI must not import pandas at import time
    from robustkit.results import ranked

    groups = ranked.build_groups(rows, standard_eps, extra_columns(board))
    what = f"the ranked view ({sum(len(g.entries) for g in groups)} models)"
    if fmt == "table" and output is None:
        if not groups:
            out.print("No rows in the leaderboard match the filters.")
        for group in groups:
            out.print(_fit(lambda drop, g=group: _ranked_table(g, drop), 2 + len(group.eps), out.width))
        return
    if fmt == "html":
        # lazy: the CLI must not import pandas at import time
        from robustkit.results.html_page import ranked_page

        text = ranked_page(groups, rows)
    elif fmt == "json":
        text = json.dumps(ranked.to_records(groups), indent=2) + "\n"
    elif fmt == "md":
        text = ranked.to_markdown(groups)
    elif fmt == "csv":
        text = ranked.to_frame(groups).to_csv(index=False)
    else:  # "table" into a file: the tables as the terminal shows them, 120 columns, no colour
        console = Console(file=io.StringIO(), width=120, color_system=None)
        for group in groups:
            console.print(_fit(lambda drop, g=group: _ranked_table(g, drop), 2 + len(group.eps), 120))
        text = console.file.getvalue()  # type: ignore[attr-defined]
    _write(text, output, what)


def _raw_view(board: object, rows: list[ResultRow], fmt: str, output: str | None,
              dataset: str | None, norm: str | None, model: str | None) -> None:
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.leaderboard import export

    if fmt == "table" and output is None:
        if not rows:
            out.print("No rows in the leaderboard match the filters.")
        for table in _raw_tables(rows):
            out.print(table)
        return
    if fmt == "html":
        # lazy: the CLI must not import pandas at import time
        from robustkit.results.html_page import raw_page

        _write(raw_page(rows), output, f"{len(rows)} rows")
        return
    frame = board.frame(dataset=dataset, norm=norm, model=model)  # type: ignore[attr-defined]
    text = export(frame, fmt, None)
    _write(text, output, f"{len(frame)} rows")


# -- terminal tables ------------------------------------------------------------------------------

def _fit(build: Callable[[int], Table], steps: int, width: int) -> Table:
    """The first of ``build(0)``, ``build(1)``, ... ``build(steps)`` (each dropping one more thing)
    that fits ``width`` columns; the last one otherwise (rich then wraps its cells)."""
    for drop in range(steps + 1):
        table = build(drop)
        if Measurement.get(cli_console.out, cli_console.out.options.update(width=10_000), table).maximum <= width:
            return table
    return table


def _ranked_table(group: Group, drop: int) -> Table:
    """``drop``: 0 everything, 1 the attack name only at the ranking radius, 2 no attack names, 3+ also
    radii other than the ranking one (smallest first, one more per step). An n column every row
    shares and an all-empty defense column are left out."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.ranked import text_rows

    eps = list(group.eps)
    for _ in range(max(0, drop - 2)):
        others = [e for e in eps if e != group.ranking_eps]
        if others:
            eps.remove(others[0])
    marks = True if drop == 0 else [group.ranking_eps] if drop == 1 else False
    heads, lines = text_rows(group, marks=marks, eps=eps, compact=True, autoattack_head="AA")
    note = "* ranking radius; each radius: the worst case over its attacks"
    if group.has_autoattack:
        note = f"AA: AutoAttack's robust accuracy at {group.ranking_eps}; " + note
    note += ", attack after it" if drop == 0 else " (attack after it at *)" if drop == 1 else ""
    if len(eps) < len(group.eps):
        left = len(group.eps) - len(eps)
        note += f"; {left} {'radius' if left == 1 else 'radii'} left out (narrow terminal: --format md or html)"
    table = Table(title=group.title, title_justify="left", caption=note, caption_justify="left")
    for head in heads:
        number = head in ("#", "n", "clean") or head[:1].isdigit() or head == "AA"
        table.add_column(head, justify="right" if number else "left", no_wrap=head != "model")
    for entry, line in zip(group.entries, lines, strict=True):
        table.add_row(*line, style="yellow" if entry.random_weights else None)
    return table


def _raw_tables(rows: list[ResultRow]) -> list[Table]:
    """``--rows``: one table per data set and norm; each row with its defense, checkpoint and attack label."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.labels import attack_labels, checkpoint_label, is_random_weights
    from robustkit.results.ranked import percent

    labels = attack_labels(rows)
    tables = []
    for (dataset, norm), group in groupby(rows, key=lambda r: (r.dataset, r.norm)):
        group = list(group)

        def build(drop: int, group: list[ResultRow] = group, dataset: str = dataset, norm: str = norm) -> Table:
            heads = ["model", "defense", "checkpoint", "eps", "attack", "clean", "robust", "n", "seconds"]
            ns = {r.n_examples for r in group}
            skip = {"n"} if len(ns) == 1 else set()
            skip |= {"seconds"} if drop >= 1 else set()
            if drop >= 2 and not any(r.defense for r in group):
                skip.add("defense")
            points = f" · {min(ns)} points" if len(ns) == 1 else ""
            table = Table(title=f"{dataset} · {norm}{points} · {len(group)} rows", title_justify="left")
            for h in heads:
                if h not in skip:
                    right = h in ("eps", "clean", "robust", "n", "seconds")
                    table.add_column(h, justify="right" if right else "left", no_wrap=h not in ("model", "attack"))
            for r in group:
                values = {"model": r.model, "defense": r.defense or "-", "checkpoint": checkpoint_label(r),
                          "eps": eps_str(r.eps), "attack": labels[id(r)], "clean": percent(r.clean_acc, 2),
                          "robust": percent(r.robust_acc, 2), "n": str(r.n_examples), "seconds": f"{r.seconds:.1f}"}
                table.add_row(*(values[h] for h in heads if h not in skip),
                              style="yellow" if is_random_weights(r) else None)
            return table

        tables.append(_fit(build, 2, out.width))
    return tables


def _robustbench_leaderboard(rows: list[ResultRow], fmt: str, output: str | None, compare_with: str | None) -> None:
    """``--format robustbench`` (model-info files) and ``--compare`` (a table of differences)."""
    # lazy: the CLI must not import torch at import time
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
