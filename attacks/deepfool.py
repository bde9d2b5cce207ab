"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, arXiv 1511.04599), L2 and Linf,
untargeted (the paper has no targeted version).

Each step linearizes the margins ``f_k = z_k - z_y`` of every other class ``k`` at the iterate,
takes the class whose linearized boundary is closest (``|f_k| / ||grad f_k||_dual``, plus 1e-4)
and steps onto that boundary, overshooting by ``1 + overshoot``: along ``grad f_k`` for L2, along
its sign for Linf; the point is clipped to [0, 1]. A point stops (leaves the batch) as soon as it
is misclassified; that iterate is its result. Points still correctly classified after ``steps``
return ``x``.

As adv-lib 0.2.8 (``adv_lib.attacks.df``): ``steps`` 100, ``overshoot`` 0.02 applied to each
step, gradient norms floored at 1e-6. Each step costs one forward and ``C - 1`` backward passes.
With eps, success also needs the point within eps (DeepFool does not use eps to steer).
"""

from __future__ import annotations

from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import DUAL, INF, MinimumNorm, lp, view


@ATTACKS.register("deepfool", aliases=("df",))
class DeepFool(MinimumNorm, Attack):
    """DeepFool; see the module docstring."""

    name = "deepfool"
    supported_norms = ("l2", "linf")
    supports_targeted = False

    def __init__(self, threat: ThreatModel, *, steps: int = 100, overshoot: float = 0.02, **kwargs: Any):
        super().__init__(threat, **kwargs)
        if steps < 1 or overshoot < 0:
            raise UsageError(f"{self.name} needs steps >= 1 and overshoot >= 0, got steps={steps}, "
                             f"overshoot={overshoot}.")
        self.steps = steps
        self.overshoot = overshoot

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps": self.steps, "overshoot": self.overshoot}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        n = len(x)
        norm = self.threat.norm
        cur = x.clone()
        best_adv = x.clone()
        best_norm = torch.full((n,), INF, device=x.device, dtype=x.dtype)
        rows = torch.arange(n, device=x.device)
        others = None
        for step in range(self.steps + 1):
            leaf = cur[rows].requires_grad_(True)
            with torch.enable_grad():
                logits = forward(leaf)
                adv = self.is_success(logits.detach(), y[rows], None)
                keep = ~adv
                if adv.any():
                    hit = rows[adv]
                    best_adv[hit] = leaf.detach()[adv]
                    best_norm[hit] = self.threat.norm_of(best_adv[hit] - x[hit])
                    rows, logits = rows[keep], logits[keep]
                if not len(rows) or step == self.steps:
                    break
                if others is None:  # every class but the label, per point
                    classes = torch.arange(logits.shape[1] - 1, device=x.device)
                    others = classes + (classes >= y[:, None])
                f = logits.gather(1, others[rows]) - logits.gather(1, y[rows][:, None])
                grads = torch.stack([  # rows x (C - 1) x features; the dropped rows get no gradient
                    torch.autograd.grad(f[:, k].sum(), leaf, retain_graph=k < f.shape[1] - 1)[0][keep].flatten(1)
                    for k in range(f.shape[1])
                ], dim=1)
            xr = leaf.detach()[keep]
            f = f.detach()
            grad_norms = lp(grads.flatten(0, 1), DUAL[norm]).view(f.shape).clamp_min(1e-6)
            dist = f.abs() / grad_norms + 1e-4
            k = dist.argmin(1)
            at = torch.arange(len(rows), device=x.device)
            w = grads[at, k]
            if norm == "l2":
                step_ = view(dist[at, k] / grad_norms[at, k], w) * w
            else:
                step_ = view(dist[at, k], w) * w.sign()
            cur[rows] = (xr.detach() + (1 + self.overshoot) * step_.view_as(xr)).clamp(0, 1)
        return self.result(x, best_adv, best_norm)
