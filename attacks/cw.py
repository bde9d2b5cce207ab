"""C&W L2 (Carlini & Wagner, IEEE S&P 2017, arXiv 1608.04644), untargeted and targeted, with the
binary search over the trade-off constant ``c``.

The point is ``(tanh(w) + 1) / 2`` (always in the box); Adam minimizes ``||x_adv - x||_2^2 + c ·
max(z_y - max_{k != y} z_k + confidence, 0)`` over ``w`` (targeted: ``max_{k != t} z_k - z_t``),
``steps`` iterations per value of ``c``. After each run ``c`` is bisected per point: lowered
(upper bound) where the run found an adversarial point, raised where it did not (times 10 until an
upper bound exists); with 10 or more search steps the last one reruns the upper bound.

Early abort: every ``steps // 10`` iterations a point whose loss no longer fell by 0.01% has
stalled. ``abort_early="batch"`` (``True``, the default, as adv-lib) ends the run for ``c`` once
every point still searching has stalled (points already within a finite eps do not vote, so
``early_stop`` changes no result); ``"point"`` ends each stalled point's run on its own: its
result no longer depends on the batch it runs in, and it is faster (4x on resnet20 at 5 x 100
steps), but a point stopped at a noisy check misses later progress (median distance 4% above
adv-lib's there, 0.5% at 5 x 200); ``"off"`` (``False``) runs every step. (The authors abort
the batch on its summed loss.)

As adv-lib 0.2.8 (``adv_lib.attacks.carlini_wagner_l2``) and the authors' code:
``binary_search_steps`` 9, ``steps`` 10000, ``learning_rate`` 0.01, ``initial_const`` 1e-3,
``confidence`` 0, Adam betas (0.9, 0.999). Without eps (``eps=inf``) it returns the smallest
adversarial point over all runs; with eps see :mod:`attacks.min_norm`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import INF, ActiveRows, MinimumNorm, check_positive, keep_smallest, margin


@ATTACKS.register("cw", aliases=("cw-l2",))
class CarliniWagnerL2(MinimumNorm, Attack):
    """C&W L2 with binary search over ``c``; see the module docstring."""

    name = "cw"
    supported_norms = ("l2",)

    def __init__(
        self,
        threat: ThreatModel,
        *,
        binary_search_steps: int = 9,
        steps: int = 10000,
        learning_rate: float = 0.01,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool | str = True,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1 or binary_search_steps < 1:
            raise UsageError(f"{self.name} needs steps >= 1 and binary_search_steps >= 1, got steps={steps}, "
                             f"binary_search_steps={binary_search_steps}.")
        check_positive(self.name, learning_rate=learning_rate, initial_const=initial_const)
        if confidence < 0:
            raise UsageError(f"{self.name} needs confidence >= 0, got {confidence}.")
        self.binary_search_steps = binary_search_steps
        self.steps = steps
        self.learning_rate = learning_rate
        self.initial_const = initial_const
        self.confidence = confidence
        modes = {True: "batch", False: "off", "batch": "batch", "point": "point", "off": "off"}
        if not isinstance(abort_early, bool | str) or abort_early not in modes:
            raise UsageError(f"{self.name}: abort_early must be batch (or true), point or off (or false), "
                             f"got {abort_early!r}.")
        self.abort_early = modes[abort_early]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "binary_search_steps": self.binary_search_steps, "steps": self.steps,
                "learning_rate": self.learning_rate, "initial_const": self.initial_const,
                "confidence": self.confidence, "abort_early": self.abort_early}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        n = len(x)
        targeted = target is not None
        labels = target if targeted else y
        xf = x.flatten(1)
        tx = ((2 * xf - 1) * (1 - 1e-6)).atanh()
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, 1e10)
        best_norm = torch.full_like(const, INF)
        best_adv = xf.clone()
        check_every = max(1, self.steps // 10)
        beta1, beta2 = 0.9, 0.999
        for outer in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and outer == self.binary_search_steps - 1:
                const = upper.clone()
            w = torch.zeros_like(xf)
            m1, m2 = torch.zeros_like(xf), torch.zeros_like(xf)
            run_found = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = torch.full_like(const, INF)
            rows = ActiveRows(n, x.device)
            take = rows.take
            if self.stops() and not rows.keep(~self.within(best_norm)):
                break  # every point is within eps
            for i in range(self.steps):
                wr = take(w).detach().requires_grad_(True)
                x0 = take(xf)
                with torch.enable_grad():
                    adv_x = (torch.tanh(take(tx) + wr) + 1) / 2
                    sq = (adv_x - x0).square().sum(1)
                    logits = forward(adv_x.view(-1, *x.shape[1:]))
                    m = margin(logits, take(labels))
                    gap = -m if targeted else m  # > 0: not yet adversarial
                    loss = sq + take(const) * (gap + self.confidence).clamp_min(0)
                    (grad,) = torch.autograd.grad(loss.sum(), wr)
                size = sq.detach().sqrt()
                aim = None if target is None else take(target)
                adv = (gap.detach() + self.confidence < 0) & self.is_success(logits.detach(), take(y), aim)
                run_found = rows.put(run_found, take(run_found) | adv)
                best_norm, best_adv = keep_smallest(rows, best_norm, best_adv, adv, size, adv_x.detach())
                keep = None
                if self.abort_early != "off" and i % check_every == 0:
                    stalled = loss.detach() > take(prev) * 0.9999
                    if self.abort_early == "point":
                        keep = ~stalled
                    else:  # points already within a finite eps do not vote
                        done = self.within(take(best_norm)) if self.threat.bounded else torch.zeros_like(stalled)
                        if bool((stalled | done).all()):
                            break
                    prev = rows.put(prev, loss.detach())
                if self.stops():
                    within = self.within(take(best_norm))
                    keep = ~within if keep is None else keep & ~within
                bias1, bias2 = 1 - beta1 ** (i + 1), 1 - beta2 ** (i + 1)
                g1 = beta1 * take(m1) + (1 - beta1) * grad
                g2 = beta2 * take(m2) + (1 - beta2) * grad**2
                m1, m2 = rows.put(m1, g1), rows.put(m2, g2)
                step = (self.learning_rate / bias1) * g1 / (g2.sqrt() / math.sqrt(bias2) + 1e-8)
                w = rows.put(w, wr.detach() - step)
                if keep is not None and not rows.keep(keep):
                    break
            # bisect c per point
            upper = torch.where(run_found, torch.minimum(upper, const), upper)
            lower = torch.where(run_found, lower, torch.maximum(lower, const))
            bounded = upper < 1e9
            const = torch.where(bounded, (lower + upper) / 2, torch.where(run_found, const, const * 10))
        return self.result(x, best_adv.view_as(x), best_norm)
