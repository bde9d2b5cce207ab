"""Evaluation runner: clean accuracy, each attack's robust accuracy and the per-sample worst case.

Each attack runs on every clean-correct point, so its own robust accuracy is reported; a point
counts as robust in the worst case only if every attack failed on it (as AutoAttack reports).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .attack import Attack
from .data import Dataset
from .errors import UsageError


@dataclass
class EvalResult:
    """Outcome of one evaluation: accuracies in [0, 1] and per-sample masks."""

    n: int
    clean_correct: torch.Tensor  # (n,) bool
    broken: dict[str, torch.Tensor] = field(default_factory=dict)  # attack -> (n,) bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def clean_acc(self) -> float:
        return float(self.clean_correct.double().mean())

    def robust_acc(self, attack: str | None = None) -> float:
        """Robust accuracy under one attack, or the per-sample worst case over all (None)."""
        if attack is not None:
            return float((self.clean_correct & ~self.broken[attack]).double().mean())
        robust = self.clean_correct.clone()
        for mask in self.broken.values():
            robust &= ~mask
        return float(robust.double().mean())


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"Unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu.")
    return dev


def check_model_fits(model: nn.Module, dataset: Dataset, device: torch.device) -> None:
    """Fail early, in one sentence, when the model cannot take the dataset's images or labels."""
    shape = tuple(dataset.x.shape[1:])
    try:
        with torch.no_grad():
            out = model.eval()(dataset.x[:2].to(device))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UsageError(f"The model cannot take {dataset.name} images of shape {shape}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UsageError("The model must return a logits tensor of shape (N, classes).")
    if out.shape[1] < dataset.num_classes:
        raise UsageError(f"The model has {out.shape[1]} outputs but {dataset.name} has {dataset.num_classes} classes.")


ProgressFn = Callable[[str, int, int], None]


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    attacks: Sequence[tuple[str, Attack]],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Clean accuracy and each attack's success on ``dataset``; ``progress(stage, done, total)``
    is called after every batch."""
    dev = resolve_device(device) if isinstance(device, str) else device
    model = model.to(dev).eval()
    check_model_fits(model, dataset, dev)
    n = len(dataset)
    t0 = time.perf_counter()
    correct = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for i, x, y in dataset.batches(batch_size):
            correct[i : i + len(y)] = model(x.to(dev)).argmax(1).cpu() == y
            if progress:
                progress("clean", i + len(y), n)
    result = EvalResult(n=n, clean_correct=correct, seconds={"clean": time.perf_counter() - t0})
    for name, attack in attacks:
        t0 = time.perf_counter()
        broken = torch.zeros(n, dtype=torch.bool)
        idx = correct.nonzero().flatten()
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            out = attack(model, dataset.x[rows].to(dev), dataset.y[rows].to(dev))
            broken[rows] = out.success.cpu()
            if progress:
                progress(name, start + len(rows), len(idx))
        result.broken[name] = broken
        result.seconds[name] = time.perf_counter() - t0
    return result
