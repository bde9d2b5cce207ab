"""PGD (Madry et al., 2018) for Linf and L2, with restarts, targets, losses and step schedules.

Semantics shared by all iterative gradient attacks here: a point is *frozen* at its first
adversarial iterate. With ``early_stop`` (the default) frozen points also leave the batch, so
later steps cost less; without it they are still computed but their result is kept, so the
per-sample outcome is the same either way. Restarts run only on points not yet broken.
Subclasses (transfer attacks, FGSM) change the gradient, the direction or the schedule
through the small hook methods below.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .losses import get_loss

SCHEDULES = ("constant", "cosine")


def _view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample mask shaped to broadcast over ``like``'s samples."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent. Default step size 2.5·eps/steps (Madry's rule; 2/255 for
    eps 8/255 and 10 steps, as torchattacks' default)."""

    name = "pgd"
    supported_norms = ("linf", "l2")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        schedule: str = "constant",
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1 or restarts < 1:
            raise UsageError(f"{self.name} needs steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}.")
        if schedule not in SCHEDULES:
            raise UsageError(f"Unknown step schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}.")
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.random_start = random_start
        self.restarts = restarts
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        self.schedule = schedule

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_size": round(self.step_size, 10),
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self.loss_name,
            "schedule": self.schedule,
        }

    # -- hooks -------------------------------------------------------------------------
    def step_size_at(self, t: int) -> float:
        if self.schedule == "cosine":
            return self.step_size * 0.5 * (1 + math.cos(math.pi * t / self.steps))
        return self.step_size

    def gradient(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at ``x`` and the gradient of the summed loss with respect to ``x``."""
        x = x.detach().requires_grad_(True)
        logits = forward(x)
        grad, = torch.autograd.grad(self.loss_fn(logits, y, target).sum(), x)
        return logits.detach(), grad

    def direction(self, grad: torch.Tensor, state: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction for the norm: sign for Linf, unit L2 gradient for L2."""
        if self.threat.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1) + 1e-10
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    # -- the loop ------------------------------------------------------------------------
    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        x_best = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            last_restart = restart == self.restarts - 1
            # Random starts are drawn for the whole batch, so results do not depend on early_stop.
            start = self.threat.random_init(x, generator) if self.random_start else x.clone()
            rows = (~found).nonzero().flatten()
            if not len(rows):
                break
            cur = start[rows]
            alive = torch.ones(len(rows), dtype=torch.bool, device=x.device)
            state: dict[str, torch.Tensor] = {}
            for t in range(self.steps + 1):
                if t == self.steps and last_restart:
                    break  # the base class measures the final iterate
                run = alive.nonzero().flatten() if self.early_stop else torch.arange(len(rows), device=x.device)
                if not len(run):
                    break
                xr, yr = x[rows[run]], y[rows[run]]
                tr = None if target is None else target[rows[run]]
                if t == self.steps:
                    with torch.no_grad():
                        logits = forward(cur[run])
                    grad = None
                else:
                    logits, grad = self.gradient(forward, cur[run], yr, tr, generator)
                # masks and torch.where, not boolean indexing: no host synchronization
                hit = self.is_success(logits, yr, tr) & alive[run]
                points = rows[run]
                x_best[points] = torch.where(_view(hit, xr), cur[run], x_best[points])
                found[points] |= hit
                alive[run] &= ~hit
                if grad is None:
                    break
                step = self.step_size_at(t) * self.direction(grad, state, rows[run])
                moved = self.threat.clip(cur[run] + step, xr)
                cur[run] = torch.where(_view(alive[run], xr), moved, cur[run])
            x_best[rows] = torch.where(_view(found[rows], cur), x_best[rows], cur)
        return AttackResult(x_adv=x_best, success=found)


@ATTACKS.register("fgsm")
class FGSM(PGD):
    """Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size eps from x
    (Linf), or the one-step L2 fast gradient method. ``random_start`` gives FGSM-RS."""

    name = "fgsm"
    fixed_options = ("steps",)  # one step by definition: not an option (see attack_spec.option_hints)

    def __init__(self, threat: ThreatModel, *, step_size: float | None = None, random_start: bool = False,
                 loss: str = "ce", **kwargs: Any):
        super().__init__(threat, steps=1, step_size=threat.eps if step_size is None else step_size,
                         random_start=random_start, loss=loss, **kwargs)

    def config(self) -> dict[str, Any]:
        return {"step_size": round(self.step_size, 10), "random_start": self.random_start, "loss": self.loss_name}
