"""DAT's per-worker step (Zhang et al., UAI 2022, "Distributed Adversarial Training to Robustify
Deep Neural Networks at Scale"): how each worker makes its shard adversarial and what it minimizes.
The distributed loop (sharding, DistributedDataParallel, LAMB, gradient compression) is
:mod:`robustkit.training.dat`.

Two methods, with the defaults of the reference code (``main.py`` of dat-2022/dat):

* ``dat`` (alias ``dat-pgd``; DAT-PGD): PGD-10 with step eps/4 (the reference's 2/255 at eps
  8/255) from a uniform random start, generated in eval mode; the loss is
  ``CE(f(x_adv), y) + clean_weight · CE(f(x), y)`` with ``clean_weight = 1`` (the reference
  back-propagates the adversarial and the clean loss of every batch, the paper's objective
  ``λ·ℓ(clean) + ℓ(adv)`` with λ = 1).
* ``dat-fgsm`` (DAT-FGSM): uniform random start and one FGSM step of 1.25·eps in train mode,
  as "Fast is better than free"; the loss is the adversarial CE only (``clean_weight = 0``).

Unlabeled examples carry the label ``UNLABELED`` (-1): they are given pseudo-labels, the current
model's predictions on their clean inputs (eval mode, no gradient), before the attack.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import UsageError
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel

from .adversarial_training import StepOutput, TrainingStrategy, _ce_sum, ascend

UNLABELED = -1


class DAT(TrainingStrategy):
    """DAT-PGD: PGD-k adversarial examples per worker, loss adversarial CE + ``clean_weight`` · clean CE."""

    name = "dat"
    description = "Distributed adversarial training (Zhang et al. 2022), DAT-PGD: PGD-10, loss adv + clean CE"
    eval_mode_attack = True
    default_clean_weight: ClassVar[float] = 1.0

    def __init__(self, threat: ThreatModel, *, clean_weight: float | None = None, **options: Any):
        super().__init__(threat, **options)
        if self.tricks.tricks:
            raise UsageError(f"{self.name} does not take --trick; the FGSM-AT tricks apply to the other methods.")
        self.clean_weight = self.default_clean_weight if clean_weight is None else float(clean_weight)
        if not self.clean_weight >= 0:
            raise UsageError(f"--clean-weight must be non-negative, got {self.clean_weight:g}.")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "clean_weight": self.clean_weight}

    # -- one batch -------------------------------------------------------------------------
    def pseudo_label(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` with every ``UNLABELED`` entry replaced by the model's prediction on its clean input."""
        missing = y == UNLABELED
        if not bool(missing.any()):
            return y
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                predicted = model(x[missing]).float().argmax(1)
        finally:
            model.train(was)
        return y.masked_scatter(missing, predicted)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.perturb_from(model, x, y, self.threat.random_init(x, generator))

    def perturb_from(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The last iterate of ``steps`` ascent steps on the CE from the given random ``start``."""
        return ascend(model, x, start, self.threat, steps=self.steps, step_size=self.step_size, loss_fn=_ce_sum(y))

    def loss_on(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = model(x_adv).float()
        loss = F.cross_entropy(logits, y)
        parts = {"adv": float(loss.detach())}
        if self.clean_weight:
            clean = F.cross_entropy(model(x).float(), y)
            parts["clean"] = float(clean.detach())
            loss = loss + self.clean_weight * clean
        return loss, logits, parts

    def step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
        *, start: torch.Tensor | None = None, loss_model: nn.Module | None = None,
    ) -> StepOutput:  # fmt: skip
        """Pseudo-label, attack from ``start`` (default: a random start drawn from ``generator``)
        and compute the loss. ``loss_model`` (the DistributedDataParallel wrapper of ``model``)
        computes the loss, while the attack and the pseudo-labels use the bare ``model``, so their
        gradient passes never reach DDP's gradient synchronization."""
        y = self.pseudo_label(model, x, y)
        if start is None:
            if generator is None:
                raise ValueError("DAT.step needs a generator or a start.")
            start = self.threat.random_init(x, generator)
        with self.attacking(model):
            x_adv = self.perturb_from(model, x, y, start)
        loss, logits, parts = self.loss_on(loss_model if loss_model is not None else model, x, x_adv, y)
        return StepOutput(loss, logits.detach(), {"task": float(loss.detach()), **parts})


DEFENSES.register("dat", aliases=("dat-pgd",))(DAT)


@DEFENSES.register("dat-fgsm")
class DATFGSM(DAT):
    """DAT-FGSM: random start and one FGSM step of 1.25·eps in train mode; adversarial CE only."""

    name = "dat-fgsm"
    description = "Distributed adversarial training (Zhang et al. 2022), DAT-FGSM: random start, step 1.25 eps"
    eval_mode_attack = False
    default_steps = 1
    default_clean_weight = 0.0

    def default_step_size(self) -> float:
        return 1.25 * self.threat.eps
