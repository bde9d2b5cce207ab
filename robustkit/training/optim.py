"""Optimizers and learning-rate schedules for ``robustkit.training.loop``.

``LAMB`` (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2) is implemented here because torch does not ship it; ``bias_correction``
and ``max_weight_norm`` select the variant DAT's reference code uses (``lamb.py`` of
dat-2022/dat, from cybertronai/pytorch-lamb: no bias correction, ``||w||`` clamped to 10).
Schedules are pure functions of training progress, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from robustkit.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
SCHEDULES = ("constant", "multistep", "cosine", "cyclic", "warmup")


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments (LAMB): Adam's update with decoupled weight decay, scaled per
    parameter tensor by the trust ratio ``||w|| / ||update||`` (1 when either norm is 0).

    ``bias_correction=False`` uses the raw moments ``m / (sqrt(v) + eps)`` and
    ``max_weight_norm`` clamps ``||w||`` in the trust ratio; both as in DAT's reference.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        max_weight_norm: float | None = None,
    ):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise UsageError(f"Bad LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}.")
        if max_weight_norm is not None and not max_weight_norm > 0:
            raise UsageError(f"LAMB's max_weight_norm must be positive, got {max_weight_norm}.")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "bias_correction": bias_correction, "max_weight_norm": max_weight_norm})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group.get("bias_correction", True):
                    m, v = m / (1 - beta1**t), v / (1 - beta2**t)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                w_norm = p.norm()
                if group.get("max_weight_norm") is not None:
                    w_norm = w_norm.clamp(max=group["max_weight_norm"])
                u_norm = update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def make_optimizer(
    name: str, model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:  # fmt: skip
    """One of :data:`OPTIMIZERS` over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "lamb":
        return LAMB(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"Unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}.")


def lr_factor(
    schedule: str,
    progress: float,
    epochs: float,
    *,
    milestones: Iterable[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Learning-rate multiplier at ``progress`` epochs (fractional) into a run of ``epochs``.

    * ``constant``: 1.
    * ``multistep``: ``gamma`` per milestone passed; milestones are fractions of the run
      (default 0.5 and 0.75, the 100/150-of-200 decay of Madry/Rice et al.).
    * ``cosine``: half a cosine from 1 to 0.
    * ``cyclic``: triangle 0 → 1 → 0 peaking at 2/5 of the run (Wong et al.'s "cyclic").
    * ``warmup``: constant after a linear warmup (``warmup_epochs``, default a tenth of the run).

    ``warmup_epochs`` also adds a linear warmup in front of constant, multistep and cosine.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"Unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}.")
    frac = min(max(progress / epochs, 0.0), 1.0) if epochs > 0 else 1.0
    if schedule == "cyclic":
        peak = 0.4
        return frac / peak if frac <= peak else max(0.0, (1 - frac) / (1 - peak))
    if schedule == "warmup" and warmup_epochs <= 0:
        warmup_epochs = max(epochs / 10, 1e-9)
    if schedule == "multistep":
        factor = gamma ** sum(1 for m in milestones if frac >= m)
    elif schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * frac))
    else:
        factor = 1.0
    if warmup_epochs > 0 and progress < warmup_epochs:
        factor *= (progress + 1e-12) / warmup_epochs
    return factor
