"""`robustkit list`: registered names, or RobustBench's model zoo."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from robustkit.catalog import catalog, defense_kinds
from robustkit.cli.console import fitted_table, out


@click.command("list")
@click.argument("what", type=click.Choice(["models", "attacks", "defenses", "datasets"]))
@click.option("--source", type=click.Choice(["robustkit", "robustbench"]), default="robustkit", show_default=True,
              help="robustbench: the names of RobustBench's model zoo (needs robustkit[robustbench]).")
@click.option("--dataset", help="With --source robustbench: cifar10, cifar100 or imagenet (default: all).")
@click.option("--threat-model", help="With --source robustbench: Linf, L2, corruptions, ... (default: all).")
def list_cmd(what: str, source: str, dataset: str | None, threat_model: str | None) -> None:
    """List registered names (with aliases), or RobustBench's model zoo.

    Names are never cut; on a terminal narrower than the table, descriptions wrap and the aliases
    move into the description column.

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
    columns = [("name", "key")] + ([("kind", "key")] if kinds else []) + [("aliases", "text"), ("description", "text")]
    kind_of = defense_kinds() if kinds else {}
    cells = [[name] + ([kind_of.get(name, "")] if kinds else [])
             + [", ".join(aliases), description] for name, aliases, description in rows]
    table, dropped = fitted_table(what, columns, cells, width=out.width, drop=["aliases"])
    if dropped:  # a narrow terminal: the aliases go under the description
        cells = [c[:-2] + [c[-1] + (f" (aliases: {c[-2]})" if c[-2] else "")] for c in cells]
        table, _ = fitted_table(what, columns[:-2] + columns[-1:], cells, width=out.width)
    out.print(table)
