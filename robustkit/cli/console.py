"""What the CLI shows: the two consoles (stdout tables, stderr messages and bars), eps as a
click type, progress bars."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from robustkit.units import parse_eps

out = Console()
err = Console(stderr=True)


class EpsType(click.ParamType):
    """eps as a number or a fraction such as 8/255."""

    name = "eps"

    def convert(self, value, param, ctx):  # noqa: ANN001
        return value if isinstance(value, float) else parse_eps(value)



class StepBar:
    """One transient bar on stderr for a run of steps (training epochs, RiFT stages): started by the
    first :meth:`update` that names a step, stopped when the ``with`` block ends."""

    def __init__(self, width: int = 14):
        self.progress = Progress(TextColumn(f"{{task.description:>{width}}}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err,
                                 transient=True)
        self.task: int | None = None

    def update(self, description: str | None = None, step: int | None = None, steps: int | None = None,
               status: str = "") -> None:
        """Show ``step`` of ``steps``; without a description, only the status of a started bar."""
        if self.task is None:
            if description is None:
                return
            self.progress.start()
            self.task = self.progress.add_task(description, total=steps, status="")
        self.progress.update(self.task, description=description, completed=step, total=steps, status=status)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()


class ProgressBars:
    """Rich progress: one bar per cell (with its running robust accuracy) and one overall bar."""

    def __init__(self, enabled: bool, cells: int):
        self.enabled = enabled
        self.cells = cells
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err)
        self.tasks: dict[str, int] = {}

    def __call__(self, cell: str, done: int, total: int, robust: int, evaluated: int) -> None:
        if not self.enabled:
            return
        if not self.tasks:
            self.progress.start()
            self.tasks["overall"] = self.progress.add_task("overall", total=self.cells, status="")
        if cell not in self.tasks:
            self.tasks[cell] = self.progress.add_task(cell, total=total, status="")
        status = f"robust {100 * robust / max(evaluated, 1):.1f}%"
        self.progress.update(self.tasks[cell], completed=done, total=total, status=status)
        if done == total:
            self.progress.advance(self.tasks["overall"])

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

