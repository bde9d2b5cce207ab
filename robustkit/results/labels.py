"""Short labels that tell leaderboard rows apart on screen: the data split (``cifar10:train``),
the checkpoint (file stem or the sha256's first 8 characters, random weights flagged) and the
attack configuration (``pgd-10`` vs ``pgd-20``, plus any option that differs between rows of the
same attack at the same radius)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

from robustkit.results.leaderboard import ResultRow
from robustkit.units import eps_str

AGGREGATES = ("worst-case", "transfer")  # rows that combine the other attacks of their cell
RANDOM_WEIGHTS = "random weights"
SHA_CHARS = 8
# File stems that say nothing on their own: shown with their folder (runs/rift-digits/model -> rift-digits/model).
_GENERIC_STEMS = ("model", "weights", "checkpoint", "last", "best", "final")
# Options that always vary with eps or that a row stores elsewhere: never used to tell configs apart.
_IGNORED_OPTIONS = ("step_size", "alpha", "eps", "stages", "configs", "attacks")


def split_label(dataset: str, split: str) -> str:
    """How rows name their data: the data set's name for its test split, ``NAME:train`` for the
    training split, so that the two splits are different leaderboard cells, groups and panels."""
    return dataset if split == "test" else f"{dataset}:{split}"


def dataset_of_label(label: str) -> str:
    """The data set a row's dataset field names (:func:`split_label` undone)."""
    return label.removesuffix(":train")


def is_random_weights(row: ResultRow) -> bool:
    """Whether the row's model had no weights file (``robustkit eval`` warns and stores the warning)."""
    warnings = row.extra.get("warnings") or []
    return any("randomly initialized" in str(w) for w in warnings)


def checkpoint_label(row: ResultRow) -> str:
    """The checkpoint as a reader tells it apart: ``random weights``, the file's stem when the row
    records its path (``extra["checkpoint"]``), else the sha256's first 8 characters, else ``-``."""
    if is_random_weights(row):
        return RANDOM_WEIGHTS
    path = row.extra.get("checkpoint")
    if isinstance(path, str) and path:
        pure = PurePath(path)
        stem = pure.stem
        return f"{pure.parent.name}/{stem}" if stem.lower() in _GENERIC_STEMS and pure.parent.name else stem
    return row.checkpoint_sha256[:SHA_CHARS] if row.checkpoint_sha256 else "-"


def _option_text(value: Any) -> str:
    if isinstance(value, float):
        return eps_str(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _base_label(row: ResultRow) -> str:
    config = row.attack_config
    if row.attack in AGGREGATES:
        return row.attack
    name = row.attack
    version = config.get("version")
    if isinstance(version, str) and version not in ("standard", "") and version not in name:
        name = f"{name}-{version}"
    steps = config.get("steps")
    return f"{name}-{steps}" if isinstance(steps, int) and not isinstance(steps, bool) else name


def _comparable(value: Any) -> bool:
    return not isinstance(value, dict | list)


def attack_labels(rows: Iterable[ResultRow]) -> dict[int, str]:
    """``id(row) -> label`` for the rows shown together: the attack with its step count
    (``pgd-10``), and ``key=value`` for every other option that differs between two rows of the same
    attack, model and radius (``pgd-10 restarts=2``, ``pgd-10 batch_size=25``, ``pgd-10 seed=1``)."""
    rows = list(rows)
    cells: dict[tuple, list[ResultRow]] = defaultdict(list)
    for row in rows:
        cells[(row.model, row.checkpoint_sha256, row.defense, row.dataset, row.n_examples, row.norm,
               eps_str(row.eps), _base_label(row))].append(row)
    varying: dict[str, set[str]] = defaultdict(set)  # base label -> options that tell its rows apart
    for (*_, base), same in cells.items():
        if len(same) < 2:
            continue
        keys = {k for r in same for k, v in r.attack_config.items() if _comparable(v) and k not in _IGNORED_OPTIONS}
        for key in keys:
            if len({repr(r.attack_config.get(key)) for r in same}) > 1:
                varying[base].add(key)
        if len({r.seed for r in same}) > 1:
            varying[base].add("seed")
    labels = {}
    for row in rows:
        base = _base_label(row)
        options = []
        for key in sorted(varying[base]):
            value = row.seed if key == "seed" else row.attack_config.get(key)
            if value is not None:
                options.append(f"{key}={_option_text(value)}")
        labels[id(row)] = " ".join([base, *options])
    return labels
