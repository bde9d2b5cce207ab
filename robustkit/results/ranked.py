"""The ranked leaderboard (``robustkit leaderboard``'s default view), RobustBench-like.

Per data set and norm, one row per evaluated model: model, defense, checkpoint and number of
points (two checkpoints of one architecture are two rows). Per radius, the *worst-case* robust
accuracy: the lowest robust accuracy any stored attack reached there, with the attack that gave
it (a cell's ``worst-case`` row, the point-wise worst case of its attacks, counts, and is named
only when it is lower than each of its attacks). RobustBench reports AutoAttack's accuracy;
robustkit ranks by the worst case over every attack it ran (never higher than AutoAttack's when
AutoAttack ran) and shows AutoAttack's own accuracy in an ``AutoAttack`` column whenever a group
has it, so both numbers can be read side by side. Rows are ranked by the worst-case robust
accuracy at the group's ranking radius: the data set's standard radius when some model has a
result there, else the largest radius every model has (else the largest any has); ties by
clean accuracy.

``extra_columns`` is the hook for more per-model numbers (e.g. a curve summary such as the
median minimum-norm distance): each gets the model's rows and returns a value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from robustkit.results.labels import (
    AGGREGATES,
    RANDOM_WEIGHTS,
    SHA_CHARS,
    attack_labels,
    checkpoint_label,
    is_random_weights,
)
from robustkit.results.leaderboard import ResultRow
from robustkit.units import eps_str

AUTOATTACK = ("autoattack", "pyautoattack")  # standard AutoAttack, robustkit's and the reference package's

# (dataset, norm, model names of the group) -> the standard radius, or None when there is none.
StandardEps = Callable[[str, str, Sequence[str]], "float | None"]


@dataclass(frozen=True)
class ExtraColumn:
    """A column added to the ranked view: ``value(rows of one model entry)`` (None: empty);
    ``percent`` renders a fraction as a percentage in the terminal, Markdown and HTML."""

    name: str
    value: Callable[[list[ResultRow]], float | str | None]
    percent: bool = False


@dataclass(frozen=True)
class Cell:
    """One radius of one model entry: the worst-case robust accuracy and the attack that gave it."""

    robust_acc: float
    attack: str


@dataclass
class Entry:
    """One model row of the ranked view."""

    model: str
    defense: str
    checkpoint: str  # the short label (file stem, 8-character sha256, "random weights")
    checkpoint_sha256: str
    n_examples: int
    clean_acc: float
    random_weights: bool
    cells: dict[str, Cell]  # eps text -> cell
    autoattack: float | None  # AutoAttack's robust accuracy at the ranking radius
    extras: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None  # None: no result at the ranking radius


@dataclass
class Group:
    """The ranked table of one data set and norm."""

    dataset: str
    norm: str
    eps: list[str]  # radii as text, ascending
    ranking_eps: str
    standard: bool  # whether ranking_eps is the data set's standard radius
    entries: list[Entry]
    has_autoattack: bool
    extra_columns: list[ExtraColumn]

    @property
    def title(self) -> str:
        why = "the standard radius" if self.standard else "the largest radius every model has"
        ns = {e.n_examples for e in self.entries}
        points = f" · {ns.pop()} points" if len(ns) == 1 else ""
        return f"{self.dataset} · {self.norm}{points} · ranked by robust accuracy at {self.ranking_eps} ({why})"


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _pick(rows: list[ResultRow], labels: dict[int, str]) -> Cell | None:
    """The lowest robust accuracy among ``rows``; on a tie AutoAttack, then a single attack, is named."""
    scored = [r for r in rows if _finite(r.robust_acc)]
    if not scored:
        return None

    def order(r: ResultRow) -> tuple:
        return (r.robust_acc, 0 if r.attack in AUTOATTACK else 2 if r.attack in AGGREGATES else 1, labels[id(r)])

    best = min(scored, key=order)
    return Cell(best.robust_acc, labels[id(best)])


def _ranking_eps(entries: dict[tuple, list[ResultRow]], standard: float | None) -> tuple[str, bool]:
    per_entry = [{eps_str(r.eps) for r in rows if _finite(r.robust_acc)} for rows in entries.values()]
    every = set.intersection(*per_entry) if per_entry else set()
    anywhere = set.union(*per_entry) if per_entry else set()
    if standard is not None and eps_str(standard) in anywhere:
        return eps_str(standard), True
    candidates = every or anywhere
    return (max(candidates, key=lambda e: next(float(r.eps) for rows in entries.values() for r in rows
                                                if eps_str(r.eps) == e)) if candidates else ""), False


def build_groups(
    rows: Sequence[ResultRow],
    standard_eps: StandardEps | None = None,
    extra_columns: Sequence[ExtraColumn] = (),
) -> list[Group]:
    """The ranked view of ``rows`` (already filtered), one group per data set and norm."""
    labels = attack_labels(rows)
    by_group: dict[tuple[str, str], dict[tuple, list[ResultRow]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        # rows without the random-weights warning (e.g. derived from a curve) join their checkpoint's entry
        key = (row.model, row.defense, row.checkpoint_sha256, row.n_examples)
        by_group[(row.dataset, row.norm)][key].append(row)
    groups = []
    per_dataset: dict[str, int] = defaultdict(int)
    for (dataset, _), entries in by_group.items():
        per_dataset[dataset] += len(entries)
    norms = {"linf": 0, "l2": 1, "l1": 2}
    # the data set with the most models first, Linf before L2 (RobustBench's order)
    for (dataset, norm), entries in sorted(by_group.items(), key=lambda kv: (-per_dataset[kv[0][0]], kv[0][0],
                                                                              norms.get(kv[0][1], 9), kv[0][1])):
        models = sorted({k[0] for k in entries})
        standard = standard_eps(dataset, norm, models) if standard_eps else None
        ranking, is_standard = _ranking_eps(entries, standard)
        eps_values = {eps_str(r.eps): float(r.eps) for rows_ in entries.values() for r in rows_}
        built = []
        for (model, defense, sha, n), entry_rows in entries.items():
            random = any(is_random_weights(r) for r in entry_rows)
            # a file name, where some row records it, reads better than the hash
            ckpt = RANDOM_WEIGHTS if random else min((checkpoint_label(r) for r in entry_rows),
                                                     key=lambda label: label == sha[:SHA_CHARS])
            by_eps: dict[str, list[ResultRow]] = defaultdict(list)
            for r in entry_rows:
                by_eps[eps_str(r.eps)].append(r)
            cells = {e: c for e, rs in by_eps.items() if (c := _pick(rs, labels)) is not None}
            aa = [r.robust_acc for r in by_eps.get(ranking, []) if r.attack in AUTOATTACK and _finite(r.robust_acc)]
            cleans = [r.clean_acc for r in entry_rows if _finite(r.clean_acc)]
            built.append(Entry(
                model=model, defense=defense, checkpoint=ckpt, checkpoint_sha256=sha, n_examples=n,
                clean_acc=min(cleans) if cleans else math.nan,
                random_weights=random, cells=cells,
                autoattack=min(aa) if aa else None,
                extras={c.name: c.value(entry_rows) for c in extra_columns},
            ))
        built.sort(key=lambda e: (ranking not in e.cells, -(e.cells[ranking].robust_acc if ranking in e.cells else 0),
                                  -(e.clean_acc if _finite(e.clean_acc) else -1), e.model, e.checkpoint))
        for i, entry in enumerate(e for e in built if ranking in e.cells):
            entry.rank = i + 1
        groups.append(Group(
            dataset=dataset, norm=norm, eps=sorted(eps_values, key=eps_values.get), ranking_eps=ranking,
            standard=is_standard, entries=built, has_autoattack=any(e.autoattack is not None for e in built),
            extra_columns=list(extra_columns),
        ))
    return groups


# -- flat and nested forms for the exports ------------------------------------------------------

def to_frame(groups: Sequence[Group]) -> pd.DataFrame:
    """One flat table (CSV): a row per model entry; per radius ``robust@EPS`` (a fraction) and
    ``attack@EPS``; ``autoattack`` is AutoAttack's accuracy at ``ranking_eps``."""
    records = []
    for g in groups:
        for e in g.entries:
            record = {"dataset": g.dataset, "norm": g.norm, "ranking_eps": g.ranking_eps, "rank": e.rank,
                      "model": e.model, "defense": e.defense, "checkpoint": e.checkpoint,
                      "checkpoint_sha256": e.checkpoint_sha256, "random_weights": e.random_weights,
                      "n_examples": e.n_examples, "clean_acc": e.clean_acc, "autoattack": e.autoattack}
            for eps in g.eps:
                cell = e.cells.get(eps)
                record[f"robust@{eps}"] = cell.robust_acc if cell else None
                record[f"attack@{eps}"] = cell.attack if cell else None
            record.update(e.extras)
            records.append(record)
    frame = pd.DataFrame(records)
    if not frame.empty:
        frame["rank"] = frame["rank"].astype("Int64")
    return frame


def to_records(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """The nested form (JSON): one object per group with its ranked rows."""
    return [{
        "dataset": g.dataset, "norm": g.norm, "ranking_eps": g.ranking_eps, "standard_eps": g.standard,
        "eps": g.eps,
        "rows": [{
            "rank": e.rank, "model": e.model, "defense": e.defense, "checkpoint": e.checkpoint,
            "checkpoint_sha256": e.checkpoint_sha256, "random_weights": e.random_weights,
            "n_examples": e.n_examples, "clean_acc": None if math.isnan(e.clean_acc) else e.clean_acc,
            "autoattack": e.autoattack,
            "robust": {eps: {"robust_acc": c.robust_acc, "attack": c.attack} for eps, c in e.cells.items()},
            **e.extras,
        } for e in g.entries],
    } for g in groups]


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage (``0.1875`` -> ``18.8%``); empty for a missing value."""
    return "" if not _finite(value) else f"{100 * value:.{digits}f}%"  # type: ignore[operator]


def extra_text(column: ExtraColumn, value: Any) -> str:
    """An extra column's value as text: a percentage where the column says so, 3 digits for other numbers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return percent(value) if column.percent else f"{value:.3g}"
    return str(value)


def model_text(entry: Entry) -> str:
    return entry.model + (" (random weights)" if entry.random_weights and entry.checkpoint != "random weights" else "")


def same_n(group: Group) -> int | None:
    """The number of points when every entry of the group has the same (shown in the title), else None."""
    ns = {e.n_examples for e in group.entries}
    return ns.pop() if len(ns) == 1 else None


def text_rows(group: Group, *, marks: bool | Collection[str] = True, eps: Sequence[str] | None = None,
              compact: bool = False, autoattack_head: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of a group as text (the terminal and Markdown views): percentages, the
    attack that gave each worst case after it (``marks``: at every radius, none, or at these
    radii), the radii ``eps`` (default: all).
    ``compact`` leaves out an n column whose value every row shares and an all-empty defense column;
    ``autoattack_head`` replaces the AutoAttack column's header (``AutoAttack 8/255``)."""
    shown = list(group.eps if eps is None else eps)
    marked = set(shown if marks is True else () if marks is False else marks)
    columns = ["#", "model", "defense", "checkpoint", "n", "clean"]
    if compact and same_n(group) is not None:
        columns.remove("n")
    if compact and not any(e.defense for e in group.entries):
        columns.remove("defense")
    heads = list(columns)
    if group.has_autoattack:
        heads.append(autoattack_head or f"AutoAttack {group.ranking_eps}")
    heads += [f"{e}{' *' if e == group.ranking_eps else ''}" for e in shown] + [c.name for c in group.extra_columns]
    lines = []
    for e in group.entries:
        values = {"#": str(e.rank) if e.rank else "-", "model": model_text(e), "defense": e.defense or "-",
                  "checkpoint": e.checkpoint, "n": str(e.n_examples), "clean": percent(e.clean_acc)}
        line = [values[c] for c in columns]
        if group.has_autoattack:
            line.append(percent(e.autoattack))
        for eps_ in shown:
            cell = e.cells.get(eps_)
            mark = f" {cell.attack}" if cell is not None and eps_ in marked else ""
            line.append("" if cell is None else percent(cell.robust_acc) + mark)
        line += [extra_text(c, e.extras.get(c.name)) for c in group.extra_columns]
        lines.append(line)
    return heads, lines


def to_markdown(groups: Sequence[Group]) -> str:
    """One Markdown table per group under a ``###`` heading (``*``: the ranking radius)."""
    parts = []
    for g in groups:
        heads, lines = text_rows(g)
        right = {"#", "n", "clean"} | {h for h in heads if h[:1].isdigit() or h.startswith("AutoAttack")}
        table = ["| " + " | ".join(heads) + " |", "|" + "|".join("---:" if h in right else ":---" for h in heads) + "|"]
        table += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        parts.append(f"### {g.title}\n\n" + "\n".join(table) + "\n")
    return "\n".join(parts)
