"""RobustBench's model-info JSON: export leaderboard rows in it, and compare against files in it.

RobustBench describes each leaderboard entry in ``model_info/<dataset>/<threat_model>/<name>.json``
with the fields of ``robustbench.utils.ModelInfo`` (``clean_acc``, ``autoattack_acc``, ``eps``,
``reported``, paper metadata, ...), accuracies as percent strings with two decimals ("59.53")
and eps as text ("8/255"). :func:`export_model_info` writes one such file per evaluated model
(updating only robustkit's fields of a file already there, as ``robustbench.utils.update_json``
does, so paper metadata filled in by hand survives); :func:`compare` puts robustkit's numbers
beside the numbers of such files, with the difference per model. No robustbench import needed.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robustkit.errors import DataError, UsageError
from robustkit.models.robustbench import DATASETS, THREAT_MODELS, is_robustbench, parse_ref
from robustkit.radii import BENCHMARK_EPS
from robustkit.results.leaderboard import ResultRow
from robustkit.units import eps_str, parse_eps

#: The fields of robustbench.utils.ModelInfo that its Linf/L2 model-info files carry, in its order.
FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "footnote",
)
THREAT_OF_NORM = {"linf": "Linf", "l2": "L2"}
#: Attack names of AutoAttack's standard version, the evaluation RobustBench reports.
STANDARD_AUTOATTACK = ("autoattack", "pyautoattack")
#: Test points RobustBench evaluates on.
FULL_TEST_SET = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
WORST_CASE = "worst-case"


@dataclass(frozen=True)
class Result:
    """One model's numbers as RobustBench records them (accuracies in percent, two decimals)."""

    name: str
    dataset: str
    threat_model: str
    eps: str
    clean_acc: float
    robust_acc: float
    attack: str
    n_examples: int

    @property
    def relative_path(self) -> Path:
        return Path(self.dataset) / self.threat_model / f"{self.name}.json"

    @property
    def footnote(self) -> str | None:
        """What differs from RobustBench's own evaluation, or None when nothing does."""
        notes = []
        if self.attack not in STANDARD_AUTOATTACK:
            notes.append(f"robust accuracy from robustkit's {self.attack}, not AutoAttack (standard)")
        if self.n_examples < FULL_TEST_SET.get(self.dataset, 0):
            notes.append(f"on the first {self.n_examples} test points")
        return "Evaluated with robustkit: " + "; ".join(notes) + "." if notes else None


def _pct(accuracy: float) -> float:
    return round(100 * accuracy, 2)


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "model"


def identity(row: ResultRow) -> tuple[str, str, str] | None:
    """(name, dataset, threat model) of a row in RobustBench's terms, or None when it has none:
    a dataset RobustBench does not benchmark, or a norm without a RobustBench board (l1)."""
    threat = THREAT_OF_NORM.get(row.norm)
    if is_robustbench(row.model):
        ref = parse_ref(row.model)
        name, dataset = ref.name, ref.dataset
    else:
        name, dataset = row.model, row.dataset.lower()
    if threat is None or dataset not in DATASETS:
        return None
    if row.defense:
        name = f"{name}+{row.defense}"
    return _file_stem(name), dataset, threat


def _pick_cell(rows: list[ResultRow], dataset: str, threat: str) -> list[ResultRow]:
    """The rows of one evaluation cell: at RobustBench's eps if evaluated there (else the largest),
    on the most points, the newest."""
    standard = BENCHMARK_EPS.get((dataset, threat))
    cells: dict[tuple[Any, ...], list[ResultRow]] = defaultdict(list)
    for r in rows:
        cells[(eps_str(r.eps), r.n_examples, r.checkpoint_sha256, r.seed, r.dataset)].append(r)

    def rank(cell: list[ResultRow]) -> tuple[Any, ...]:
        first = cell[0]
        at_standard = standard is not None and eps_str(first.eps) == eps_str(standard)
        return at_standard, first.eps, first.n_examples, max(r.timestamp for r in cell)

    return max(cells.values(), key=rank)


def _robust_row(cell: list[ResultRow]) -> ResultRow:
    """AutoAttack (standard) when it ran, else the worst case over the attacks, else the strongest attack."""
    for group in (
        [r for r in cell if r.attack in STANDARD_AUTOATTACK],
        [r for r in cell if r.attack == WORST_CASE],
        cell,
    ):
        if group:
            return min(group, key=lambda r: r.robust_acc)
    raise AssertionError("empty cell")


def results(rows: Iterable[ResultRow], eps: float | None = None) -> tuple[list[Result], list[str]]:
    """One Result per model in RobustBench's terms (optionally only at ``eps``), and the models
    that have none (a dataset or norm RobustBench does not benchmark)."""
    groups: dict[tuple[str, str, str], list[ResultRow]] = defaultdict(list)
    skipped: set[str] = set()
    for r in rows:
        if eps is not None and eps_str(r.eps) != eps_str(eps):
            continue
        key = identity(r)
        if key is None or math.isnan(r.robust_acc) or math.isnan(r.clean_acc):
            skipped.add(f"{r.model} ({r.dataset}, {r.norm})")
            continue
        groups[key].append(r)
    out = []
    for (name, dataset, threat), group in sorted(groups.items()):
        cell = _pick_cell(group, dataset, threat)
        best = _robust_row(cell)
        attack, parts = best.attack, best.attack_config.get("attacks", [])
        if attack == WORST_CASE and parts:  # name the attacks it is the worst case of
            attack = f"{WORST_CASE} of {', '.join(parts)}"
        out.append(
            Result(
                name,
                dataset,
                threat,
                eps_str(best.eps),
                _pct(best.clean_acc),
                _pct(best.robust_acc),
                attack,
                best.n_examples,
            )
        )
    return out, sorted(skipped)


def _format_pct(value: float) -> str:
    return str(value)  # as robustbench.utils.update_json writes them: str(round(acc * 100, 2))


def export_model_info(rows: Iterable[ResultRow], output: str | Path) -> tuple[list[Path], list[str]]:
    """Write ``<output>/<dataset>/<threat_model>/<name>.json`` per model; returns the files written
    and the models skipped. A file already there keeps its other fields (paper metadata)."""
    root = Path(output).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--format robustbench writes a folder of JSON files; {root} is a file.")
    found, skipped = results(rows)
    written = []
    for result in found:
        path = root / result.relative_path
        info: dict[str, Any] = dict.fromkeys(FIELDS)
        if path.is_file():
            info.update(_read_json(path))
        info.update(
            dataset=result.dataset,
            eps=result.eps,
            clean_acc=_format_pct(result.clean_acc),
            autoattack_acc=_format_pct(result.robust_acc),
        )
        if result.footnote:
            info["footnote"] = result.footnote
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written, skipped


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read {path} as RobustBench model-info JSON ({exc}).") from None
    if not isinstance(data, dict) or not ({"clean_acc", "autoattack_acc"} & data.keys()):
        raise DataError(f"{path} is not a RobustBench model-info JSON (an object with clean_acc and autoattack_acc).")
    return data


def model_info_files(path: str | Path) -> list[Path]:
    """The model-info JSON files at ``path``: the file itself, or every ``*.json`` below a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"No RobustBench model-info JSON at {p}: no such file or folder.")
    files = sorted(p.rglob("*.json"))
    if not files:
        raise DataError(f"No RobustBench model-info JSON in {p} (expected <dataset>/<threat_model>/<name>.json files).")
    return files


def _number(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def _file_entry(path: Path) -> tuple[str, str | None, str | None, float | None, float, float]:
    """(name, dataset, threat model, eps, clean %, robust %) of one model-info file."""
    data = _read_json(path)
    threat = path.parent.name if path.parent.name in THREAT_MODELS else None
    dataset = str(data.get("dataset") or path.parent.parent.name).lower()
    try:
        eps = parse_eps(str(data["eps"])) if data.get("eps") not in (None, "") else None
    except UsageError:
        raise DataError(f"{path} has an eps robustkit cannot read: {data['eps']!r}.") from None
    return (
        path.stem,
        dataset if dataset in DATASETS else None,
        threat,
        eps,
        _number(data.get("clean_acc")),
        _number(data.get("autoattack_acc")),
    )


COMPARE_COLUMNS = (
    "model",
    "dataset",
    "threat_model",
    "eps",
    "clean_acc",
    "clean_acc_file",
    "clean_diff",
    "robust_acc",
    "robust_acc_file",
    "robust_diff",
    "attack",
    "n_examples",
    "file",
)


def compare(rows: Iterable[ResultRow], path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """robustkit's numbers beside those of the model-info file(s) at ``path`` (percent; diff =
    robustkit - file), one line per model found in both; and the files' models without a result."""
    rows = list(rows)
    lines, missing = [], []
    for file in model_info_files(path):
        name, dataset, threat, eps, clean_file, robust_file = _file_entry(file)
        found, _ = results(rows, eps)
        match = [
            r for r in found if r.name == name and dataset in (None, r.dataset) and threat in (None, r.threat_model)
        ]
        if not match:
            missing.append(name)
            continue
        ours = match[0]
        lines.append(
            {
                "model": name,
                "dataset": ours.dataset,
                "threat_model": ours.threat_model,
                "eps": ours.eps,
                "clean_acc": ours.clean_acc,
                "clean_acc_file": clean_file,
                "clean_diff": round(ours.clean_acc - clean_file, 2),
                "robust_acc": ours.robust_acc,
                "robust_acc_file": robust_file,
                "robust_diff": round(ours.robust_acc - robust_file, 2),
                "attack": ours.attack,
                "n_examples": ours.n_examples,
                "file": str(file),
            }
        )
    return pd.DataFrame(lines, columns=list(COMPARE_COLUMNS)), missing
