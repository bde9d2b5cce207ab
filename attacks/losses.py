"""Per-sample losses that attacks maximize: CE, CW margin, DLR (and targeted forms), PM.

Every function takes fp32 logits ``(N, C)``, labels ``y`` and an optional ``target`` and
returns a ``(N,)`` tensor; larger means "more adversarial".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustkit.errors import UnknownNameError

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _other_max(values: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Max over classes other than ``exclude`` (per row)."""
    masked = values.scatter(1, exclude[:, None], float("-inf"))
    return masked.amax(1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the true label; targeted: minus cross-entropy on the target."""
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Carlini-Wagner margin: best other logit minus the true one (targeted: target minus best other)."""
    if target is not None:
        return logits.gather(1, target[:, None])[:, 0] - _other_max(logits, target)
    return _other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein, 2020), scale invariant; targeted form with target."""
    z_sorted, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is not None:
        z_t = logits.gather(1, target[:, None])[:, 0]
        denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
        return -(z_y - z_t) / denom
    return -(z_y - _other_max(logits, y)) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def pm_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Probability margin (PMA, arXiv 2411.15210): best other softmax probability minus p_y."""
    p = logits.softmax(1)
    if target is not None:
        return p.gather(1, target[:, None])[:, 0] - _other_max(p, target)
    return _other_max(p, y) - p.gather(1, y[:, None])[:, 0]


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss, "pm": pm_loss}


def get_loss(name: str) -> LossFn:
    """Look up a loss by name (ce, cw, dlr, pm)."""
    if name not in LOSSES:
        raise UnknownNameError("loss", name, LOSSES)
    return LOSSES[name]
