"""What the minimum-norm attacks (FMN, DDN, ALMA, C&W, DeepFool, FAB) share.

A minimum-norm attack looks for the adversarial point closest to ``x``. Its threat model says
when it may stop:

* ``eps=math.inf`` (``ThreatModel("l2", math.inf)``, the box alone): it runs its whole budget and
  returns the smallest adversarial point it found (``x`` where it found none); ``early_stop`` has
  nothing to stop on and is off;
* a finite ``eps``: a point stops once it has an adversarial point within ``eps`` (with
  ``early_stop``, the default), and ``success`` means such a point was found; points without one
  return ``x``. ``success`` does not depend on ``early_stop``: the best norm only decreases.

:class:`MinimumNorm` adds ``distance`` to the result, the norm of ``x_adv - x`` where ``success``
and ``inf`` elsewhere (0 for points misclassified from the start), and the ``targeted`` option:
``targeted=True`` insists on a ``target`` (one class per point). Without ``targeted``, a
``target`` passed anyway is aimed at too, as for every robustkit attack.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from robustkit.attack import AttackResult
from robustkit.errors import UsageError
from robustkit.threat import ThreatModel

INF = float("inf")


class MinimumNorm:
    """Mixin (before :class:`robustkit.attack.Attack` in the bases) for minimum-norm attacks."""

    name: str
    threat: ThreatModel
    early_stop: bool
    supports_targeted: ClassVar[bool]
    minimum_norm: ClassVar[bool] = True  # runs without eps (eps=inf)

    def __init__(self, threat: ThreatModel, *, targeted: bool = False, **kwargs: Any):
        super().__init__(threat, **kwargs)  # type: ignore[call-arg]
        if targeted and not self.supports_targeted:
            raise UsageError(f"{self.name} is untargeted; it has no targeted version (targeted=True).")
        self.targeted = targeted
        if not threat.bounded:
            self.early_stop = False  # every adversarial point is "within eps": nothing to stop on

    def config(self) -> dict[str, Any]:
        cfg = super().config()  # type: ignore[misc]
        return {**cfg, "targeted": True} if self.targeted else cfg

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None
    ) -> AttackResult:
        if self.targeted and target is None:
            raise UsageError(f"{self.name} was set up as a targeted attack (targeted=True) but got no target; "
                             "pass target= with one class per point.")
        result: AttackResult = super().__call__(model, x, y, target=target)  # type: ignore[misc]
        dist = self.threat.norm_of(result.x_adv - x.to(result.x_adv.device)).float()
        result.distance = torch.where(result.success, dist, torch.full_like(dist, INF))
        return result

    # -- helpers for the loops ---------------------------------------------------------------
    def within(self, norms: torch.Tensor) -> torch.Tensor:
        """Which best norms count as success (all finite ones without eps)."""
        return norms <= self.threat.eps if self.threat.bounded else norms < INF

    def stops(self) -> bool:
        """Whether points leave the batch once they have an adversarial point within eps."""
        return self.early_stop and self.threat.bounded

    def result(self, x: torch.Tensor, best_adv: torch.Tensor, best_norm: torch.Tensor) -> AttackResult:
        """``best_adv`` where its norm counts as success (``best_norm`` is inf where none), else ``x``."""
        ok = self.within(best_norm)
        return AttackResult(x_adv=torch.where(view(ok, x), best_adv, x), success=ok)


class ActiveRows:
    """The points a minimum-norm attack still works on, and how their state is read and written.

    It starts with every point as whole tensors: ``take`` returns the tensor itself and ``put``
    returns the new value, so a step costs no row gathers, scatters or boolean-index host syncs
    (without eps no point ever stops, and this is the whole run). The first time :meth:`keep`
    drops a point, it switches to an index of the remaining rows: ``take`` gathers them and
    ``put`` writes them back in place. The values are the same either way.
    """

    def __init__(self, n: int, device: torch.device):
        self.index = torch.arange(n, device=device)
        self.whole = True

    def __len__(self) -> int:
        return len(self.index)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The active rows of ``t`` (``t`` itself while every point is active: do not modify it)."""
        return t if self.whole else t[self.index]

    def put(self, t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``t`` with its active rows set to ``value``; assign the result back to ``t``."""
        if self.whole:
            return value
        t[self.index] = value
        return t

    def put_where(self, t: torch.Tensor, mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``t`` with the active rows where ``mask`` holds set to those rows of ``value``."""
        if self.whole:
            return torch.where(view(mask, value), value, t)
        t[self.index[mask]] = value[mask]
        return t

    def keep(self, mask: torch.Tensor) -> bool:
        """Keep the active rows where ``mask`` holds (one host sync); whether any are left."""
        if self.whole and bool(mask.all()):
            return True
        self.index, self.whole = self.index[mask], False
        return bool(len(self.index))


def keep_smallest(rows: ActiveRows, best_norm: torch.Tensor, best_adv: torch.Tensor, adv: torch.Tensor,
                  size: torch.Tensor, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best norms and points after a step: an active row's ``point`` (flattened) replaces
    its best where it is adversarial (``adv``) and its norm ``size`` is smaller."""
    better = adv & (size < rows.take(best_norm))
    return rows.put_where(best_norm, better, size), rows.put_where(best_adv, better, point)


def view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector shaped to broadcast against a batch like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_label - max_{k != label} z_k`` per row (negative: another class wins)."""
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -INF).amax(1)
    return own - others


def lp(v: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample Lp norm of a batch (``p`` in 0, 1, 2, inf; 0 counts nonzero coordinates), by
    torch's ``norm`` as adv-lib: the same rounding keeps a run on adv-lib's trajectory."""
    return v.flatten(1).norm(p=p, dim=1)


P = {"l0": 0.0, "l1": 1.0, "l2": 2.0, "linf": INF}
DUAL = {"l1": INF, "l2": 2.0, "linf": 1.0}


def project_l1_ball(flat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the L1 ball of its own radius ``eps[i]`` (Duchi et
    al., 2008); rows already inside are left alone, and only the rows outside are sorted (the
    sort is most of the cost; once most points are inside their ball, adv-lib does the same)."""
    outside = flat.norm(p=1, dim=1) > eps
    if not outside.any():
        return flat
    if outside.all():
        return _project_rows_l1(flat, eps)
    rows = outside.nonzero().squeeze(1)
    projected = flat.clone()
    projected[rows] = _project_rows_l1(flat[rows], eps[rows])
    return projected


def _project_rows_l1(flat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Duchi et al.'s projection of every row of ``flat`` (all outside their ball) onto it."""
    abs_v = flat.abs()
    mu = abs_v.sort(dim=1, descending=True).values
    cumsum = mu.cumsum(1)
    ar = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu - (cumsum - eps[:, None]) / ar > 0
    rho = cond.float().cumsum(1).argmax(1, keepdim=True)  # last index where cond holds
    theta = (cumsum.gather(1, rho) - eps[:, None]) / (rho + 1).to(flat.dtype)
    return flat.sign() * (abs_v - theta).clamp_min(0)


def check_positive(name: str, **values: float) -> None:
    """One sentence naming the options of ``values`` that are not positive."""
    bad = [f"{k}={v}" for k, v in values.items() if v is not None and not (v > 0 and math.isfinite(v))]
    if bad:
        raise UsageError(f"{name} needs positive {', '.join(values)}, got {', '.join(bad)}.")
