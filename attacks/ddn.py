"""DDN, Decoupled Direction and Norm (Rony, Hafemann, Oliveira, Ben Ayed, Sabourin & Granger,
CVPR 2019, arXiv 1811.09600): an L2 minimum-norm attack, untargeted and targeted.

Each step moves ``delta`` along the L2-normalized gradient of the cross-entropy (ascending the
label's, or descending the target's; a zero gradient is replaced by a random direction), with a
step size that decays by cosine annealing from 1 to 0.01; then it rescales ``delta`` to norm
``eps_k`` (the norm is decoupled from the direction), which shrinks by ``(1 - gamma)`` where the
iterate was adversarial and grows by ``(1 + gamma)`` where it was not, capped at the largest
norm the box allows; the point is clipped to [0, 1] and, with ``levels``, quantized to that many
grey levels (8-bit images: 256), so that the adversarial points are valid images.

As adv-lib 0.2.8 (``adv_lib.attacks.ddn``): ``steps`` 100, ``gamma`` 0.05, ``init_norm`` 1,
``levels`` 256. Without eps (``eps=inf``) it returns the smallest adversarial point found; with
eps see :mod:`attacks.min_norm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import INF, ActiveRows, MinimumNorm, check_positive, keep_smallest, view


@ATTACKS.register("ddn")
class DDN(MinimumNorm, Attack):
    """Decoupled Direction and Norm; see the module docstring."""

    name = "ddn"
    supported_norms = ("l2",)

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        gamma: float = 0.05,
        init_norm: float = 1.0,
        levels: int | None = 256,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1:
            raise UsageError(f"{self.name} needs steps >= 1, got {steps}.")
        check_positive(self.name, init_norm=init_norm)
        if not 0 < gamma < 1:
            raise UsageError(f"{self.name} needs 0 < gamma < 1, got {gamma}.")
        if levels is not None and levels < 2:
            raise UsageError(f"{self.name} needs levels >= 2 (or None: no quantization), got {levels}.")
        self.steps = steps
        self.gamma = gamma
        self.init_norm = init_norm
        self.levels = levels

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps": self.steps, "gamma": self.gamma, "init_norm": self.init_norm,
                "levels": self.levels}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        n = len(x)
        labels = y if target is None else target
        sign = 1.0 if target is None else -1.0  # ascend the label's cross-entropy, descend the target's
        xf = x.flatten(1)
        delta = torch.zeros_like(xf)
        radius = torch.full((n,), self.init_norm, device=x.device, dtype=x.dtype)
        worst = torch.maximum(xf, 1 - xf).norm(p=2, dim=1)
        best_norm = torch.full((n,), INF, device=x.device, dtype=x.dtype)
        best_adv = xf.clone()
        rows = ActiveRows(n, x.device)
        take = rows.take
        for i in range(self.steps):
            if self.stops() and not rows.keep(~self.within(take(best_norm))):
                break
            d = take(delta).detach().requires_grad_(True)
            x0 = take(xf)
            size = d.detach().norm(p=2, dim=1)
            with torch.enable_grad():
                logits = forward((x0 + d).view(-1, *x.shape[1:]))
                loss = sign * F.cross_entropy(logits, take(labels), reduction="none")
                (grad,) = torch.autograd.grad(loss.sum(), d)
            d = d.detach()
            adv = self.is_success(logits.detach(), take(y), None if target is None else take(target))
            best_norm, best_adv = keep_smallest(rows, best_norm, best_adv, adv, size, x0 + d)

            grad_norm = grad.norm(p=2, dim=1)
            grad = grad / grad_norm[:, None]
            zero = grad_norm < 1e-12
            if zero.any():
                noise = torch.randn(int(zero.sum()), grad.shape[1], generator=generator, device=x.device)
                grad[zero] = noise.to(grad.dtype)
            alpha = 0.01 + (1 - 0.01) * (1 + math.cos(math.pi * i / self.steps)) / 2
            d = d + alpha * grad
            r = take(radius)
            r = torch.minimum(torch.where(adv, (1 - self.gamma) * r, (1 + self.gamma) * r), take(worst))
            radius = rows.put(radius, r)
            moved = (x0 + d * view(r / d.norm(p=2, dim=1), d)).clamp(0, 1)
            if self.levels is not None:
                moved = (moved * (self.levels - 1)).round() / (self.levels - 1)
            delta = rows.put(delta, moved - x0)
        return self.result(x, best_adv.view_as(x), best_norm)
