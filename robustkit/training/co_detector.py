"""Catastrophic-overfitting (CO) detector for single-step adversarial training.

Catastrophic overfitting (Wong, Rice and Kolter, 2020) is the sudden collapse of multi-step
(PGD) robustness while single-step (FGSM) accuracy stays high or even climbs: the network has
become locally non-linear so that the FGSM it trains on no longer approximates the worst case.
The detector watches exactly that, on a fixed held-out batch: every ``co_every`` steps and at
the end of every epoch it measures clean, FGSM and PGD-10 accuracy (the registered ``fgsm`` and
``pgd`` attacks, fixed seed, eval mode), and flags CO when

* **collapse**: PGD accuracy falls below ``ratio`` (1/3) of the best PGD accuracy seen so far,
  once that best is at least ``min_best`` (0.1), while FGSM accuracy stays at least ``gap / 2``
  above it — robustness was learned, then lost to multi-step attacks only; or
* **gap**: FGSM accuracy exceeds PGD accuracy by at least ``gap`` (0.2) and PGD accuracy is
  below ``ratio`` of FGSM accuracy — FGSM ≫ PGD, robustness against FGSM only.

Both rules need FGSM accuracy to stay well above PGD accuracy: when both fall together the run
is overfitting its training set or diverging, which is not catastrophic overfitting. A check
where a rule holds is *suspect*; CO is *flagged* when ``patience`` (2) consecutive checks are
suspect — CO is a lasting collapse, while right after the radius reaches its full size a healthy
run can show a one-check FGSM/PGD gap.
The thresholds are ours (the literature describes CO qualitatively: PGD accuracy "drops to
zero within a single training step"). :meth:`CODetector.observe` holds the rule alone, so it can
be tested on synthetic histories without a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from robustkit.attacks import FGSM, PGD
from robustkit.errors import UsageError
from robustkit.threat import ThreatModel


@dataclass
class COCheck:
    """One measurement on the held-out batch and the detector's verdict."""

    epoch: int
    step: int
    clean_acc: float
    fgsm_acc: float
    pgd_acc: float
    best_pgd: float
    flagged: bool
    reason: str = ""
    suspect: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CODetector:
    """Flags catastrophic overfitting from (FGSM, PGD) accuracies on a fixed held-out batch."""

    def __init__(
        self,
        threat: ThreatModel | None = None,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        ratio: float = 1 / 3,
        gap: float = 0.2,
        min_best: float = 0.1,
        patience: int = 2,
        pgd_steps: int = 10,
        batch_size: int = 256,
        seed: int = 0,
    ):
        if not 0 < ratio < 1:
            raise UsageError(f"The CO ratio must be in (0, 1), got {ratio:g}.")
        if not 0 <= gap <= 1 or not 0 <= min_best <= 1:
            raise UsageError(f"The CO gap and min_best must be in [0, 1], got {gap:g} and {min_best:g}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UsageError(f"The CO patience must be a positive integer, got {patience!r}.")
        self.patience = patience
        self.threat = threat
        self.x = x
        self.y = y
        self.ratio = ratio
        self.gap = gap
        self.min_best = min_best
        self.pgd_steps = pgd_steps
        self.batch_size = batch_size
        self.seed = seed
        self.best_pgd = 0.0
        self.history: list[COCheck] = []

    # -- the rule ---------------------------------------------------------------------------
    def verdict(self, fgsm_acc: float, pgd_acc: float, best_pgd: float) -> str:
        """The reason CO is flagged for these accuracies, or ``""`` when healthy."""
        if not (math.isfinite(fgsm_acc) and math.isfinite(pgd_acc)):
            return ""
        gap = fgsm_acc - pgd_acc
        if best_pgd >= self.min_best and pgd_acc < self.ratio * best_pgd and gap >= self.gap / 2:
            return (f"PGD accuracy {pgd_acc:.1%} fell below {self.ratio:.2g} of its best {best_pgd:.1%} "
                    f"while FGSM accuracy is {fgsm_acc:.1%}")
        if gap >= self.gap and pgd_acc < self.ratio * fgsm_acc:
            return f"FGSM accuracy {fgsm_acc:.1%} far above PGD accuracy {pgd_acc:.1%}"
        return ""

    def observe(
        self, epoch: int, step: int, clean_acc: float, fgsm_acc: float, pgd_acc: float
    ) -> COCheck:
        """Record one measurement and return the verdict (updates the best PGD accuracy)."""
        reason = self.verdict(fgsm_acc, pgd_acc, self.best_pgd)
        if not reason and math.isfinite(pgd_acc):
            self.best_pgd = max(self.best_pgd, pgd_acc)
        recent = self.history[len(self.history) - (self.patience - 1):] if self.patience > 1 else []
        flagged = bool(reason) and len(recent) == self.patience - 1 and all(c.suspect for c in recent)
        check = COCheck(epoch, step, clean_acc, fgsm_acc, pgd_acc, self.best_pgd, flagged, reason, bool(reason))
        self.history.append(check)
        return check

    @property
    def flagged(self) -> bool:
        """Whether any check so far flagged CO."""
        return any(c.flagged for c in self.history)

    # -- measuring ----------------------------------------------------------------------------
    def measure(self, model: nn.Module) -> tuple[float, float, float]:
        """Clean, FGSM and PGD-``pgd_steps`` accuracy of ``model`` on the held-out batch."""
        if self.threat is None or self.x is None or self.y is None:
            raise UsageError("The CO detector needs a threat model and a held-out batch to measure.")
        fgsm = FGSM(self.threat, seed=self.seed)
        pgd = PGD(self.threat, steps=self.pgd_steps, seed=self.seed)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was = model.training
        model.eval()
        n = len(self.y)
        clean = fg = pg = 0
        try:
            for i in range(0, n, self.batch_size):
                x = self.x[i : i + self.batch_size].to(device)
                y = self.y[i : i + self.batch_size].to(device)
                with torch.no_grad():
                    clean += int((model(x).argmax(1) == y).sum())
                fg += int((~fgsm(model, x, y).success).sum())
                pg += int((~pgd(model, x, y).success).sum())
        finally:
            model.train(was)
        return clean / n, fg / n, pg / n

    def check(self, model: nn.Module, epoch: int, step: int) -> COCheck:
        """Measure ``model`` and return the verdict."""
        return self.observe(epoch, step, *self.measure(model))

    # -- persistence (JSON-able) ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best_pgd": self.best_pgd, "history": [c.as_dict() for c in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_pgd = float(state.get("best_pgd", 0.0))
        self.history = [COCheck(**c) for c in state.get("history", [])]

    def reset_best(self, best_pgd: float) -> None:
        """After a rollback: the best PGD accuracy is that of the restored weights, and the run of
        suspect checks starts afresh."""
        self.best_pgd = best_pgd
        if self.history:
            self.history[-1].suspect = False
