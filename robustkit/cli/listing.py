"""`robustkit list`: registered names, or RobustBench's model zoo."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from robustkit.catalog import catalog
from robustkit.cli.console import out
from robustkit.registry import DEFENSES


@click.command("list")
@click.argument("what", type=click.Choice(["models", "attacks", "defenses", "datasets"]))
@click.option("--source", type=click.Choice(["robustkit", "robustbench"]), default="robustkit", show_default=True,
              help="robustbench: the names of RobustBench's model zoo (needs robustkit[robustbench]).")
@click.option("--dataset", help="With --source robustbench: cifar10, cifar100 or imagenet (default: all).")
@click.option("--threat-model", help="With --source robustbench: Linf, L2, corruptions, ... (default: all).")
def list_cmd(what: str, source: str, dataset: str | None, threat_model: str | None) -> None:
    """List registered names (with aliases), or RobustBench's model zoo.

    \b
    Examples:
      robustkit list models
      robustkit list models --source robustbench --dataset cifar10 --threat-model Linf
    """
    rows = catalog(what, source=source, dataset=dataset, threat_model=threat_model)
    if source == "robustbench":  # names never cut: they are what --model robustbench:NAME takes
        # lazy: imports torch (the CLI must not at import time)
        from robustkit.models.robustbench import parse_ref

        refs = [parse_ref(name) for name, _, _ in rows]
        split = not (dataset and threat_model)  # else both are in the title
        where = "" if split else f" {refs[0].dataset} {refs[0].threat_model}" if refs else f" {dataset} {threat_model}"
        usage = "robustbench:DATASET/THREAT_MODEL/NAME" if split else "robustbench:NAME"
        table = Table(title=f"RobustBench{where} model zoo ({len(rows)} models, --model {usage})")
        for col in ("dataset", "threat", "name") if split else ("name",):
            table.add_column(col, no_wrap=True)
        table.add_column("architecture", overflow="fold")
        for ref, (_, _, description) in zip(refs, rows, strict=True):
            cells = (ref.dataset, ref.threat_model, ref.name) if split else (ref.name,)
            table.add_row(*cells, Text(description))
        out.print(table)
        return
    kinds = what == "defenses"  # training, inference, architecture or data: where each one plugs in
    table = Table(title=what, show_lines=False)
    for col in ("name", "kind", "aliases", "description") if kinds else ("name", "aliases", "description"):
        table.add_column(col)
    for name, aliases, description in rows:
        kind = [Text(str(getattr(DEFENSES.get(name), "kind", "")))] if kinds else []
        table.add_row(Text(name), *kind, Text(", ".join(aliases)), Text(description))
    out.print(table)

