"""What the CLI shows: the two consoles (stdout tables, stderr messages and bars), eps as a
click type, progress: rich bars on a terminal, plain lines every 10 s or 10% when stderr is
not one (a log file, a batch job), and under torchrun one display on rank 0 with every rank's
figures."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from robustkit.cli.budget import budget_of, cost_line
from robustkit.units import parse_eps

out = Console()
err = Console(stderr=True)


class EpsType(click.ParamType):
    """eps as a number or a fraction such as 8/255."""

    name = "eps"

    def convert(self, value, param, ctx):  # noqa: ANN001
        return value if isinstance(value, float) else parse_eps(value)



def fitted_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], *, width: int,
                 drop: Sequence[str] = (), text_min: int = 24) -> tuple[Table, list[str]]:
    """A table that fits ``width`` terminal columns: ``columns`` are ``(header, kind)`` with kind
    ``key`` (a name: never wrapped or cut), ``number`` (right-aligned, never wrapped) or ``text``
    (wraps, at least ``text_min`` wide); columns named in ``drop`` are left out, in that order, until
    the rest fits. Returns the table and the headers dropped (say so under the table)."""
    keep = list(range(len(columns)))

    def need(cols: list[int]) -> int:
        total = 3 * len(cols) + 1  # borders and padding
        for i in cols:
            cells = [cell_len(columns[i][0])] + [max((cell_len(w) for w in str(r[i]).split()), default=0)
                                                 if columns[i][1] == "text" else cell_len(str(r[i])) for r in rows]
            widest = max(cells)
            if columns[i][1] == "text":
                widest = max(widest, min(text_min, max([cell_len(str(r[i])) for r in rows] + [0])))
            total += widest
        return total

    dropped: list[str] = []
    for name in drop:
        if need(keep) <= width:
            break
        keep = [i for i in keep if columns[i][0] != name]
        dropped.append(name)
    table = Table(title=title)
    for i in keep:
        header, kind = columns[i]
        longest = max([cell_len(header)] + [cell_len(str(r[i])) for r in rows])
        if kind == "text":
            table.add_column(header, overflow="fold")
        else:
            table.add_column(header, justify="right" if kind == "number" else "left", no_wrap=True, min_width=longest)
    for r in rows:
        table.add_row(*(r[i] if isinstance(r[i], Text) else Text(str(r[i])) for i in keep))
    return table, dropped


LINE_INTERVAL_S = 10.0  # plain progress lines: at most this long apart while work goes on (and every 10%)


def plain() -> bool:
    """Progress as plain lines: stderr is not a terminal (redirected to a file or a pipe)."""
    return not err.is_terminal


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class _LineClock:
    """When a plain progress line is due: every ``interval`` seconds, and each time the work
    crosses another tenth (a new run of work, its fraction going back, starts the tenths over)."""

    def __init__(self, interval: float = LINE_INTERVAL_S):
        self.interval = interval
        self.last = -math.inf
        self.tenth = -1
        self.fraction = -1.0

    def due(self, fraction: float) -> bool:
        now = time.monotonic()
        if fraction < self.fraction:
            self.tenth = -1
        self.fraction = fraction
        tenth = min(int(fraction * 10 + 1e-9), 10)
        if tenth > self.tenth or now - self.last >= self.interval:
            self.tenth, self.last = max(tenth, self.tenth), now
            return True
        return False


def _line(text: str) -> None:
    err.print(text, highlight=False, soft_wrap=True)


def _status(status: str) -> str:
    """A bar's status (parts two spaces apart) as a line's: comma-separated."""
    return ", ".join(part.strip() for part in status.split("  ") if part.strip())


class StepBar:
    """One transient bar on stderr for a run of steps (training epochs, RiFT stages): started by the
    first :meth:`update` that names a step, stopped when the ``with`` block ends. When stderr is not
    a terminal, plain lines instead (step, status, elapsed, remaining) every 10 s and every 10%."""

    def __init__(self, width: int = 14, *, lines: bool | None = None):
        self.lines = plain() if lines is None else lines
        self.progress = Progress(TextColumn(f"{{task.description:>{width}}}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err,
                                 transient=True)
        self.task: int | None = None
        self.clock = _LineClock()
        self.started = self.run_started = 0.0
        self.first_step = 0
        self.state: dict[str, Any] = {}

    def update(self, description: str | None = None, step: int | None = None, steps: int | None = None,
               status: str = "") -> None:
        """Show ``step`` of ``steps``; without a description, only the status of a started bar."""
        if self.lines:
            self._print(description, step, steps, status)
            return
        if self.task is None:
            if description is None:
                return
            self.progress.start()
            self.task = self.progress.add_task(description, total=steps, status="")
        self.progress.update(self.task, description=description, completed=step, total=steps, status=status)

    def _print(self, description: str | None, step: int | None, steps: int | None, status: str) -> None:
        now = time.monotonic()
        if description is None:  # a status only: the run's figures at its end (the epoch's metrics)
            if self.state:
                _line(f"{self.state['description']} done: {_status(status)}; "
                      f"{_duration(now - self.started)} elapsed")
            return
        if not self.state:
            self.started = now
        if description != self.state.get("description"):
            self.run_started, self.first_step = now, step or 0
        self.state = {"description": description, "step": step, "steps": steps, "status": status}
        fraction = step / steps if step is not None and steps else 0.0
        if self.clock.due(fraction):
            self._emit(now)

    def _emit(self, now: float) -> None:
        st = self.state
        step, steps = st["step"], st["steps"]
        where = f"{st['description']}: step {step}/{steps}" if steps else f"{st['description']}: step {step}"
        if steps and step:
            where += f" ({100 * step / steps:.0f}%)"
        status = f", {_status(st['status'])}" if st.get("status") else ""
        left = ""
        if steps and step and self.first_step < step < steps:  # the rate from the steps seen in this run
            rate = (now - self.run_started) / (step - self.first_step)
            left = f", ~{_duration(rate * (steps - step))} left in {st['description']}"
        _line(f"{where}{status}; {_duration(now - self.started)} elapsed{left}")

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()


def _launch_key() -> str:
    """What the workers of one torchrun launch share (their progress notes' folder name)."""
    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    return hashlib.sha256("/".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()[:12]


class ProgressBars:
    """Progress of ``robustkit eval``: a line saying what the run will cost (:meth:`plan`), then per
    cell (model, eps) a bar in points that moves with every attack step (the attacks' model calls
    against their budget, :func:`robustkit.attack.watch`), the running robust accuracy of the
    finished batches, and an overall bar over the cells. Plain lines instead when stderr is not a
    terminal. Under torchrun only rank 0 shows anything, with the figures of all ranks (the others
    write theirs into a small file per rank next to the batch caches, read once a second)."""

    def __init__(self, enabled: bool, cells: int, *, lines: bool | None = None):
        self.enabled = enabled
        self.cells = cells
        self.lines = plain() if lines is None else lines
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err)
        self.tasks: dict[str, int] = {}
        self.lock = threading.RLock()
        self.clock = _LineClock()
        self.started = time.monotonic()
        self.rank, self.world = 0, 1
        self.points = 0  # of the data set (all ranks)
        self.batch_size = 1
        self.classes = 10
        self.calls_per_batch: dict[str, int | None] = {}  # per attack (by its config) on one batch
        self.notes: Path | None = None
        self._cell: dict[str, Any] = {}
        self._others: dict[int, dict[str, list[float]]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._watch: Any = None
        self._last_draw = 0.0
        self.redraw_s = 0.1  # at most 10 redraws a second from the attacks' steps
        self._last_note = 0.0
        self.cells_done = 0
        self._shown: tuple = ()
        self._cost = ""

    # -- what the grid tells ---------------------------------------------------------------------------
    def plan(self, grid: Any) -> None:
        """Before any work: say what the run costs; learn the points, batch size and attacks."""
        # lazy: the CLI must not import torch at import time
        from robustkit.distributed import world

        self.rank, self.world = world()
        self.points = len(grid.dataset)
        self.batch_size = max(int(grid.spec.batch_size), 1)
        attacks = grid.attacks(grid.threats[0]) if grid.threats else []
        classes = self.classes = int(getattr(grid.dataset, "num_classes", 10) or 10)
        for name, attack in attacks:
            self.calls_per_batch[name] = budget_of(name, attack, classes).calls
        if self.world > 1:
            self.notes = Path(grid.runs) / f"progress-{_launch_key()}"
            self.notes.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and self.enabled and attacks:  # said when the first cell starts (model loaded, checked)
            ranks = f" on {self.world} workers" if self.world > 1 else ""
            self._cost = f"eval: {cost_line(self.points, attacks, cells=self.cells, num_classes=classes)}{ranks}."
        if self.rank == 0 and self.world > 1 and self.enabled:
            self._poller = threading.Thread(target=self._poll, name="robustkit-progress", daemon=True)
            self._poller.start()

    def __call__(self, cell: str, done: int, total: int, robust: int, evaluated: int) -> None:
        """A batch is done (``done`` of ``total`` on this rank; 0 when the cell starts)."""
        with self.lock:
            if self._cost:
                err.print(Text(self._cost, style="cyan"), soft_wrap=True)
                self._cost = ""
            if self._cell.get("label") != cell:
                self._finish_cell()
                self._cell = {"label": cell, "batches": total, "done": 0, "robust": 0, "evaluated": 0,
                              "started": time.monotonic(), "calls": 0, "finished": 0, "attack": None, "stage": None}
            c = self._cell
            c.update(done=done, batches=total, robust=robust, evaluated=evaluated, calls=0, finished=0, attack=None,
                     stage=None, depth=0)
            self._show(force=done == total)
            if done == total and done:
                self.cells_done += 1
                if self.rank == 0 and "overall" in self.tasks:
                    self.progress.advance(self.tasks["overall"])

    def on_attack(self, event: str, attack: Any, n: int) -> None:
        """An attack's event (:func:`robustkit.attack.watch`): count its model calls."""
        c = self._cell
        if not c:
            return
        if event == "call":
            c["calls"] += 1
        elif event == "start":
            c["depth"] = c.get("depth", 0) + 1
            if c["depth"] == 1:
                c["attack"], c["calls"], c["stage"] = attack, 0, None
        elif event == "end":
            c["depth"] = max(c.get("depth", 1) - 1, 0)
            if c["depth"] == 0:
                c["finished"] += self._calls_of(attack) or 0
                c["attack"], c["calls"], c["stage"] = None, 0, None
        elif event == "stage":
            c["stage"] = (attack, c["calls"])
        now = time.monotonic()
        if now - self._last_draw >= self.redraw_s:
            self._last_draw = now
            with self.lock:
                self._show()

    # -- figures -----------------------------------------------------------------------------------------
    def _calls_of(self, attack: Any) -> int | None:
        if attack is None:
            return None
        cache = self._cell.setdefault("budgets", {})  # per cell: its attack objects live as long as it runs
        if id(attack) not in cache:
            cache[id(attack)] = budget_of(getattr(attack, "name", "attack"), attack, self.classes).calls
        return cache[id(attack)]

    def _batch_fraction(self) -> float:
        """How far this rank's current batch is: model calls made against the attacks' budgets."""
        c = self._cell
        known = [v for v in self.calls_per_batch.values() if v]
        total = sum(known)
        if not total:
            return 0.0
        now = c["calls"] if c.get("attack") is not None else 0
        cap = self._calls_of(c.get("attack")) or now
        return min((c["finished"] + min(now, cap)) / total, 0.99)

    def _mine(self) -> list[float]:
        """[points done (with the current batch's fraction), robust, evaluated] on this rank."""
        c = self._cell
        shard = len(range(self.rank * self.batch_size, self.points, self.batch_size * self.world))
        mine_points = sum(min(self.batch_size, self.points - s)
                          for s in range(self.rank * self.batch_size, self.points, self.batch_size * self.world))
        current = min(self.batch_size, max(mine_points - c["evaluated"], 0)) if c["done"] < shard else 0
        return [c["evaluated"] + current * self._batch_fraction(), c["robust"], c["evaluated"]]

    def _figures(self) -> tuple[float, int, int]:
        done, robust, evaluated = self._mine()
        for cells in self._others.values():
            other = cells.get(self._cell["label"])
            if other:
                done, robust, evaluated = done + other[0], robust + int(other[1]), evaluated + int(other[2])
        return done, robust, evaluated

    def _what(self, short: bool = False) -> str:
        c = self._cell
        attack = c.get("attack")
        if attack is None:
            return ""
        name = getattr(attack, "name", "attack")
        calls, budget = c["calls"], self._calls_of(attack)
        stage = c.get("stage")
        if stage is not None:
            sub = stage[0]
            name = f"{name} › {getattr(sub, 'name', 'stage')}"
            calls, budget = calls - stage[1], self._calls_of(sub)
        step = "" if short else " step"
        return f"{name}{step} {min(calls, budget)}/{budget}" if budget else f"{name}{step} {calls}"

    # -- display -------------------------------------------------------------------------------------------
    def _show(self, force: bool = False) -> None:
        if self.world > 1 and self.rank:
            self._write_note(force)
            return
        if not self.enabled or not self._cell:
            return
        if self.world > 1 and (force or time.monotonic() - self._last_note >= 0.5):  # rank 0: the others' notes
            self._last_note = time.monotonic()
            self._read_notes()
        done, robust, evaluated = self._figures()
        total = self.points or 1
        if self.lines:
            acc = (f"robust {100 * robust / evaluated:.1f}% of {evaluated}" if evaluated
                   else "robust: first batch running")
        else:  # a terminal line is short: the bar shows the points
            acc = f"robust {100 * robust / evaluated:.1f}%" if evaluated else ""
        status = ", ".join(filter(None, [self._what(short=not self.lines), acc]))
        label = self._cell["label"]
        if self.lines:
            shown = (label, round(done), robust, evaluated, status)
            if shown != self._shown and (self.clock.due(done / total) or force):
                self._shown = shown
                spent = time.monotonic() - self._cell["started"]
                left = f", ~{_duration(spent * (total - done) / done)} left" if 0 < done < total else ""
                ranks = f" ({self.world} workers)" if self.world > 1 else ""
                _line(f"eval {label}: {done:,.0f}/{total:,} points ({100 * done / total:.0f}%){ranks}, "
                      f"{status}; {_duration(spent)} elapsed{left}")
            return
        if not self.tasks:
            self.progress.start()
            if self.cells > 1:
                self.tasks["overall"] = self.progress.add_task("overall", total=self.cells, status="")
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, status="")
        self.progress.update(self.tasks[label], completed=done, total=total, status=status)

    def _write_note(self, force: bool) -> None:
        """A worker other than rank 0: its figures per cell, for rank 0's display (atomic replace)."""
        now = time.monotonic()
        if self.notes is None or not (force or now - self._last_note >= 1.0):
            return
        self._last_note = now
        cells = self.__dict__.setdefault("_my_cells", {})
        cells[self._cell["label"]] = self._mine()
        try:
            tmp = self.notes / f".rank_{self.rank:05d}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(cells))
            os.replace(tmp, self.notes / f"rank_{self.rank:05d}.json")
        except OSError:  # the display is best effort: rank 0 removed the folder at its end
            pass

    def _read_notes(self) -> None:
        others = {}
        for r in range(1, self.world):
            try:
                others[r] = json.loads((self.notes / f"rank_{r:05d}.json").read_text())  # type: ignore[operator]
            except (OSError, ValueError):
                continue
        self._others = others

    def _poll(self) -> None:
        """Rank 0: read the other ranks' notes once a second (also while it waits for their batches)."""
        while not self._stop.wait(1.0):
            with self.lock:
                self._read_notes()
                if self._cell:
                    self._show()

    def _finish_cell(self) -> None:
        """Rank 0 under torchrun, once a cell is merged (every rank posted): its global figures."""
        if self._cell and self.world > 1 and self.rank == 0 and self.notes is not None:
            self._read_notes()
            self._show(force=True)

    def __enter__(self) -> ProgressBars:
        if self.enabled:
            from robustkit.attack import watch  # imports torch: only once a run starts

            self._watch = watch(self.on_attack)
            self._watch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2)
        with self.lock:
            self._finish_cell()
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
        if self.notes is not None and self.rank == 0:
            shutil.rmtree(self.notes, ignore_errors=True)
        if self.tasks:
            self.progress.stop()
