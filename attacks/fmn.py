"""FMN, the Fast Minimum-Norm attack (Pintor, Roli, Brendel & Biggio, NeurIPS 2021,
arXiv 2102.12827), for L0, L1, L2 and Linf, untargeted and targeted.

FMN keeps a perturbation ``delta`` and a per-sample radius ``eps_k``. Each step it moves
``delta`` along the L2-normalized gradient of the logit margin (step ``alpha``), projects it onto
the ``eps_k``-ball and clips to the box; then it shrinks ``eps_k`` by ``(1 - gamma)`` (and to the
best norm found) where the iterate is adversarial, grows it by ``(1 + gamma)`` where it is not
but an adversarial point was seen, and before the first one sets it to the iterate's norm plus
the linearized distance to the boundary, ``|margin| / ||grad||_dual``. ``alpha`` and ``gamma``
decay by cosine annealing from ``alpha_init`` to ``alpha_final`` and from ``gamma_init`` to
``gamma_final``. L0 moves ``eps_k`` (a count of coordinates) by whole steps of at least one.

As the authors' code and adv-lib 0.2.8 (``adv_lib.attacks.fmn``): ``steps`` 10, ``alpha_init``
1, ``alpha_final`` ``alpha_init / 100``, ``gamma_init`` 0.05, ``gamma_final`` 0.001; the L2
"projection" rescales ``delta`` to norm ``eps_k`` (also from inside the ball, as their code), L1
is the Euclidean projection onto the L1 ball, L0 keeps the ``eps_k`` largest coordinates (ties
kept), Linf clamps. Norms of the result follow :mod:`robustkit.threat` (L0: changed coordinates).
Without eps (``eps=inf``) it returns the smallest adversarial point found; with eps see
:mod:`attacks.min_norm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import (
    DUAL,
    INF,
    ActiveRows,
    MinimumNorm,
    P,
    check_positive,
    keep_smallest,
    lp,
    margin,
    project_l1_ball,
    view,
)


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """FMN's projection of each row of ``delta`` (flattened) for its own radius ``eps``."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps[:, None]), -eps[:, None])
    if norm == "l2":
        return delta * (eps / delta.norm(p=2, dim=1).clamp_min(1e-12))[:, None]
    if norm == "l1":
        return project_l1_ball(delta, eps)
    k = eps.long()
    top = delta.abs().topk(k=int(k.max().clamp_min(1)), dim=1).values
    threshold = top.gather(1, (k[:, None] - 1).clamp_min(0))
    return torch.where(delta.abs() < threshold, torch.zeros_like(delta), delta)


@ATTACKS.register("fmn")
class FMN(MinimumNorm, Attack):
    """Fast Minimum-Norm attack; see the module docstring."""

    name = "fmn"
    supported_norms = ("linf", "l2", "l1", "l0")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        alpha_init: float = 1.0,
        alpha_final: float | None = None,
        gamma_init: float = 0.05,
        gamma_final: float = 0.001,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1:
            raise UsageError(f"{self.name} needs steps >= 1, got {steps}.")
        alpha_final = alpha_init / 100 if alpha_final is None else alpha_final
        check_positive(self.name, alpha_init=alpha_init, alpha_final=alpha_final)
        if not 0 <= gamma_final <= gamma_init < 1:
            raise UsageError(f"{self.name} needs 0 <= gamma_final <= gamma_init < 1, "
                             f"got gamma_init={gamma_init}, gamma_final={gamma_final}.")
        self.steps = steps
        self.alpha_init = alpha_init
        self.alpha_final = alpha_final
        self.gamma_init = gamma_init
        self.gamma_final = gamma_final

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps": self.steps, "alpha_init": self.alpha_init,
                "alpha_final": self.alpha_final, "gamma_init": self.gamma_init, "gamma_final": self.gamma_final}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        norm = self.threat.norm
        n = len(x)
        labels = y if target is None else target
        sign = -1.0 if target is None else 1.0  # ascend on the margin of the target, or against the label's
        xf = x.flatten(1)
        delta = torch.zeros_like(xf)
        radius = torch.full((n,), 1.0 if norm == "l0" else INF, device=x.device, dtype=x.dtype)
        p = P[norm]  # torch's norm(p=...), as adv-lib: the same rounding keeps the runs together
        worst = torch.maximum(xf, 1 - xf).norm(p=p, dim=1)
        best_norm = worst.clone()
        best_adv = xf.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        rows = ActiveRows(n, x.device)
        take = rows.take
        for i in range(self.steps):
            if self.stops() and not rows.keep(~self.within(torch.where(take(found), take(best_norm), INF))):
                break
            cosine = (1 + math.cos(math.pi * i / self.steps)) / 2
            alpha = self.alpha_final + (self.alpha_init - self.alpha_final) * cosine
            gamma = self.gamma_final + (self.gamma_init - self.gamma_final) * cosine

            d = take(delta).detach().requires_grad_(True)
            x0 = take(xf)
            size = d.detach().norm(p=p, dim=1)
            with torch.enable_grad():
                logits = forward((x0 + d).view(-1, *x.shape[1:]))
                loss = sign * margin(logits, take(labels))
                (grad,) = torch.autograd.grad(loss.sum(), d)
            d = d.detach()
            adv = self.is_success(logits.detach(), take(y), None if target is None else take(target))
            found = rows.put(found, take(found) | adv)
            best_norm, best_adv = keep_smallest(rows, best_norm, best_adv, adv, size, x0 + d)

            r = take(radius)
            if norm == "l0":
                r = torch.where(adv, torch.minimum(torch.minimum(r - 1, (r * (1 - gamma)).floor()), take(best_norm)),
                                torch.maximum(r + 1, (r * (1 + gamma)).floor())).clamp_min(0)
            else:
                to_boundary = loss.detach().abs() / lp(grad, DUAL[norm]).clamp_min(1e-12)
                r = torch.where(adv, torch.minimum(r * (1 - gamma), take(best_norm)),
                                torch.where(take(found), r * (1 + gamma), size + to_boundary))
            r = torch.minimum(r, take(worst))
            radius = rows.put(radius, r)

            d = d + alpha * grad / view(grad.norm(p=2, dim=1).clamp_min(1e-12), grad)
            d = _project(d, r, norm)
            delta = rows.put(delta, (x0 + d).clamp(0, 1) - x0)
        best_norm = torch.where(found, best_norm, INF)
        return self.result(x, best_adv.view_as(x), best_norm)
