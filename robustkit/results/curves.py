"""Robustness curves of minimum-norm attacks: per-sample distances in, curves, summaries and
AttackBench's optimality out, stored next to the leaderboard's rows.

A minimum-norm attack run without eps gives each point's distance ``d_i`` to the nearest
adversarial point it found (``inf``: none found; ``0``: misclassified from the start). That one
run answers every radius at once: the point is robust at ``eps`` exactly when ``d_i > eps``, so
robust accuracy at ``eps`` is the fraction of points with ``d_i > eps`` (eps 0 gives the clean
accuracy). Comparisons are made in float32, as the attacks make them, so a row derived here at
``eps`` is what the attack run at that eps reports.

Curves live in the leaderboard file, table ``curves``: one row per (model, checkpoint, defense,
data, n, norm, attack and its config, seed), unique like the leaderboard's rows, holding the
distances (float32, data set order), the eps grid and the accuracy on it. Several attacks combine
per sample, the smallest distance winning (AttackBench's ensemble, :func:`ensemble`).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustkit.errors import ResultExistsError, UsageError
from robustkit.radii import STANDARD_RADII  # the summary's columns and the span of the default eps grid
from robustkit.results.leaderboard import PROVENANCE_COLUMNS, Leaderboard, canonical_json
from robustkit.units import eps_str

GRID_POINTS = 40  # steps of the grid where no 1/255 unit applies

KEY_FIELDS = ("model", "checkpoint_sha256", "defense", "dataset", "n_examples", "norm", "attack", "attack_config",
              "seed")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS curves (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL DEFAULT '',
    defense TEXT NOT NULL DEFAULT '',
    dataset TEXT NOT NULL,
    n_examples INTEGER NOT NULL,
    norm TEXT NOT NULL,
    attack TEXT NOT NULL,
    attack_config TEXT NOT NULL DEFAULT '{{}}',
    seed INTEGER NOT NULL,
    clean_acc REAL,
    median_distance REAL,
    mean_distance REAL,
    found REAL,
    eps_grid TEXT NOT NULL,
    robust_acc TEXT NOT NULL,
    distances BLOB NOT NULL,
{PROVENANCE_COLUMNS}    UNIQUE ({", ".join(KEY_FIELDS)})
)
"""


# -- the numbers ---------------------------------------------------------------------------------
def as_distances(distances: Any) -> np.ndarray:
    """Distances as the float32 vector everything here compares in."""
    return np.asarray(distances, dtype=np.float32).reshape(-1)


def robust_at(distances: Any, eps: float) -> np.ndarray:
    """Per sample: robust at ``eps`` (distance > eps, float32 as the attacks compare; inf: no
    adversarial point found, robust at every radius)."""
    return as_distances(distances) > np.float32(eps)


def robust_accuracy(distances: Any, eps: Sequence[float]) -> list[float]:
    """Robust accuracy at each radius of ``eps`` (over all points; eps 0 gives the clean accuracy)."""
    d = as_distances(distances)
    return [float(robust_at(d, e).mean()) if len(d) else math.nan for e in eps]


@dataclass(frozen=True)
class DistanceSummary:
    """``clean_acc``: fraction of points classified correctly (distance > 0). Over those points:
    ``median`` distance (points with no adversarial point found count as inf, so a median past the
    found ones is inf), ``mean`` distance of the points where one was found (nan if none), and
    ``found``: the fraction where one was found (the attack's success rate)."""

    clean_acc: float
    median: float
    mean: float
    found: float


def summarize(distances: Any) -> DistanceSummary:
    d = as_distances(distances)
    correct = d[d > 0]
    finite = correct[np.isfinite(correct)]
    return DistanceSummary(
        clean_acc=float((d > 0).mean()) if len(d) else math.nan,
        median=float(np.median(correct.astype(np.float64))) if len(correct) else math.nan,
        mean=float(finite.astype(np.float64).mean()) if len(finite) else math.nan,
        found=float(len(finite) / len(correct)) if len(correct) else math.nan)


def ensemble(distances: Sequence[Any]) -> np.ndarray:
    """Several attacks on the same points combined per sample: the smallest distance wins."""
    return np.minimum.reduce([as_distances(d) for d in distances])


def _nice_ceil(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``value``."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-9))


def eps_grid(norm: str, dataset: str, distances: Any = None) -> list[float]:
    """The radii a curve is tabulated at (the distances hold the whole curve; this is what is
    stored and plotted).

    Where the data set has a standard radius ``r`` (:data:`STANDARD_RADII`): Linf in the images'
    8-bit unit, every k/255 up to 2r, then every 4/255 up to 4r (CIFAR-10: 0..16/255, then
    20/255..32/255); other norms 0..4r in steps of r/10 (CIFAR-10 L2: 0, 0.05, .., 2). Elsewhere
    (L1, L0, digits) 0 to the largest distance found, rounded up, in 40 steps (whole steps for L0)."""
    radii = STANDARD_RADII.get((dataset, norm))
    if radii and norm == "linf":
        fine = round(2 * max(radii) * 255)
        top = min(round(4 * max(radii) * 255), 255)
        return [k / 255 for k in range(fine + 1)] + [k / 255 for k in range(fine + 4, top + 1, 4)]
    if radii:
        step = max(radii) / 10
        return [round(i * step, 10) for i in range(4 * 10 + 1)]
    d = as_distances(distances if distances is not None else [])
    finite = d[np.isfinite(d) & (d > 0)]
    upper = _nice_ceil(float(finite.max())) if len(finite) else 1.0
    if norm == "l0":
        step = max(1, math.ceil(upper / GRID_POINTS))
        return [float(i * step) for i in range(math.ceil(upper / step) + 1)]
    return [round(upper * i / GRID_POINTS, 10) for i in range(GRID_POINTS + 1)]


def optimality(distances: Any, envelope: Any) -> float:
    """AttackBench's optimality of an attack (Cinà et al., 2024): how close its security curve
    (robust accuracy vs eps) comes to the per-sample best-known one, the ``envelope``:

        1 - (A - A*) / (clean_acc * D - A*)

    with A, A* the areas under the attack's and the envelope's curves over [0, D], D the largest
    finite distance of the envelope, and clean_acc * D the area of an attack that finds nothing.
    1: the attack matches the envelope; 0: it finds nothing. The areas are exact: under a step
    curve, the area up to D is the mean of min(d_i, D) (AttackBench integrates the same curve by
    trapezoids between its jumps)."""
    d, best = as_distances(distances).astype(np.float64), as_distances(envelope).astype(np.float64)
    finite = best[np.isfinite(best)]
    if not len(finite) or finite.max() <= 0:
        return math.nan
    top = float(finite.max())
    area, best_area = float(np.minimum(d, top).mean()), float(np.minimum(best, top).mean())
    worst = float((best > 0).mean()) * top
    if worst <= best_area:
        return math.nan
    return 1.0 - (area - best_area) / (worst - best_area)


# -- the store -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Curve:
    """One curve: an attack (or an ensemble, ``attack_config['attacks']``) run without eps on the
    first ``n_examples`` points of a data set, with its per-sample ``distances``."""

    model: str
    checkpoint_sha256: str = ""
    defense: str = ""
    dataset: str
    n_examples: int
    norm: str
    attack: str
    attack_config: dict[str, Any] = field(default_factory=dict)
    seed: int
    distances: np.ndarray
    eps_grid: tuple[float, ...]
    seconds: float = 0.0
    robustkit_version: str = ""
    torch_version: str = ""
    device: str = ""
    timestamp: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> DistanceSummary:
        return summarize(self.distances)

    @property
    def robust_acc(self) -> list[float]:
        """Robust accuracy at each radius of :attr:`eps_grid`."""
        return robust_accuracy(self.distances, self.eps_grid)

    @property
    def is_ensemble(self) -> bool:
        return "attacks" in self.attack_config

    def describe(self) -> str:
        defense = f" + {self.defense}" if self.defense else ""
        return (f"{self.model}{defense} on {self.dataset} (n={self.n_examples}), {self.norm}, {self.attack}, "
                f"seed {self.seed}")


def _to_db(curve: Curve) -> dict[str, Any]:
    s = curve.summary
    return {
        "model": curve.model, "checkpoint_sha256": curve.checkpoint_sha256, "defense": curve.defense,
        "dataset": curve.dataset, "n_examples": int(curve.n_examples), "norm": curve.norm, "attack": curve.attack,
        "attack_config": canonical_json(curve.attack_config), "seed": int(curve.seed), "clean_acc": s.clean_acc,
        "median_distance": s.median, "mean_distance": s.mean, "found": s.found,
        "eps_grid": json.dumps([float(e) for e in curve.eps_grid]), "robust_acc": json.dumps(curve.robust_acc),
        "distances": as_distances(curve.distances).astype("<f4").tobytes(), "seconds": float(curve.seconds),
        "robustkit_version": curve.robustkit_version, "torch_version": curve.torch_version, "device": curve.device,
        "timestamp": curve.timestamp, "extra": canonical_json(curve.extra),
    }  # fmt: skip


def _from_db(record: sqlite3.Row) -> Curve:
    return Curve(
        model=record["model"], checkpoint_sha256=record["checkpoint_sha256"], defense=record["defense"],
        dataset=record["dataset"], n_examples=record["n_examples"], norm=record["norm"], attack=record["attack"],
        attack_config=json.loads(record["attack_config"]), seed=record["seed"],
        distances=np.frombuffer(record["distances"], dtype="<f4").astype(np.float32),
        eps_grid=tuple(json.loads(record["eps_grid"])), seconds=record["seconds"] or 0.0,
        robustkit_version=record["robustkit_version"], torch_version=record["torch_version"],
        device=record["device"], timestamp=record["timestamp"], extra=json.loads(record["extra"]))  # fmt: skip


class CurveStore:
    """The ``curves`` table of a leaderboard file (created on first write; WAL and busy timeout as
    the leaderboard's, so concurrent evaluations never duplicate a curve)."""

    def __init__(self, db: str | Path | Leaderboard | None = None, *, create: bool = True) -> None:
        self.board = db if isinstance(db, Leaderboard) else Leaderboard(db, create=create)
        self.path = Path(self.board.path)
        if create:
            with self.board.connect() as conn:
                conn.execute(_SCHEMA)

    def _has_table(self, conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='curves'").fetchone() is not None

    def add(self, curve: Curve, *, overwrite: bool = False) -> None:
        """Store ``curve``; one with the same key is an error unless ``overwrite`` (one statement)."""
        values = _to_db(curve)
        sql = f"INSERT INTO curves ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"
        if overwrite:
            sql += (f" ON CONFLICT ({', '.join(KEY_FIELDS)}) DO UPDATE SET "
                    + ", ".join(f"{k} = excluded.{k}" for k in values))
        with self.board.connect() as conn:
            conn.execute(_SCHEMA)
            try:
                conn.execute(sql, values)
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" not in str(exc):
                    raise
                raise ResultExistsError(f"This curve is already in the leaderboard ({curve.describe()}); "
                                        "pass --overwrite to replace it.") from None

    def get(self, curve: Curve) -> Curve | None:
        """The stored curve with the same key as ``curve`` (its distances may differ), or None."""
        values = _to_db(curve)
        where = " AND ".join(f"{k} = ?" for k in KEY_FIELDS)
        with self.board.connect() as conn:
            if not self._has_table(conn):
                return None
            record = conn.execute(f"SELECT * FROM curves WHERE {where}", [values[k] for k in KEY_FIELDS]).fetchone()
        return _from_db(record) if record is not None else None

    def curves(self, **filters: Any) -> list[Curve]:
        """Stored curves whose fields equal the filters (None: any; a list: any of)."""
        clauses, params = [], []
        for name, wanted in filters.items():
            if wanted is None:
                continue
            if name not in KEY_FIELDS:
                raise UsageError(f"Cannot filter curves by {name!r}; fields are: {', '.join(KEY_FIELDS)}.")
            options = list(wanted) if isinstance(wanted, list | tuple | set) else [wanted]
            if name == "attack_config":
                options = [canonical_json(v) for v in options]
            clauses.append(f"{name} IN ({', '.join('?' * len(options))})")
            params += options
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.board.connect() as conn:
            if not self._has_table(conn):
                return []
            records = conn.execute(f"SELECT * FROM curves {where} ORDER BY dataset, norm, model, defense, "
                                   "n_examples, seed, attack, id", params).fetchall()
        return [_from_db(r) for r in records]


# -- exports -------------------------------------------------------------------------------------
FRAME_COLUMNS = ("model", "defense", "checkpoint", "dataset", "norm", "attack", "n", "seed", "eps", "eps_str",
                 "robust_acc", "clean_acc", "radius_dataset", "attack_config")
SUMMARY_COLUMNS = ("model", "defense", "checkpoint", "dataset", "norm", "attack", "n", "seed", "clean_acc",
                   "median_distance", "mean_distance", "found", "radius_dataset", "attack_config")


def _store(db: str | Path | Leaderboard | CurveStore | None) -> CurveStore:
    return db if isinstance(db, CurveStore) else CurveStore(db, create=False)


def _identity(c: Curve) -> dict[str, Any]:
    return {"model": c.model, "defense": c.defense, "checkpoint": c.checkpoint_sha256, "dataset": c.dataset,
            "norm": c.norm, "attack": c.attack, "n": c.n_examples, "seed": c.seed}


def radius_dataset(curve: Curve) -> str:
    """The data set whose standard radii apply (images from a file: the one the model is built for)."""
    return str(curve.extra.get("radius_dataset") or curve.dataset)


def curve_frame(db: str | Path | Leaderboard | CurveStore | None = None, **filters: Any) -> pd.DataFrame:
    """Every stored curve, one row per eps of its grid: model, defense, checkpoint (sha256),
    dataset, norm, attack, n, seed, eps, eps_str, robust_acc, clean_acc, radius_dataset (the data
    set whose units and radii apply: images from an npz file name the one the model is built
    for), attack_config (JSON).
    Filters as :meth:`CurveStore.curves` (model=, dataset=, norm=, attack=, ...)."""
    records = []
    for c in _store(db).curves(**filters):
        clean, config = c.summary.clean_acc, canonical_json(c.attack_config)
        for eps, acc in zip(c.eps_grid, c.robust_acc, strict=True):
            records.append({**_identity(c), "eps": float(eps), "eps_str": eps_str(eps) if eps else "0",
                            "robust_acc": acc, "clean_acc": clean, "radius_dataset": radius_dataset(c),
                            "attack_config": config})
    return pd.DataFrame(records, columns=list(FRAME_COLUMNS))


def curve_summary_frame(db: str | Path | Leaderboard | CurveStore | None = None, **filters: Any) -> pd.DataFrame:
    """One row per stored curve: clean accuracy, median and mean distance and success rate (see
    :class:`DistanceSummary`), and the robust accuracy at the standard radii of its data set and
    norm (:data:`STANDARD_RADII`), one column ``robust_acc@<eps>`` per radius (empty where it
    does not apply)."""
    records, radii_columns = [], {}
    for c in _store(db).curves(**filters):
        s = c.summary
        record = {**_identity(c), "clean_acc": s.clean_acc, "median_distance": s.median, "mean_distance": s.mean,
                  "found": s.found, "radius_dataset": radius_dataset(c),
                  "attack_config": canonical_json(c.attack_config)}
        for r in STANDARD_RADII.get((radius_dataset(c), c.norm), ()):
            column = f"robust_acc@{eps_str(r)}"
            radii_columns[column] = (c.norm, r)
            record[column] = float(robust_at(c.distances, r).mean())
        records.append(record)
    order = sorted(radii_columns, key=lambda k: (radii_columns[k][0], radii_columns[k][1]))
    return pd.DataFrame(records, columns=[*SUMMARY_COLUMNS, *order])


GROUP_FIELDS = ("model", "checkpoint_sha256", "defense", "dataset", "n_examples", "norm", "seed")
OPTIMALITY_COLUMNS = ("model", "defense", "dataset", "norm", "n", "seed", "rank", "attack", "optimality",
                      "median_distance", "found", "best_on", "seconds", "attack_config")


def optimality_frame(db: str | Path | Leaderboard | CurveStore | None = None, **filters: Any) -> pd.DataFrame:
    """AttackBench's optimality (:func:`optimality`) of every stored single-attack curve against
    the per-sample envelope of all single-attack curves run on the same points (same model,
    checkpoint, defense, data, n, norm and seed), ranked best first within each group.
    ``best_on``: the fraction of clean-correct points where the attack attains the envelope.
    Ensemble curves are left out: they are made of the attacks ranked."""
    groups: dict[tuple[Any, ...], list[Curve]] = {}
    for c in _store(db).curves(**filters):
        if not c.is_ensemble:
            groups.setdefault(tuple(getattr(c, f) for f in GROUP_FIELDS), []).append(c)
    records = []
    for curves in groups.values():
        envelope = ensemble([c.distances for c in curves])
        correct = envelope > 0
        scored = []
        for c in curves:
            d = as_distances(c.distances)
            scored.append({**_identity(c), "optimality": optimality(d, envelope), "median_distance": c.summary.median,
                           "found": c.summary.found,
                           "best_on": float((d[correct] <= envelope[correct]).mean()) if correct.any() else math.nan,
                           "seconds": c.seconds, "attack_config": canonical_json(c.attack_config)})
        scored.sort(key=lambda r: (-r["optimality"] if math.isfinite(r["optimality"]) else math.inf, r["attack"]))
        for rank, r in enumerate(scored, 1):
            records.append({**r, "rank": rank})
    return pd.DataFrame(records, columns=list(OPTIMALITY_COLUMNS))


__all__ = ["Curve", "CurveStore", "DistanceSummary", "curve_frame", "curve_summary_frame",
           "ensemble", "eps_grid", "optimality", "optimality_frame", "robust_accuracy", "robust_at", "summarize"]
