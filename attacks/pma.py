"""PMA and PMA+ (Xie et al., "Towards Million-Scale Adversarial Robustness Evaluation With
Stronger Individual Attacks", arXiv 2411.15210).

PMA maximizes the probability margin ``p_max_other - p_y`` (``pm`` in attacks.losses). The
step schedule is the authors' code, OpenTAI/taiadv ``taiadv/vision/white-box/attacks/PMA.py``
(``MDAttack(loss_fn='pm')``, commit ae28cb78; the same schedule is in xieyong0/PMA
``attacks/MD.py``, commit 0ba7e381, and PMA+ in the ``attack_handler.py`` next to each), which
takes the two-stage scheme of the MD attack (Ma et al., "Imbalanced Gradients"):

* per restart, two stages, each from a fresh uniform random start, each ``steps`` sign
  steps (Linf) with step size ``2·eps`` under a cosine schedule that restarts at the change
  point ``steps / 2``: ``a_i = eps·(1 + cos(pi·(i - 1) / (steps / 2)))`` for ``i <= steps/2``,
  ``a_i = eps·(1 + cos(pi·(i - steps/2 - 1) / (steps / 2)))`` after;
* the loss ascended at step ``i``: ``p_y`` at ``i = 0`` (as the authors' code does), then up to
  the change point ``-p_y`` (stage 1) or ``p_max_other`` (stage 2), then the full margin
  ``p_max_other - p_y``;
* a sample is frozen at its first misclassified iterate (the authors' code drops it from the
  batch; here ``early_stop`` decides whether it is still computed, with the same outcome).

So PMA with ``steps=100`` costs up to 2 × 101 forward passes per restart. The authors' code is
Linf only; the L2 version here (unit-L2 gradient steps on the same schedule) is an extension.
The random start is ``ThreatModel.random_init`` (uniform in the ball, then clamped to the box;
the authors' code clamps only after the first step). Samples never broken return their
highest-margin iterate, and ``loss`` is the best probability margin per sample.

PMA+ is PMA followed by APGD-T (targeted DLR, 100 steps, ``min(9, C - 1)`` target classes) on
the samples PMA did not break, as the authors' ``Attacker`` (``attack_type='PMA+'``) does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .apgd import APGDT, _Batch, _Run
from .losses import pm_loss


def _margin_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_y, best other probability) per sample."""
    p = logits.softmax(1)
    p_y = p.gather(1, y[:, None])[:, 0]
    return p_y, p.scatter(1, y[:, None], float("-inf")).amax(1)


@ATTACKS.register("pma")
class PMA(Attack):
    """Probability Margin Attack (Xie et al., 2024): the probability-margin loss on the MD
    attack's two-stage cosine schedule, ``steps`` per stage (default 100), untargeted."""

    name = "pma"
    supported_norms = ("linf", "l2")
    supports_targeted = False

    def __init__(self, threat: ThreatModel, *, steps: int = 100, restarts: int = 1, **kwargs: Any):
        super().__init__(threat, **kwargs)
        if steps < 2 or restarts < 1:
            raise UsageError(
                f"{self.name} needs steps >= 2 and restarts >= 1, "
                f"got steps={steps}, restarts={restarts}."
            )
        self.steps = steps
        self.restarts = restarts

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "restarts": self.restarts}

    # -- the schedule ------------------------------------------------------------------
    def step_size(self, i: int) -> float:
        """Cosine step size, ``2·eps`` at its peaks, restarting after the change point."""
        change = self.steps / 2
        t = i - change - 1 if i > change else i - 1
        return 2 * self.threat.eps * 0.5 * (1 + math.cos(math.pi * t / (self.steps - change)))

    def stage_loss(self, logits: torch.Tensor, y: torch.Tensor, i: int, stage: int) -> torch.Tensor:
        """The per-sample loss ascended at step ``i`` of stage 0 or 1."""
        p_y, p_other = _margin_terms(logits, y)
        if i == 0:
            return p_y
        if i < self.steps / 2:
            return p_other if stage else -p_y
        return p_other - p_y

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.threat.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1) + 1e-12
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    # -- the attack --------------------------------------------------------------------
    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        batch = _Batch(x)
        for _ in range(self.restarts):
            for stage in (0, 1):
                rows = batch.todo()
                if not len(rows):
                    return batch.result()
                batch.merge(rows, self.run(forward, x[rows], y[rows], stage, generator))
        return batch.result()

    def run(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        stage: int,
        generator: torch.Generator,
    ) -> _Run:
        """One stage: ``steps`` steps from a random start, then a check of the last iterate."""
        n, dev = len(x), x.device
        cur = self.threat.random_init(x, generator)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        x_found, x_best = cur.clone(), cur.clone()
        loss_best = torch.full((n,), float("-inf"), device=dev)
        all_rows = torch.arange(n, device=dev)
        for i in range(self.steps + 1):
            run = (~found).nonzero().flatten() if self.early_stop else all_rows
            if not len(run):
                break
            live = ~found[run]  # without early_stop, broken samples are computed but frozen
            if i < self.steps:
                with torch.enable_grad():
                    xa = cur[run].detach().requires_grad_(True)
                    logits = forward(xa)
                    loss = self.stage_loss(logits, y[run], i, stage)
                    (grad,) = torch.autograd.grad(loss.sum(), xa)
                logits = logits.detach()
            else:
                with torch.no_grad():
                    logits = forward(cur[run])
            rows, logits = run[live], logits[live]
            margin = pm_loss(logits, y[rows])
            better = margin > loss_best[rows]
            x_best[rows[better]] = cur[rows[better]]
            loss_best[rows] = torch.maximum(loss_best[rows], margin)
            hit = self.is_success(logits, y[rows], None)
            x_found[rows[hit]] = cur[rows[hit]]
            found[rows[hit]] = True
            if i == self.steps:
                break
            move = rows[~hit]
            step = self.step_size(i) * self.direction(grad[live][~hit])
            cur[move] = self.threat.clip(cur[move] + step, x[move])
        return _Run(found=found, x_found=x_found, x_best=x_best, loss_best=loss_best)


@ATTACKS.register("pma+", aliases=("pma-plus",))
class PMAPlus(Attack):
    """PMA+ (Xie et al., 2024): PMA, then APGD-T on the samples PMA did not break."""

    name = "pma+"
    supported_norms = ("linf", "l2")
    supports_targeted = False

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        apgdt_steps: int = 100,
        n_target_classes: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        self.pma = PMA(threat, steps=steps, restarts=restarts, **kwargs)
        self.apgdt = APGDT(
            threat,
            steps=apgdt_steps,
            restarts=restarts,
            n_target_classes=n_target_classes,
            **kwargs,
        )

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.pma.steps,
            "restarts": self.pma.restarts,
            "apgdt_steps": self.apgdt.steps,
            "n_target_classes": self.apgdt.n_target_classes,
        }

    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        self.pma.early_stop = self.apgdt.early_stop = self.early_stop
        first = self.pma.perturb(forward, x, y, None, generator)
        rest = (~first.success).nonzero().flatten()
        if not len(rest):
            return first
        second = self.apgdt.perturb(forward, x[rest], y[rest], None, generator)
        x_adv = first.x_adv.clone()
        broken = rest[second.success]
        x_adv[broken] = second.x_adv[second.success]
        success = first.success.clone()
        success[broken] = True
        # the loss of the two stages is not comparable: report PMA's probability margin
        return AttackResult(x_adv=x_adv, success=success, loss=first.loss)
