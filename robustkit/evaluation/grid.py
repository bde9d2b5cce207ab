"""Evaluations as library calls: a grid of models × eps × attacks in, results and leaderboard rows out.

This is what ``robustkit eval`` runs; a notebook user can call :func:`run_grid` the same way.
One *cell* is one model at one eps with all attacks: it writes one leaderboard row per attack,
plus a ``worst-case`` row when there are several attacks, per-sample records and, on request,
the adversarial examples. Cells resume from their per-batch store after an interruption.

Transfer threat model (PubDef, Sitawarin et al. 2023): with ``surrogate=[a, b, ...]`` every attack
is crafted on every surrogate and scored on the evaluated model, one row ``ATTACK@SURROGATE``
each; the attack name ``transfer`` stands for the engine's transfer attacks
(:data:`~robustkit.attacks.transfer.TRANSFER_SUITE`: PGD, MI-, DI-, TI-, MDTI-FGSM) and adds the
row ``transfer``: the per-sample worst case over those sources × attacks.

Minimum-norm attacks (fmn, ddn, alma, cw, deepfool, fab) run once per model, without eps: their
*curve cell* stores one robustness curve per attack (:mod:`robustkit.results.curves`: the
per-sample distances, robust accuracy on an eps grid, median and mean distance), plus the
per-sample ensemble of several (the smallest distance wins, row and curve ``fmn+ddn``). At each
eps of the grid their rows are derived from the distances (robust: distance > eps), exactly what
the attack run at that eps finds (``attack_config["derived_from"] == "curve"``; FAB with
``restarts`` > 1 aside, whose later restarts start at eps/2 in its eps mode), and join the worst
case of the other attacks. With only minimum-norm attacks, eps may be left out: the curves alone
are stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from robustkit import __version__, radii
from robustkit import distributed as dist
from robustkit.attack import Attack
from robustkit.attacks import PGD, Transferred
from robustkit.attacks.transfer import TRANSFER_SUITE
from robustkit.data import Dataset, load_dataset
from robustkit.errors import UsageError
from robustkit.evaluation import diagnostics as diag
from robustkit.evaluation.attack_spec import (
    build_attack,
    canonical_attack,
    check_options_used,
    is_minimum_norm,
    options_for,
    parse_kwargs,
    split_attacks,
    with_backend,
)
from robustkit.evaluation.records import save_adversarial, write_records
from robustkit.evaluation.runner import BatchStore, EvalResult, ProgressFn, evaluate, merge_results, resolve_device
from robustkit.evaluation.surrogates import load_surrogate, surrogate_from_sidecar, surrogate_labels
from robustkit.models import is_external, load_model, model_info, weights_sha256
from robustkit.models import robustbench as rb
from robustkit.models.checkpoint import check_sha256
from robustkit.models.prompted import prompt_backbone, prompt_label, wrap_prompt
from robustkit.models.robustbench_weights import check_normalize, locate_weights
from robustkit.models.sidecar import load_trained_model, read_sidecar, sidecar_model_name
from robustkit.registry import ATTACKS, DEFENSES, MODELS
from robustkit.results import curves as rc
from robustkit.results.labels import split_label
from robustkit.results.leaderboard import Leaderboard, ResultRow, canonical_json
from robustkit.threat import ThreatModel
from robustkit.units import eps_label, eps_str, parse_eps

WORST_CASE = "worst-case"
# The radius papers use where RobustBench has no board (MNIST: Madry et al.'s 0.3 Linf, 2 L2).
# The registered data set a model's input size and classes point to.
DATASET_FOR_INPUT = {((1, 8, 8), 10): "digits", ((1, 28, 28), 10): "mnist", ((3, 32, 32), 10): "cifar10",
                     ((3, 32, 32), 100): "cifar100"}
TRANSFER = "transfer"  # --attack transfer: every transfer attack from every surrogate, and their worst case
SCORE_BASED = ("square",)  # attacks that use only model outputs (for the gradient-masking check)
LOCK_POLL_S = 0.5  # how often a run waiting for another process's cell tries its lock again
DERIVED = "curve"  # attack_config["derived_from"] of a row read off a minimum-norm attack's distances

log = logging.getLogger("robustkit.eval")


def _split(value: str | Sequence[Any] | None) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _parse_radius(value: Any) -> float:
    """A radius as written (8/255, 0.5), or ``inf``: no radius, the curve of a minimum-norm attack."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return parse_eps(value)


@dataclass
class EvalSpec:
    """A grid: every model (with its checkpoint) at every eps under all attacks, on one data set.
    Round-trips through YAML (``--config`` / ``--dump-config``)."""

    model: list[str] = field(default_factory=list)  # empty: from the checkpoints' sidecars, else digits-cnn
    checkpoint: list[str | None] = field(default_factory=list)
    sha256: str | None = None
    normalize: str | None = "default"
    threat_model: str | None = None  # RobustBench's (Linf, L2, ...): robustbench: models' zoo, default norm and eps
    model_dir: str | None = None  # RobustBench's weights folder (<model_dir>/<dataset>/<threat_model>/<name>.pt)
    dataset: str | None = None  # default: the data the first model is built for (cifar10 for resnet20), else digits
    data_dir: str | None = None
    split: str = "test"
    n_examples: int | None = None
    download: bool = False
    attack: list[str] = field(default_factory=lambda: ["pgd"])
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "native"  # native, torchattacks or autoattack (pyautoattack)
    defense: str | None = None  # an inference defense wrapping every model (e.g. aaa)
    defense_kwargs: dict[str, Any] = field(default_factory=dict)
    norm: str | None = None  # default: from threat_model (L2 -> l2), else linf
    # default: the data set's standard radius (8/255 Linf on CIFAR); none with only minimum-norm attacks
    # (their curves need no eps); inf: the curve only
    eps: list[float] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    diagnose: bool | None = None  # None: on when the attacks include an AutoAttack
    records_dir: str | None = None
    save_adv: str | None = None
    surrogate: list[str] = field(default_factory=list)  # craft on these models, score on each evaluated model
    surrogate_checkpoint: list[str | None] = field(default_factory=list)  # one per surrogate ("" = none)
    prompt: str | None = None  # a trained visual prompt (robustkit train prompt) around every model
    dist_timeout: float = 600.0  # torchrun: seconds to wait for the other workers before giving up

    def __post_init__(self) -> None:
        self.model = _split(self.model)
        self.attack = split_attacks(self.attack)
        self.checkpoint = [c or None for c in _split(self.checkpoint)]
        self.eps = [_parse_radius(e) for e in _split(self.eps if not isinstance(self.eps, int | float) else [self.eps])]
        if self.prompt and not self.model:  # the backbone the prompt was trained on
            model, checkpoint = prompt_backbone(self.prompt)
            self.model, self.checkpoint = [model], self.checkpoint or [checkpoint]
        if not self.model:
            self.model = [_model_from_sidecar(c) for c in self.checkpoint] or ["digits-cnn"]
        self.model = [MODELS.canonical(m) if not is_external(m) and m in MODELS else m for m in self.model]  # aliases
        if not self.attack:
            raise UsageError("An evaluation needs at least one attack.")
        curves_only = all(self.minimum_norm(a) for a in self.attack)
        self._robustbench_defaults(fill_eps=not curves_only)
        self._surrogate_defaults()
        if not self.eps and not curves_only:
            raise UsageError("An evaluation needs at least one eps (only minimum-norm attacks run without one).")
        if self.checkpoint and len(self.checkpoint) not in (1, len(self.model)):
            raise UsageError(f"Give one checkpoint per model: {len(self.model)} models, "
                             f"{len(self.checkpoint)} checkpoints.")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}.")
        timeout = self.dist_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise UsageError(f"--dist-timeout must be a positive number of seconds, got {timeout!r}.")

    def minimum_norm(self, attack: str) -> bool:
        """Whether ``attack`` runs as a minimum-norm attack here (not under --surrogate: a transfer
        run crafts at an eps)."""
        if self.surrogate or self.surrogate_checkpoint or attack.strip().lower() == TRANSFER:
            return False
        return is_minimum_norm(with_backend(attack, self.backend))

    def _robustbench_defaults(self, fill_eps: bool = True) -> None:
        """Qualify ``robustbench:NAME`` models with the dataset and threat model, and fill the data
        set (the one the first model is built for), norm and eps (the data set's standard radius:
        RobustBench's on CIFAR and ImageNet, 0.3 / 2 on MNIST, else 0.1)."""
        if self.threat_model:
            self.threat_model = rb.canonical_threat_model(self.threat_model)
        self.norm = self.norm or ("l2" if self.threat_model == "L2" else "linf")
        for a in self.attack:  # before a default radius is picked for a norm the attack lacks (l0)
            if a.strip().lower() != TRANSFER:
                cls = ATTACKS.get(canonical_attack(with_backend(a, self.backend)).partition(":")[0])
                norms = getattr(cls, "supported_norms", None)
                if norms and self.norm not in norms:
                    raise UsageError(f"{a} supports the norms {', '.join(norms)}, not {self.norm}.")
        dataset = self.dataset if self.dataset and self.dataset.lower() in rb.DATASETS else None
        threat = self.threat_model or rb.threat_model_for_norm(self.norm)
        self.model = [rb.qualify(m, dataset, threat) if rb.is_robustbench(m) else m for m in self.model]
        refs = [rb.parse_ref(m) for m in self.model if rb.is_robustbench(m)]
        if self.model_dir and not refs:
            raise UsageError("--model-dir locates RobustBench weights; give a robustbench: model with it.")
        if not self.dataset:
            self.dataset = refs[0].dataset if refs else default_dataset(self.model[0])
        if not self.eps and fill_eps:
            name = refs[0].dataset if refs else self.radius_dataset()
            standard = radii.standard_eps(name, self.norm)
            self.eps = [standard if standard is not None else 0.1]

    def _surrogate_defaults(self) -> None:
        """Surrogates and their checkpoints as matching lists (names from the checkpoints' sidecars
        when left out); ``transfer`` needs at least one surrogate."""
        self.surrogate = _split(self.surrogate)
        ckpts = self.surrogate_checkpoint
        if isinstance(ckpts, str):  # keep empty places: "a.safetensors,,c.safetensors"
            ckpts = ckpts.split(",") if ckpts.strip() else []
        self.surrogate_checkpoint = [str(c).strip() or None if c is not None else None for c in ckpts or []]
        if self.surrogate_checkpoint and not self.surrogate:
            self.surrogate = [surrogate_from_sidecar(c) for c in self.surrogate_checkpoint]
        if self.surrogate_checkpoint and len(self.surrogate_checkpoint) != len(self.surrogate):
            raise UsageError(f"Give one --surrogate-checkpoint per surrogate, in the same order (an empty entry "
                             f"for none): {len(self.surrogate)} surrogate(s), {len(self.surrogate_checkpoint)} "
                             f"checkpoint(s).")
        if any(a.strip().lower() == TRANSFER for a in self.attack) and not self.surrogate:
            raise UsageError("--attack transfer crafts on public (surrogate) models; name them with "
                             "--surrogate NAME[,NAME...].")

    def radius_dataset(self) -> str:
        """The data set whose standard radius applies: the one named, or for images from a file
        (``npz:``) the one the first model is built for."""
        name = self.dataset.lower()
        return default_dataset(self.model[0]) if name.startswith("npz:") else name

    def surrogate_checkpoint_of(self, i: int) -> str | None:
        return self.surrogate_checkpoint[i] if self.surrogate_checkpoint else None

    def checkpoint_of(self, i: int) -> str | None:
        if not self.checkpoint:
            return None
        return self.checkpoint[0] if len(self.checkpoint) == 1 else self.checkpoint[i]

    def to_yaml(self) -> str:
        data = dataclasses.asdict(self)
        data["eps"] = [eps_str(e) if math.isfinite(e) else "inf" for e in self.eps]  # 8/255, not 0.0313725...
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalSpec:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"Cannot read the config {path}: {e}.") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"Unknown keys in {path}: {', '.join(unknown)}; accepted: {', '.join(sorted(known))}.")
        return cls(**data)


@dataclass
class CellReport:
    """One model at one eps: its rows (new and already present), result and warnings."""

    model: str
    eps: float
    rows: list[ResultRow]
    existing: list[ResultRow]
    result: EvalResult | None = None
    warnings: list[str] = field(default_factory=list)
    records: Path | None = None


@dataclass
class CurveReport:
    """One model's minimum-norm attacks run without eps: their curves (new and already stored),
    and each attack's (and the ensemble's) per-sample distances."""

    model: str
    curves: list[rc.Curve]
    existing: list[rc.Curve]
    distances: dict[str, Any] = field(default_factory=dict)
    result: EvalResult | None = None
    records: Path | None = None
    warnings: list[str] = field(default_factory=list)


# progress(cell_label, batches_done, batches_total, robust, evaluated)
CellProgress = Callable[[str, int, int, int, int], None]


class Grid:
    """Runs the cells of an :class:`EvalSpec`, each as one resumable, optionally sharded, unit."""

    def __init__(self, spec: EvalSpec, *, db: str | Path | None = None, overwrite: bool = False):
        self.spec = spec
        self.board = Leaderboard(db)
        self.curve_store = rc.CurveStore(self.board)
        # the --checkpoint path of each (model, sha) seen, recorded in its rows' extra: readers tell
        # two checkpoints of one architecture apart by file name (results/labels.py)
        self._checkpoint_paths: dict[tuple[str, str], str] = {}
        self.overwrite = overwrite
        self.home = Path(self.board.path).parent
        self.runs = self.home / "runs" / _cache_name(self.board.path)  # batch caches of this database only
        self.threats = [ThreatModel(spec.norm, e) for e in spec.eps if math.isfinite(e)]
        for threat in self.threats:  # validate every attack and option before any work
            self.attacks(threat)
        if any(not math.isfinite(e) for e in spec.eps):  # --eps inf: only minimum-norm attacks run without one
            others = [a for a in self.attack_names() if not self.spec.minimum_norm(a)]
            self._build(others, ThreatModel(spec.norm, math.inf))
        self.curve_attacks()
        for i, name in enumerate(spec.model):  # and every RobustBench model and its weights (imports robustbench)
            if rb.is_robustbench(name):
                check_normalize(name, spec.normalize)
                locate_weights(name, spec.checkpoint_of(i), model_dir=spec.model_dir, download=spec.download,
                               fetch=False)
        # rows of a prompted model, or of a model under another normalization than its own, differ
        # from the plain model's: their defense field says how
        normalize = f"normalize={spec.normalize}" if spec.normalize not in (None, "default") else ""
        self.defense = "+".join(filter(None, [prompt_label(spec.prompt) if spec.prompt else "", normalize,
                                              defense_label(spec.defense, spec.defense_kwargs)]))
        self.dataset: Dataset = load_dataset(spec.dataset, data_dir=spec.data_dir, split=spec.split,
                                             n_examples=spec.n_examples, download=spec.download)
        self.data_label = split_label(self.dataset.name, spec.split)  # the rows' dataset field
        self.device = resolve_device(dist.local_device(spec.device))
        self.surrogates: list[tuple[str, torch.nn.Module, str]] = [
            (label, load_surrogate(name, ckpt, seed=spec.seed + 1 + i).to(self.device).eval(), sha)
            for i, (name, ckpt, label, sha) in enumerate(_surrogate_labels(spec))]  # seeds apart from the model's
        self._suite: set[str] = set()  # names of the cells that the `transfer` row covers

    def attack_names(self) -> list[str]:
        """Every attack of the run, canonical, in order (``transfer`` expanded to its suite)."""
        names: list[str] = []
        for a in self.spec.attack:
            expanded = list(TRANSFER_SUITE) if a.strip().lower() == TRANSFER else [with_backend(a, self.spec.backend)]
            names += [n for n in map(canonical_attack, expanded) if n not in names]
        check_options_used(names, self.spec.attack_kwargs)
        return names

    def _build(self, names: list[str], threat: ThreatModel) -> list[tuple[str, Attack]]:
        attacks = [(n, build_attack(n, threat, seed=self.spec.seed, **options_for(n, self.spec.attack_kwargs)))
                   for n in names]
        for n, a in attacks:
            if getattr(a, "targeted", False):
                raise UsageError(f"{n} was asked for as a targeted attack (targeted=true), but robustkit eval has no "
                                 f"target class per point; use apgd-t or fab-t (they pick their targets), or call "
                                 f"the attack from Python with target=.")
        return attacks

    def curve_attacks(self) -> list[tuple[str, Attack]]:
        """The minimum-norm attacks of the run, without eps (their curve cell); [] when none."""
        names = [n for n in self.attack_names() if self.spec.minimum_norm(n)]
        return self._build(names, ThreatModel(self.spec.norm, math.inf)) if names else []

    def attacks(self, threat: ThreatModel) -> list[tuple[str, Attack]]:
        """The cells' attacks other than the minimum-norm ones (whose rows come from their curve):
        each attack, or with surrogates each attack from each surrogate (``ATTACK@SURROGATE``,
        surrogates outer); ``transfer`` expands to the transfer suite."""
        transfer = any(a.strip().lower() == TRANSFER for a in self.spec.attack)
        suite = {canonical_attack(n) for n in TRANSFER_SUITE} if transfer else set()
        names = [n for n in self.attack_names() if not self.spec.minimum_norm(n)]
        attacks = self._build(names, threat)
        surrogates = getattr(self, "surrogates", [])
        if not surrogates:
            return attacks
        self._suite = {f"{n}@{label}" for label, _, _ in surrogates for n in suite}
        return [(f"{n}@{label}", Transferred(a, model, label, sha))
                for label, model, sha in surrogates for n, a in attacks]

    def _row(self, model: str, sha: str, threat: ThreatModel, name: str, config: dict[str, Any], clean: float,
             robust: float, seconds: float, extra: dict[str, Any]) -> ResultRow:
        return ResultRow(
            model=model, checkpoint_sha256=sha, defense=self.defense, dataset=self.data_label,
            n_examples=len(self.dataset),
            norm=threat.norm, eps=threat.eps, attack=name, attack_config=config, seed=self.spec.seed,
            clean_acc=clean, robust_acc=robust, seconds=seconds,
            robustkit_version=__version__, torch_version=torch.__version__,
            device=f"{self.device.type} ({platform.machine()})",
            extra={**extra, "checkpoint": path} if (path := self._checkpoint_paths.get((model, sha))) else extra,
        )

    def _rows(self, model: str, sha: str, threat: ThreatModel, attacks: list[tuple[str, Attack]],
              result: EvalResult | None, extra: dict[str, Any], curve: CurveReport | None = None) -> list[ResultRow]:
        """The cell's rows: one per attack, ``transfer`` over the transfer suite, and ``worst-case``
        over every attack of the cell, the minimum-norm ones (``curve``, at this eps) included."""
        nan = float("nan")
        batch = {"batch_size": self.spec.batch_size}  # attacks are seeded per batch: a key field, like the seed
        cells = [(n, {**a.config(), **batch}, result.robust_acc(n) if result else nan,
                  (result.seconds["clean"] + result.seconds[n]) if result else 0.0) for n, a in attacks]
        min_norm = self.curve_attacks() if curve is not None else []

        def worst(name: str, chosen: list[tuple[str, Attack]], also: list[tuple[str, Attack]]) -> None:
            config = {"attacks": [n for n, _ in chosen + also],
                      "configs": {n: a.config() for n, a in chosen + also}, **batch}
            robust = nan
            if result:
                per_sample = worst_case(result, [n for n, _ in chosen])
                for n, _ in also:
                    per_sample &= rc.robust_at(curve.distances[n], threat.eps)
                robust = float(per_sample.mean())
            seconds = (result.seconds["clean"] + sum(result.seconds[n] for n, _ in chosen)) if result else 0.0
            cells.append((name, config, robust, seconds))

        suite = [(n, a) for n, a in attacks if n in self._suite]
        if suite:
            worst(TRANSFER, suite, [])
        if len(attacks) + len(min_norm) > 1 and len(suite) < len(attacks):
            worst(WORST_CASE, attacks, min_norm)
        return [self._row(model, sha, threat, name, config, result.clean_acc if result else nan, robust, seconds,
                          extra) for name, config, robust, seconds in cells]

    def _derived_rows(self, model: str, sha: str, threat: ThreatModel, curve: CurveReport) -> list[ResultRow]:
        """The minimum-norm attacks' (and their ensemble's) rows at ``threat.eps``, read off their
        distances: robust where distance > eps, exactly what the attack run at that eps finds."""
        rows = []
        for c in curve.curves + curve.existing:
            d = curve.distances[c.attack]
            config = {**c.attack_config, "derived_from": DERIVED}
            median = c.summary.median  # inf (most points never broken) as null: JSON has no inf
            extra = {"curve": {"run_id": c.extra.get("run_id"), "median_distance": median if math.isfinite(median)
                               else None},
                     "records": c.extra.get("records")}
            rows.append(self._row(model, sha, threat, c.attack, config, rc.summarize(d).clean_acc,
                                  float(rc.robust_at(d, threat.eps).mean()), c.seconds, extra))
        order = {name: i for i, name in enumerate(curve.distances)}
        return sorted(rows, key=lambda r: order.get(r.attack, len(order)))

    def _store_rows(self, rows: list[ResultRow]) -> list[ResultRow]:
        stored = []
        for row in rows:
            if self.overwrite or not self.board.exists(row):
                self.board.add(row, overwrite=self.overwrite)
                stored.append(row)
        return stored

    def _cell_id(self, name: str, sha: str, eps: str, attacks: list[tuple[str, Attack]]) -> str:
        spec = self.spec
        key = canonical_json({"model": name, "sha": sha, "defense": self.defense, "normalize": spec.normalize,
                              "data": self.dataset.name,
                              "split": spec.split, "n": len(self.dataset), "norm": spec.norm,
                              "eps": eps, "attacks": {n: a.config() for n, a in attacks},
                              "seed": spec.seed, "batch": spec.batch_size})
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _model(self, index: int) -> torch.nn.Module:
        spec = self.spec
        return wrap_defense(wrap_prompt(_load(spec.model[index], spec.checkpoint_of(index), spec), spec.prompt),
                            spec.defense, spec.defense_kwargs)

    def _weights(self, index: int) -> tuple[str, str]:
        """Model ``index``'s name and weights sha256; its --checkpoint path is remembered for its rows."""
        spec = self.spec
        name, checkpoint = spec.model[index], spec.checkpoint_of(index)
        sha = weights_sha256(name, checkpoint, spec.model_dir)
        if checkpoint:
            self._checkpoint_paths[(name, sha)] = checkpoint
        return name, sha

    def _attack(self, model: torch.nn.Module, attacks: list[tuple[str, Attack]], store: BatchStore, label: str,
                progress: CellProgress | None) -> EvalResult | None:
        """``model`` under ``attacks``, batch by batch into ``store``, the shards gathered (None on
        ranks other than 0)."""
        result = evaluate(model, self.dataset, attacks, batch_size=self.spec.batch_size, device=self.device,
                          store=store, shard=dist.world(), keep_adv=self.spec.save_adv is not None,
                          progress=(lambda *a: progress(label, *a)) if progress else None)
        return self._collect(model, attacks, store, result, label)

    def run_cell(self, index: int, threat: ThreatModel, progress: CellProgress | None = None,
                 curve: CurveReport | None = None) -> CellReport | None:
        """Evaluate model ``index`` at ``threat``; returns None on ranks other than 0. ``curve``:
        the model's minimum-norm attacks, whose rows at this eps come from their distances.

        The cell is computed under its batch store's lock: a second process asking for the same
        cell waits for the first, then reuses its rows."""
        spec = self.spec
        name, sha = self._weights(index)
        attacks = self.attacks(threat)
        derived: list[ResultRow] = []
        if curve is not None and dist.world()[0] == 0:
            derived = self._derived_rows(name, sha, threat, curve)
        if not attacks:  # only minimum-norm attacks: their rows are read off the curves
            if dist.world()[0]:
                return None
            existing = [r for r in map(self.board.get, derived) if r is not None]
            rows = self._store_rows(derived)
            kept = [r for r in existing if r.attack not in {row.attack for row in rows}]
            return CellReport(name, threat.eps, rows, kept)
        run_id = self._cell_id(name, sha, eps_str(threat.eps), attacks)
        store = BatchStore(self.runs / run_id)
        label = f"{name} {threat.norm} eps={eps_label(threat.eps)}"
        with self._locked(store, label):
            planned = _combined(self._rows(name, sha, threat, attacks, None, {}, curve), derived)
            existing = [r for r in map(self.board.get, planned) if r is not None]
            if dist.broadcast_from_rank0(len(existing) == len(planned) and not self.overwrite):
                return CellReport(name, threat.eps, [], existing) if dist.world()[0] == 0 else None
            model = self._model(index)
            t0 = time.perf_counter()
            result = self._attack(model, attacks, store, label, progress)
            if result is None:
                return None
            warnings = self._diagnose(model, attacks, threat, result) if self._diagnosing() else []
            if not sha and not spec.prompt:
                warnings.insert(0, f"{name} has no weights file (no --checkpoint and none packaged): these are the "
                                   f"numbers of a randomly initialized network.")
            usual = radii.benchmark_eps(spec.radius_dataset(), threat.norm)
            if usual is not None and not usual / 4 <= threat.eps <= 2 * usual:
                warnings.append(f"eps {eps_label(threat.eps)} is unusual for {spec.radius_dataset()} images: the "
                                f"standard {threat.norm} radius is {eps_label(usual)}.")
            records = write_records(result, Path(spec.records_dir or self.home / "records") / run_id)
            extra = {"run_id": run_id, "records": str(records), "warnings": warnings,
                     "wall_seconds": time.perf_counter() - t0,
                     "per_attack": {n: result.robust_acc(n) for n, _ in attacks},
                     "per_stage": {n: result.stage_accs(n) for n, a in attacks if a.stage_names()}}
            if spec.save_adv:
                extra["adversarial_examples"] = str(save_adversarial(result,
                                                                     Path(spec.save_adv) / f"{run_id}.safetensors"))
            rows = self._store_rows(_combined(self._rows(name, sha, threat, attacks, result, extra, curve), derived))
            store.clear()
        kept = [r for r in existing if r.attack not in {row.attack for row in rows}]
        return CellReport(name, threat.eps, rows, kept, result, warnings, records)

    def _curves(self, model: str, sha: str, attacks: list[tuple[str, Attack]], result: EvalResult | None,
                extra: dict[str, Any]) -> list[rc.Curve]:
        """One curve per minimum-norm attack, and the ensemble of several (``a+b``: per sample the
        smallest distance). Without ``result``: the curves' keys only (no distances)."""
        batch = {"batch_size": self.spec.batch_size}
        empty = [0.0] * len(self.dataset)
        parts = [(n, {**a.config(), **batch}, result.distance(n) if result else empty,
                  (result.seconds["clean"] + result.seconds[n]) if result else 0.0) for n, a in attacks]
        if len(attacks) > 1:
            config = {"attacks": [n for n, _ in attacks], "configs": {n: a.config() for n, a in attacks}, **batch}
            parts.append(("+".join(n for n, _ in attacks), config, rc.ensemble([d for _, _, d, _ in parts]),
                          (result.seconds["clean"] + sum(result.seconds[n] for n, _ in attacks)) if result else 0.0))
        radius = self.spec.radius_dataset()
        return [rc.Curve(
            model=model, checkpoint_sha256=sha, defense=self.defense, dataset=self.data_label,
            n_examples=len(self.dataset), norm=self.spec.norm, attack=name, attack_config=config,
            seed=self.spec.seed, distances=rc.as_distances(d), eps_grid=tuple(rc.eps_grid(self.spec.norm, radius, d)),
            seconds=seconds, robustkit_version=__version__, torch_version=torch.__version__,
            device=f"{self.device.type} ({platform.machine()})",
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={**extra, "radius_dataset": radius},
        ) for name, config, d, seconds in parts]

    def run_curve(self, index: int, progress: CellProgress | None = None) -> CurveReport | None:
        """Model ``index``'s minimum-norm attacks without eps (resumable and locked like a cell):
        their curves, stored, and their distances. None without such attacks, and on ranks other than 0."""
        attacks = self.curve_attacks()
        if not attacks:
            return None
        spec = self.spec
        name, sha = self._weights(index)
        run_id = self._cell_id(name, sha, "inf", attacks)
        store = BatchStore(self.runs / run_id)
        label = f"{name} {spec.norm} curve"
        with self._locked(store, label):
            planned = self._curves(name, sha, attacks, None, {})
            existing = [c for c in map(self.curve_store.get, planned) if c is not None]
            if dist.broadcast_from_rank0(len(existing) == len(planned) and not self.overwrite):
                if dist.world()[0]:
                    return None
                return CurveReport(name, [], existing, {c.attack: c.distances for c in existing})
            model = self._model(index)
            t0 = time.perf_counter()
            result = self._attack(model, attacks, store, label, progress)
            if result is None:
                return None
            records = write_records(result, Path(spec.records_dir or self.home / "records") / run_id)
            warnings = [] if sha or spec.prompt else [
                f"{name} has no weights file (no --checkpoint and none packaged): these are the distances of a "
                f"randomly initialized network."]
            extra = {"run_id": run_id, "records": str(records), "wall_seconds": time.perf_counter() - t0,
                     "warnings": warnings}
            if spec.save_adv:
                extra["adversarial_examples"] = str(save_adversarial(result,
                                                                     Path(spec.save_adv) / f"{run_id}.safetensors"))
            curves = self._curves(name, sha, attacks, result, extra)
            new = []
            for c in curves:
                if self.overwrite or self.curve_store.get(c) is None:
                    self.curve_store.add(c, overwrite=self.overwrite)
                    new.append(c)
            store.clear()
        kept = [c for c in existing if c.attack not in {n.attack for n in new}]
        return CurveReport(name, new, kept, {c.attack: c.distances for c in curves}, result, records, warnings)

    def _collect(self, model: torch.nn.Module, attacks: list[tuple[str, Attack]], store: BatchStore,
                 result: EvalResult, label: str) -> EvalResult | None:
        """Under torchrun, the cell's result on rank 0 (None on the others). No collective: the
        others note in the batch store that their batches are there and go on to the next cell;
        rank 0 waits for the notes, then reads their batches (any missing one it computes)."""
        rank, world = dist.world()
        if world == 1:
            return result
        if rank:
            dist.post_shard(store.directory, {"seconds": result.seconds})
            return None
        patience = max(self.spec.dist_timeout, 2 * sum(result.seconds.values()))  # a batch may take long
        notes = dist.wait_for_shards(store.directory, patience, label)
        parts = [result]
        for r in range(1, world):
            part = evaluate(model, self.dataset, attacks, batch_size=self.spec.batch_size, device=self.device,
                            store=store, shard=(r, world), keep_adv=self.spec.save_adv is not None)
            part.seconds = dict(notes[r]["seconds"])
            parts.append(part)
        return merge_results(parts)

    @contextmanager
    def _locked(self, store: BatchStore, label: str) -> Iterator[None]:
        """Hold ``store``'s lock while the cell is computed: rank 0 takes it, and every rank of a
        sharded run waits until it has; another process holding it is waited for (polled, so a
        long wait never trips torch.distributed's timeout)."""
        rank0 = dist.world()[0] == 0
        told = False
        try:
            while not dist.broadcast_from_rank0(store.try_lock() if rank0 else True):
                if rank0 and not told:
                    log.warning(f"{label}: another robustkit eval is computing this cell in {self.board.path}; "
                                f"waiting for it to finish (its rows are then reused).")
                    told = True
                time.sleep(LOCK_POLL_S)
            yield
        finally:
            store.unlock()

    def _diagnosing(self) -> bool:
        if self.spec.diagnose is not None:
            return self.spec.diagnose
        return any(canonical_attack(a).partition(":")[0] in ("autoattack", "pyautoattack")
                   for a in self.spec.attack if a.strip().lower() != TRANSFER)

    def _diagnose(self, model: torch.nn.Module, attacks: list[tuple[str, Attack]], threat: ThreatModel,
                  result: EvalResult) -> list[str]:
        idx = torch.from_numpy(result.clean_correct.nonzero()[0][:64])
        x, y = self.dataset.x[idx].to(self.device), self.dataset.y[idx].to(self.device)
        warnings = diag.sanity_checks(model, x, y, self.dataset.num_classes, threat, self.dataset.name)
        names = [n for n, _ in attacks]
        warnings += diag.black_box_stronger(result, [n for n in names if n in SCORE_BASED],
                                            [n for n in names if n not in SCORE_BASED])
        for name, attack in attacks:
            warnings += diag.square_after_gradient_stages(result, name) if attack.stage_names() else []
        if len(idx) and threat.norm in PGD.supported_norms:
            warnings += diag.unbounded_and_loss_checks(model, x, y, threat, PGD)
        return warnings

    def run(self, progress: CellProgress | None = None) -> list[CellReport | CurveReport]:
        """All cells, models outer and eps inner (a model's curve cell first); adds the
        eps-monotonicity check per model."""
        reports: list[CellReport | CurveReport] = []
        for i in range(len(self.spec.model)):
            curve = self.run_curve(i, progress)
            if curve is not None:
                reports.append(curve)
            cells = [self.run_cell(i, threat, progress, curve) for threat in self.threats]
            cells = [c for c in cells if c is not None]
            if len(cells) > 1 and self._diagnosing():
                for name in sorted({r.attack for c in cells for r in c.rows + c.existing}):
                    curve = [(c.eps, r.robust_acc) for c in cells for r in c.rows + c.existing if r.attack == name]
                    cells[-1].warnings += diag.non_monotone_in_eps(curve, f"{self.spec.model[i]} / {name}")
            reports += cells
        return reports


def _combined(rows: list[ResultRow], derived: list[ResultRow]) -> list[ResultRow]:
    """A cell's rows in reading order: each attack, then the minimum-norm attacks' derived rows,
    then the combined rows (``transfer``, ``worst-case``)."""
    combined = [r for r in rows if r.attack in (TRANSFER, WORST_CASE)]
    return [r for r in rows if r not in combined] + derived + combined


def worst_case(result: EvalResult, attacks: Sequence[str]) -> Any:
    """Per-sample robustness under all of ``attacks`` at once: clean-correct and broken by none."""
    robust = result.clean_correct.copy()
    for name in attacks:
        robust &= ~result.broken(name)
    return robust


def _surrogate_labels(spec: EvalSpec) -> list[tuple[str, str | None, str, str]]:
    """``(name, checkpoint, label, sha256)`` per surrogate of ``spec``."""
    labels = surrogate_labels(spec.surrogate, spec.surrogate_checkpoint)
    return [(name, spec.surrogate_checkpoint_of(i), label, sha)
            for i, (name, (label, sha)) in enumerate(zip(spec.surrogate, labels, strict=True))]


def _cache_name(db: Path) -> str:
    """The folder of a database's batch caches: its file name and a hash of its absolute path, so
    two databases in one folder never share (or clear) each other's caches."""
    path = Path(db).resolve()
    return f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def default_dataset(model: str) -> str:
    """The registered data set ``model`` is built for (by input size and classes), else digits."""
    if is_external(model) or model not in MODELS:
        return "digits"
    info = model_info(model)
    return DATASET_FOR_INPUT.get((tuple(info.input_size), info.num_classes), "digits")


def _model_from_sidecar(checkpoint: str | None) -> str:
    """The model a ``robustkit train`` checkpoint's sidecar records (so --model can be left out);
    the default model when the checkpoint has no sidecar."""
    side = read_sidecar(checkpoint) if checkpoint else None
    return sidecar_model_name(side) if side is not None else "digits-cnn"


def _load(name: str, checkpoint: str | None, spec: EvalSpec) -> torch.nn.Module:
    """The model; a checkpoint written by ``robustkit train`` brings its own normalization and transforms."""
    side = read_sidecar(checkpoint) if checkpoint else None
    if side is not None and spec.normalize == "default" and sidecar_model_name(side) == name:
        if spec.sha256:
            check_sha256(Path(checkpoint), spec.sha256)
        return load_trained_model(checkpoint)
    if rb.is_robustbench(name):
        return load_model(name, checkpoint, normalize=spec.normalize, sha256=spec.sha256,
                          model_dir=spec.model_dir, download=spec.download)
    return load_model(name, checkpoint, normalize=spec.normalize, sha256=spec.sha256, seed=spec.seed)


def defense_label(name: str | None, kwargs: dict[str, Any]) -> str:
    """The leaderboard's defense field: the canonical name, plus its options when any are set.
    Only ``inference`` defenses (model wrappers) apply at evaluation time."""
    if not name:
        if kwargs:
            raise UsageError("--defense-kwargs was given without --defense.")
        return ""
    # heavy, only for --defense: importing robustkit.defenses loads every defense
    import robustkit.defenses  # noqa: F401  (registers the defenses)
    from robustkit.defenses.kinds import defense_of_kind

    key, _ = defense_of_kind(name, "inference", "robustkit eval --defense")
    return key + (canonical_json(kwargs) if kwargs else "")


def wrap_defense(model: torch.nn.Module, name: str | None, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``model`` behind the inference defense ``name`` (unchanged without one)."""
    if not name:
        return model
    cls = DEFENSES.get(name)
    try:
        return cls(model, **kwargs).eval()
    except TypeError as e:
        raise UsageError(f"Bad options for defense {name}: {e}.") from None


def run_grid(spec: EvalSpec, *, db: str | Path | None = None, overwrite: bool = False,
             progress: CellProgress | None = None) -> list[CellReport | CurveReport]:
    """Evaluate every cell of ``spec`` (per model: its minimum-norm attacks' :class:`CurveReport`
    first, then a :class:`CellReport` per eps); under torchrun only rank 0 gets the reports (others: []).
    A ``progress`` with a ``plan`` method is shown the :class:`Grid` before any work (its data,
    attacks and batch size: what the run will cost)."""
    started = dist.init_from_env(spec.device, timeout_s=spec.dist_timeout)
    try:
        grid = Grid(spec, db=db, overwrite=overwrite)
        if hasattr(progress, "plan"):
            progress.plan(grid)  # type: ignore[union-attr]
        return grid.run(progress)
    finally:
        if started:  # no barrier: a worker done with its batches leaves while rank 0 still merges
            dist.shutdown()


def curve_summary(curve: rc.Curve) -> dict[str, Any]:
    """A curve as ``--json`` shows it: its key, distance summary and accuracy on its eps grid."""
    s = curve.summary
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no inf: null)
    return {"model": curve.model, "checkpoint_sha256": curve.checkpoint_sha256, "defense": curve.defense,
            "dataset": curve.dataset, "n_examples": curve.n_examples, "norm": curve.norm, "attack": curve.attack,
            "attack_config": curve.attack_config, "seed": curve.seed, "clean_acc": finite(s.clean_acc),
            "median_distance": finite(s.median), "mean_distance": finite(s.mean), "found": finite(s.found),
            "curve": [{"eps": e, "robust_acc": a} for e, a in zip(curve.eps_grid, curve.robust_acc, strict=True)],
            "seconds": curve.seconds, "records": curve.extra.get("records")}


def summary(reports: Sequence[CellReport | CurveReport]) -> list[dict[str, Any]]:
    """Machine-readable summary (``--json``): every row of every cell, with warnings, and every
    curve (``"kind": "curve"``; rows have ``"kind": "row"``)."""
    out: list[dict[str, Any]] = []
    for c in reports:
        if isinstance(c, CurveReport):
            out += [{"kind": "curve", **curve_summary(k)} for k in c.existing + c.curves]
        else:
            out += [{"kind": "row", **dataclasses.asdict(r), "warnings": c.warnings} for r in c.existing + c.rows]
    return out


def dump_json(reports: Sequence[CellReport | CurveReport]) -> str:
    return json.dumps(summary(reports), indent=2, default=str)


__all__ = ["TRANSFER", "WORST_CASE", "CellReport", "CurveReport", "EvalSpec", "Grid", "ProgressFn", "dump_json",
           "parse_kwargs", "run_grid", "summary", "worst_case"]
