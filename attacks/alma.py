"""ALMA, the Augmented Lagrangian Method for Adversarial attacks (Rony, Granger, Pedersoli & Ben
Ayed, CVPR 2021, arXiv 2011.11857), for L1 and L2, untargeted and targeted.

ALMA minimizes ``||delta|| + P(c(x + delta), rho, mu)``: the distance plus a penalty-Lagrangian
``P`` (the paper's P2) of the constraint ``c``, the difference of logits ratio (Croce & Hein's
DLR, plus ``logit_tolerance``, so that ``c < 0`` means misclassified with a margin: a point at
the boundary does not count), negative once the point is adversarial. The first step follows
the penalty alone. Each step updates the multiplier ``mu`` towards ``dP/dc`` (exponential
moving average with weight ``alpha``, clamped to [1e-6, 1e12]); every ``check_steps`` steps the
penalty parameter ``rho`` grows by ``gamma`` for points that are neither adversarial yet nor
improved their constraint by the factor ``tau``. ``delta`` moves by RMSProp with momentum
(``alpha`` as smoothing and momentum, squared averages starting at 1), its learning rate
``lr_init`` decaying exponentially to ``lr_init * lr_reduction`` from the step a point first
became adversarial; the point is clipped to [0, 1] (and quantized with ``levels``).

As adv-lib 0.2.8 (``adv_lib.attacks.alma``): ``steps`` 1000, ``lr_init`` 0.1, ``lr_reduction``
0.01, ``mu_init`` 1, ``rho_init`` 1, ``check_steps`` 10, ``tau`` 0.95, ``gamma`` 1.2, ``alpha``
0.9, ``logit_tolerance`` 1e-4, no quantization. For a target, the constraint is the target's
ratio (its logit must beat every other by the tolerance). Without eps (``eps=inf``) it returns
the smallest adversarial point found; with eps see :mod:`attacks.min_norm`.
"""

from __future__ import annotations

from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import INF, ActiveRows, MinimumNorm, check_positive, keep_smallest, margin, view


def penalty_p2(c: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The P2 penalty-Lagrangian of the ALMA paper: ``mu c + mu rho c^2 + rho^2 c^3 / 6`` for
    ``c >= 0``, ``mu c / (1 - rho c)`` below (written in adv-lib's order of operations)."""
    above = mu * c + mu * rho * c**2 + 1 / 6 * rho**2 * c**3
    below = mu * c / (1 - rho * c.clamp(max=0))
    return torch.where(c >= 0, above, below)


def penalty_slope(c: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``dP2/dc`` at ``c`` (by autograd, as adv-lib: the multiplier update follows it exactly)."""
    with torch.enable_grad():
        leaf = c.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(penalty_p2(leaf, rho, mu).sum(), leaf)
    return slope


def dlr_constraint(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, tolerance: float) -> torch.Tensor:
    """ALMA's constraint: the logit margin plus ``tolerance``, over the DLR scale (top-1 minus
    3rd logit; targeted: top-1 minus the mean of 3rd and 4th); ``< 0`` means adversarial."""
    m = margin(logits, labels)
    top = logits.topk(4 if targeted else 3, dim=1).values
    scale = top[:, 0] - (top[:, -2] + top[:, -1]) / 2 if targeted else top[:, 0] - top[:, -1]
    return ((-m if targeted else m) + tolerance) / (scale + 1e-8)


@ATTACKS.register("alma")
class ALMA(MinimumNorm, Attack):
    """Augmented Lagrangian attack; see the module docstring."""

    name = "alma"
    supported_norms = ("l2", "l1")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 1000,
        lr_init: float = 0.1,
        lr_reduction: float = 0.01,
        mu_init: float = 1.0,
        rho_init: float = 1.0,
        check_steps: int = 10,
        tau: float = 0.95,
        gamma: float = 1.2,
        alpha: float = 0.9,
        logit_tolerance: float = 1e-4,
        levels: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1 or check_steps < 1:
            raise UsageError(f"{self.name} needs steps >= 1 and check_steps >= 1, got steps={steps}, "
                             f"check_steps={check_steps}.")
        check_positive(self.name, lr_init=lr_init, lr_reduction=lr_reduction, mu_init=mu_init, rho_init=rho_init,
                       tau=tau, gamma=gamma)
        if not 0 <= alpha < 1 or logit_tolerance < 0:
            raise UsageError(f"{self.name} needs 0 <= alpha < 1 and logit_tolerance >= 0, got alpha={alpha}, "
                             f"logit_tolerance={logit_tolerance}.")
        if levels is not None and levels < 2:
            raise UsageError(f"{self.name} needs levels >= 2 (or None: no quantization), got {levels}.")
        self.steps = steps
        self.lr_init = lr_init
        self.lr_reduction = lr_reduction
        self.mu_init = mu_init
        self.rho_init = rho_init
        self.check_steps = check_steps
        self.tau = tau
        self.gamma = gamma
        self.alpha = alpha
        self.logit_tolerance = logit_tolerance
        self.levels = levels

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps": self.steps, "lr_init": self.lr_init, "lr_reduction": self.lr_reduction,
                "mu_init": self.mu_init, "rho_init": self.rho_init, "check_steps": self.check_steps, "tau": self.tau,
                "gamma": self.gamma, "alpha": self.alpha, "logit_tolerance": self.logit_tolerance,
                "levels": self.levels}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        n = len(x)
        p = 2 if self.threat.norm == "l2" else 1
        targeted = target is not None
        labels = target if targeted else y
        xf = x.flatten(1)
        delta = torch.zeros_like(xf)
        square_avg = torch.ones_like(xf)
        momentum = torch.zeros_like(xf)
        full = lambda value: torch.full((n,), value, device=x.device)  # noqa: E731  (fp32, as the logits)
        mu, rho = full(self.mu_init), full(self.rho_init)
        best_norm = full(INF).to(x.dtype)
        best_adv = xf.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        step_found = full(float(self.steps + 1))
        prev_c = full(0.0)
        rows = ActiveRows(n, x.device)
        take = rows.take
        for i in range(self.steps):
            if self.stops() and not rows.keep(~self.within(take(best_norm))):
                break
            d = take(delta).detach().requires_grad_(True)
            x0 = take(xf)
            with torch.enable_grad():
                moved = x0 + d
                logits = forward(moved.view(-1, *x.shape[1:]))
                size = (moved - x0).norm(p=p, dim=1)  # as adv-lib: the L1 gradient is 0 where x0 + d rounds to x0
                c = dlr_constraint(logits, take(labels), targeted, self.logit_tolerance)
                cd = c.detach()
                if i == 0:
                    prev_c = rows.put(prev_c, cd)
                elif (i + 1) % self.check_steps == 0:
                    improved = cd < self.tau * take(prev_c)
                    rho = rows.put(rho, torch.where(take(found) | improved, take(rho), self.gamma * take(rho)))
                    prev_c = rows.put(prev_c, cd)
                r, m = take(rho), take(mu)
                if i:
                    m = torch.lerp(m, penalty_slope(cd, r, m), 1 - self.alpha).clamp(1e-6, 1e12)
                    mu = rows.put(mu, m)
                adv = cd < 0
                step_found = rows.put_where(step_found, adv & ~take(found), torch.full_like(cd, float(i)))
                found = rows.put(found, take(found) | adv)
                best_norm, best_adv = keep_smallest(rows, best_norm, best_adv, adv, size.detach(), x0 + d.detach())
                loss = penalty_p2(c, r, m)
                if i:
                    loss = loss + size
                (grad,) = torch.autograd.grad(loss.sum(), d)
            since = take(step_found)
            decay = self.lr_reduction ** ((i - since).clamp_min(0) / (self.steps - since))
            lr = self.lr_init * decay
            # fused multiply-adds, as adv-lib's in-place updates (ALMA amplifies rounding differences)
            sq = torch.addcmul(self.alpha * take(square_avg), grad, grad, value=1 - self.alpha)
            mom = torch.addcdiv(self.alpha * take(momentum), grad, sq.sqrt() + 1e-8)
            square_avg, momentum = rows.put(square_avg, sq), rows.put(momentum, mom)
            moved = (x0 + torch.addcmul(d.detach(), mom, view(lr, mom), value=-1)).clamp(0, 1)
            if self.levels is not None:
                moved = (moved * (self.levels - 1)).round() / (self.levels - 1)
            delta = rows.put(delta, moved - x0)
        return self.result(x, best_adv.view_as(x), best_norm)
