"""Evaluation runner: clean accuracy, each attack's robust accuracy and the per-sample worst case.

Work is done batch by batch over the dataset (fixed batch boundaries): for every batch, the clean
prediction, then each attack on the batch's clean-correct points. Each attack is seeded afresh per
batch, so a batch's outcome does not depend on which process computed it or when — this is what
makes resume (``BatchStore``) and sharding (``shard=(rank, world)``) give the numbers of one
uninterrupted run. A point is robust in the worst case only if every attack failed on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from robustkit.attack import Attack, logits_of
from robustkit.data import Dataset
from robustkit.determinism import deterministic_cuda
from robustkit.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock, so concurrent runs of one cell are not kept apart there
    fcntl = None  # type: ignore[assignment]


@dataclass
class EvalResult:
    """Per-sample arrays of one evaluation (all of length n, in dataset order) and timings.

    ``arrays`` holds ``index``, ``label``, ``clean_pred``, ``final_pred``, ``final_norm`` and, per
    attack ``a``, ``success:a`` (bool), ``queries:a`` (int, -1 unknown) and ``norm:a`` (float); a
    cascade adds ``stage:a|s`` (broken after its stage ``s``), a minimum-norm attack ``distance:a``
    (float32: the norm of its adversarial point, inf where it found none, 0 for points
    misclassified from the start).
    """

    attacks: list[str]
    arrays: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    x_adv: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.arrays["index"])

    @property
    def clean_correct(self) -> np.ndarray:
        return self.arrays["clean_pred"] == self.arrays["label"]

    @property
    def clean_acc(self) -> float:
        return float(self.clean_correct.mean())

    def broken(self, attack: str) -> np.ndarray:
        return self.arrays[f"success:{attack}"]

    def robust(self, attack: str | None = None) -> np.ndarray:
        """Per-sample robustness under one attack, or under all of them (None: the worst case)."""
        robust = self.clean_correct.copy()
        for name in [attack] if attack else self.attacks:
            robust &= ~self.broken(name)
        return robust

    def robust_acc(self, attack: str | None = None) -> float:
        return float(self.robust(attack).mean())

    def distance(self, attack: str) -> np.ndarray | None:
        """A minimum-norm attack's per-sample distances (None for other attacks)."""
        return self.arrays.get(f"distance:{attack}")

    def stage_accs(self, attack: str) -> dict[str, float]:
        """A cascade's robust accuracy after each of its stages (AutoAttack's per-attack report)."""
        prefix = f"stage:{attack}|"
        return {key[len(prefix):]: float((self.clean_correct & ~broken).mean())
                for key, broken in self.arrays.items() if key.startswith(prefix)}


class BatchStore:
    """Per-batch results on disk, each written atomically, so a killed run resumes where it stopped.

    Its lock (:meth:`try_lock`) lets one process at a time compute and then clear the store; the
    ranks of one sharded run share it under the lock their rank 0 holds.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock: TextIO | None = None

    def try_lock(self) -> bool:
        """Take the store's exclusive lock (flock on ``.lock``) without waiting; False when another
        process (or another store object) holds it. The OS drops it when its process dies."""
        if fcntl is None:
            return True
        if self._lock is None:
            self._lock = open(self.directory / ".lock", "a")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        """Release the lock (closing the file releases the flock); a no-op when not held."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _path(self, batch: int) -> Path:
        return self.directory / f"batch_{batch:06d}.npz"

    def load(self, batch: int) -> dict[str, np.ndarray] | None:
        path = self._path(batch)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def save(self, batch: int, arrays: dict[str, np.ndarray]) -> None:
        tmp = self.directory / f".batch_{batch:06d}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self._path(batch))

    def clear(self) -> None:
        for path in self.directory.glob("batch_*.npz"):
            path.unlink()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. On CUDA it also makes the process deterministic
    (cuDNN deterministic, no benchmark, no TF32), so resume and sharding give one run's numbers."""
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"Unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu.")
    if dev.type == "cuda":
        deterministic_cuda()
    return dev


def check_model_fits(model: nn.Module, dataset: Dataset, device: torch.device) -> None:
    """Fail early, in one sentence, when the model cannot take the dataset's images or labels."""
    shape = tuple(dataset.x.shape[1:])
    try:
        with torch.no_grad():
            out = model.eval()(dataset.x[:2].to(device))
    except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts input sizes
        first = str(e).strip().splitlines()[0][:160]
        raise UsageError(f"The model cannot take {dataset.name} images of shape {shape}: {first}") from None
    out = logits_of(out)
    if out.dim() != 2:
        raise UsageError(f"The model must return logits of shape (N, classes), got shape {tuple(out.shape)}.")
    if out.shape[1] < dataset.num_classes:
        raise UsageError(f"The model has {out.shape[1]} outputs but {dataset.name} has {dataset.num_classes} classes.")


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# progress(batches_done, batches_total, robust_so_far, evaluated_so_far); once with 0 done before the first batch
ProgressFn = Callable[[int, int, int, int], None]


def _attack_batch(
    model: nn.Module, attacks: Sequence[tuple[str, Attack]], x: torch.Tensor, y: torch.Tensor, start: int,
    keep_adv: bool,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Clean prediction and every attack on one batch; returns its per-sample arrays and timings."""
    seconds: dict[str, float] = {}
    t0 = _clock(x.device)
    with torch.no_grad():
        clean_pred = logits_of(model(x)).argmax(1)
    seconds["clean"] = _clock(x.device) - t0
    correct = (clean_pred == y).nonzero().flatten()
    arrays: dict[str, np.ndarray] = {
        "index": np.arange(start, start + len(y)), "label": y.cpu().numpy(), "clean_pred": clean_pred.cpu().numpy()}
    final_adv = x.clone()
    final_found = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for name, attack in attacks:
        t0 = _clock(x.device)
        success = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        queries = torch.full((len(y),), -1, dtype=torch.long, device=x.device)
        norms = torch.zeros(len(y), device=x.device)
        stages = {stage: torch.zeros_like(success) for stage in attack.stage_names()}
        # a minimum-norm attack's distances: 0 where the clean prediction is already wrong
        distance = torch.zeros(len(y), device=x.device) if getattr(attack, "minimum_norm", False) else None
        if len(correct):
            out = attack(model, x[correct], y[correct])
            success[correct] = out.success
            for stage, broken in stages.items():
                broken[correct] = out.stages[stage] if out.stages else out.success
            if out.queries is not None:
                queries[correct] = out.queries
            norms[correct] = attack.threat.norm_of(out.x_adv - x[correct]).float()
            if distance is not None:
                distance[correct] = out.distance.float()
            # the worst-case example: the first attack that succeeded, else the last attempt
            take = correct[~final_found[correct]]
            final_adv[take] = out.x_adv[~final_found[correct]]
            final_found[correct] |= out.success
        arrays[f"success:{name}"] = success.cpu().numpy()
        arrays[f"queries:{name}"] = queries.cpu().numpy()
        arrays[f"norm:{name}"] = norms.cpu().numpy()
        if distance is not None:
            arrays[f"distance:{name}"] = distance.cpu().numpy()
        for stage, broken in stages.items():
            arrays[f"stage:{name}|{stage}"] = broken.cpu().numpy()
        seconds[name] = _clock(x.device) - t0
    with torch.no_grad():
        final_pred = logits_of(model(final_adv)).argmax(1) if attacks and len(correct) else clean_pred
    arrays["final_pred"] = final_pred.cpu().numpy()
    threat_norm = attacks[0][1].threat.norm_of(final_adv - x) if attacks else torch.zeros(len(y))
    arrays["final_norm"] = threat_norm.float().cpu().numpy()
    if keep_adv:
        arrays["x_adv"] = final_adv.cpu().numpy()
    return arrays, seconds


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    attacks: Sequence[tuple[str, Attack]],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    store: BatchStore | None = None,
    shard: tuple[int, int] = (0, 1),
    keep_adv: bool = False,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate ``attacks`` on ``dataset``. Batches already in ``store`` are read, not recomputed;
    with ``shard=(rank, world)`` only batches ``rank, rank+world, …`` are done (merge the
    per-rank results with :func:`merge_results`)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    model = model.to(dev).eval()
    check_model_fits(model, dataset, dev)
    rank, world = shard
    starts = list(range(0, len(dataset), batch_size))[rank::world]
    parts: list[dict[str, np.ndarray]] = []
    seconds: dict[str, float] = {"clean": 0.0, **{name: 0.0 for name, _ in attacks}}
    names = [name for name, _ in attacks]
    robust = evaluated = 0
    if progress:  # the cell starts (a display may move within the first batch)
        progress(0, len(starts), 0, 0)
    for done, start in enumerate(starts, 1):
        batch = start // batch_size
        arrays = store.load(batch) if store else None
        if arrays is None or (keep_adv and "x_adv" not in arrays):
            x = dataset.x[start:start + batch_size].to(dev)
            y = dataset.y[start:start + batch_size].to(dev)
            arrays, spent = _attack_batch(model, attacks, x, y, start, keep_adv)
            for key, value in spent.items():
                seconds[key] += value
            if store:
                store.save(batch, arrays)
        parts.append(arrays)
        part = EvalResult(names, arrays)
        robust += int(part.robust().sum())
        evaluated += part.n
        if progress:
            progress(done, len(starts), robust, evaluated)
    if not parts and world > 1:  # fewer batches than ranks: this one had none; rank 0 merges the others
        return _to_result(names, parts, seconds)
    return merge_results([_to_result(names, parts, seconds)])


def _to_result(names: list[str], parts: list[dict[str, np.ndarray]], seconds: dict[str, float]) -> EvalResult:
    keys = [k for k in (parts[0] if parts else {}) if k != "x_adv"]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys} if parts else {}
    x_adv = torch.from_numpy(np.concatenate([p["x_adv"] for p in parts])) if parts and "x_adv" in parts[0] else None
    return EvalResult(names, arrays, seconds, x_adv)


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """Merge per-rank results into one, in dataset order; seconds are summed."""
    results = [r for r in results if r.arrays]
    if not results:
        raise UsageError("Nothing was evaluated: the dataset is empty.")
    names = results[0].attacks
    order = np.argsort(np.concatenate([r.arrays["index"] for r in results]), kind="stable")
    arrays = {k: np.concatenate([r.arrays[k] for r in results])[order] for k in results[0].arrays}
    seconds: dict[str, float] = {}
    for r in results:
        for key, value in r.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
    x_adv = None
    if all(r.x_adv is not None for r in results):
        x_adv = torch.cat([r.x_adv for r in results])[torch.from_numpy(order)]
    return EvalResult(names, arrays, seconds, x_adv)
