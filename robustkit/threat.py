"""Threat models: the set of allowed perturbations (an Lp ball intersected with the [0, 1] box).

Attacks never re-implement projection, clamping or random starts; they call these methods.

``eps=math.inf`` is the box alone: the minimum-norm attacks (``fmn``, ``ddn``, ``alma``, ``cw``,
``deepfool``, ``fab``) then return the smallest adversarial point they find; the others need a
finite eps. ``l0`` counts the changed coordinates, each channel of each pixel separately (as
FMN's authors and adv-lib, ``(x_adv - x).flatten(1).norm(p=0)``); its eps is that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robustkit.errors import UsageError

NORMS = ("linf", "l2", "l1", "l0")


def _flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l0":
        return (flat != 0).sum(1).to(flat.dtype if flat.is_floating_point() else torch.float32)
    return flat.abs().sum(1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _project_l1(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample onto the L1 ball (Duchi et al., 2008)."""
    flat = delta.flatten(1)
    abs_v = flat.abs()
    inside = abs_v.sum(1) <= eps
    mu, _ = abs_v.sort(dim=1, descending=True)
    cumsum = mu.cumsum(1)
    ar = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu - (cumsum - eps) / ar > 0
    rho = cond.float().cumsum(1).argmax(1, keepdim=True)  # last index where cond holds
    theta = (cumsum.gather(1, rho) - eps) / (rho + 1).to(flat.dtype)
    projected = flat.sign() * (abs_v - theta).clamp_min(0)
    out = torch.where(inside[:, None], flat, projected)
    return out.view_as(delta)


def _project_l0(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude coordinates of each sample (the nearest point, any Lp)."""
    flat = delta.flatten(1)
    if k >= flat.shape[1]:
        return delta
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` around each input, within the [0, 1] image box."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        norm = str(self.norm).lower()
        if norm not in NORMS:
            raise UsageError(f"Unknown norm {self.norm!r}; accepted: {', '.join(NORMS)}.")
        object.__setattr__(self, "norm", norm)
        eps = float(self.eps)
        if math.isnan(eps) or eps <= 0:
            raise UsageError(f"eps must be a positive number (inf: no bound, minimum-norm attacks), got {eps:g}.")
        if norm == "l0" and math.isfinite(eps) and eps != int(eps):
            raise UsageError(f"L0 eps counts changed coordinates, so it must be a whole number, got {eps:g}.")
        if norm == "linf" and math.isfinite(eps) and eps > 1:
            raise UsageError(
                f"Linf eps must be at most 1 (images are in [0, 1]), got {eps:g}; did you mean {eps:g}/255?"
            )
        object.__setattr__(self, "eps", eps)

    def norm_of(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of a perturbation batch."""
        return _flat_norm(delta, self.norm)

    @property
    def bounded(self) -> bool:
        """False for ``eps=inf`` (the box alone: minimum-norm attacks)."""
        return math.isfinite(self.eps)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Project each perturbation onto the eps-ball."""
        if not self.bounded:
            return delta
        if self.norm == "l0":
            return _project_l0(delta, int(self.eps))
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        if self.norm == "l2":
            n = _flat_norm(delta, "l2")
            factor = torch.clamp(self.eps / (n + 1e-12), max=1.0)
            return delta * _view(factor, delta)
        return _project_l1(delta, self.eps)

    def clip(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return the point of the threat set nearest to ``x_adv`` (ball, then [0, 1] box)."""
        return (x + self.project(x_adv - x)).clamp(0.0, 1.0)

    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random start inside the threat set: uniform in the Linf ball, or a random
        direction with radius uniform in [0, eps] for L2/L1 (as torchattacks' PGDL2); for L0,
        eps random coordinates set to uniform values."""
        if not self.bounded:
            raise UsageError("A random start needs a finite eps; this threat model has none (eps=inf).")
        if self.norm == "l0":
            flat = x.flatten(1)
            order = torch.rand(flat.shape, generator=generator, device=x.device).argsort(1)
            chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, : int(self.eps)], True)
            u = torch.rand(flat.shape, generator=generator, device=x.device, dtype=x.dtype)
            return torch.where(chosen, u, flat).view_as(x)
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
        else:
            d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if self.norm == "l1":
                d = d.sign() * d.abs() ** 3  # concentrate mass: l1 balls have sparse corners
            d = d / _view(_flat_norm(d, self.norm) + 1e-12, d)
            r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = d * _view(r * self.eps, d)
        return (x + delta).clamp(0.0, 1.0)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Per-sample check that ``x_adv`` lies in the threat set (used by tests and checks)."""
        in_box = (x_adv >= -tol).flatten(1).all(1) & (x_adv <= 1 + tol).flatten(1).all(1)
        return in_box & (self.norm_of(x_adv - x) <= self.eps * (1 + tol) + tol)

    def describe(self) -> str:
        return f"{self.norm} eps={self.eps:.6g}"
