"""One evaluation as a library call: names in, accuracies and leaderboard rows out.

This is what ``robustkit eval`` runs; a notebook user can call :func:`run_eval` the same way.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import robustkit.attacks  # noqa: F401  (registers the attacks)

from . import __version__
from .attack import Attack
from .data import load_dataset
from .errors import UsageError
from .evaluate import EvalResult, ProgressFn, evaluate, resolve_device
from .leaderboard import Leaderboard, ResultRow
from .models import PACKAGED_WEIGHTS, file_sha256, load_model
from .registry import ATTACKS
from .threat import ThreatModel


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``steps=20,pgd.loss=cw`` -> typed dict (values read as YAML scalars; ``attack.key`` targets one attack)."""
    out: dict[str, Any] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"Cannot read attack option {part!r}; write key=value pairs separated by commas.")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value.strip())
    return out


def options_for(attack: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options meant for ``attack``: plain ``key`` applies to every attack, ``attack.key`` to one."""
    out = {}
    for key, value in kwargs.items():
        prefix, dot, name = key.rpartition(".")
        if not dot:
            out[key] = value
        elif ATTACKS.canonical(prefix) == attack:
            out[name] = value
    return out


def build_attack(name: str, threat: ThreatModel, *, seed: int = 0, **kwargs: Any) -> Attack:
    """Instantiate a registered attack; unknown options give a one-line error."""
    cls = ATTACKS.get(name)
    try:
        return cls(threat, seed=seed, **kwargs)
    except TypeError as e:
        raise UsageError(f"Bad options for attack {name}: {e}.") from None


@dataclass
class EvalSpec:
    """What to evaluate: one model on one dataset under one threat model and some attacks."""

    model: str = "digits-cnn"
    checkpoint: str | None = None
    sha256: str | None = None
    normalize: str | None = "default"
    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "test"
    n_examples: int | None = None
    download: bool = False
    attacks: Sequence[str] = ("pgd",)
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    eps: float = 0.1
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"


@dataclass
class EvalReport:
    spec: EvalSpec
    result: EvalResult | None
    rows: list[ResultRow]
    existing: list[ResultRow]


def _checkpoint_sha(spec: EvalSpec) -> str:
    if spec.checkpoint:
        return file_sha256(spec.checkpoint) if Path(spec.checkpoint).is_file() else ""
    packaged = PACKAGED_WEIGHTS.get(spec.model)
    return file_sha256(packaged) if packaged and packaged.is_file() else ""


def run_eval(
    spec: EvalSpec, *, db: str | Path | None = None, overwrite: bool = False, progress: ProgressFn | None = None
) -> EvalReport:
    """Evaluate ``spec``, write one leaderboard row per attack, return accuracies and rows.
    Cells already in the leaderboard are not recomputed unless ``overwrite``."""
    threat = ThreatModel(spec.norm, spec.eps)
    attacks = [
        (name, build_attack(name, threat, seed=spec.seed, **options_for(name, spec.attack_kwargs)))
        for name in map(ATTACKS.canonical, spec.attacks)
    ]
    dataset = load_dataset(
        spec.dataset, data_dir=spec.data_dir, split=spec.split, n_examples=spec.n_examples, download=spec.download
    )
    model = load_model(spec.model, spec.checkpoint, normalize=spec.normalize, sha256=spec.sha256)
    device = resolve_device(spec.device)
    board = Leaderboard(db)
    sha = _checkpoint_sha(spec)

    def row_for(
        name: str,
        attack: Attack,
        clean: float = float("nan"),
        robust: float = float("nan"),
        seconds: float = 0.0,
        extra: dict | None = None,
    ) -> ResultRow:
        return ResultRow(
            model=spec.model,
            checkpoint_sha256=sha,
            dataset=dataset.name,
            n_examples=len(dataset),
            norm=threat.norm,
            eps=threat.eps,
            attack=name,
            attack_config=attack.config(),
            seed=spec.seed,
            clean_acc=clean,
            robust_acc=robust,
            seconds=seconds,
            robustkit_version=__version__,
            torch_version=torch.__version__,
            device=f"{device.type} ({platform.machine()})",
            extra=extra or {},
        )

    existing = [] if overwrite else [board.get(row_for(n, a)) for n, a in attacks if board.exists(row_for(n, a))]
    done = {r.attack for r in existing}
    todo = [(n, a) for n, a in attacks if n not in done]
    if not todo:
        return EvalReport(spec, None, [], existing)
    result = evaluate(model, dataset, todo, batch_size=spec.batch_size, device=device, progress=progress)
    rows = []
    for name, attack in todo:
        row = row_for(
            name, attack, result.clean_acc, result.robust_acc(name), result.seconds["clean"] + result.seconds[name]
        )
        board.add(row, overwrite=overwrite)
        rows.append(row)
    return EvalReport(spec, result, rows, existing)
