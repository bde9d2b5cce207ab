"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, arXiv 1907.02044):
untargeted FAB and FAB-T (its targeted version, part of AutoAttack's standard ensemble).

FAB is a minimum-norm attack. At its iterate ``x1`` it linearizes the decision boundary
between the true class ``y`` and a class ``k`` into the hyperplane
``{z : f(x1) + g·(z - x1) = 0}`` (``f = z_k - z_y`` and ``g`` its input gradient), projects
both ``x1`` and the original point ``x0`` onto it within the [0, 1] box (minimal Lp norm;
:func:`project_linf`, :func:`project_l2`, :func:`project_l1`, the reference's
``fab_projections``), and moves to the convex combination
``(1 - alpha)·(x1 + eta·d1) + alpha·(x0 + eta·d2)`` with ``alpha = min(|d1| / (|d1| + |d2|),
alpha_max)``, clipped to the box. Once the iterate is adversarial, it is recorded (if closer
to ``x0`` than the best so far) and pulled back towards ``x0``: ``x0 + beta·(x1 - x0)``.

As AutoAttack's ``FABAttack_PT`` (``autoattack/fab_base.py``, ``fab_pt.py``): ``steps`` 100,
``restarts`` 1 (restarts after the first start from ``x0`` plus a random point at norm
``eps/2``), ``alpha_max`` 0.1, ``eta`` 1.05, ``beta`` 0.9. Untargeted FAB picks the class
whose linearized boundary is closest (it needs the full Jacobian: one backward pass per
class); FAB-T runs once per target class, the 2nd, 3rd, ... most likely classes at ``x0``
(``n_target_classes``, default ``min(9, C - 1)``), on the samples not yet broken, and needs
one backward pass of ``z_t - z_y`` per step. Any misclassification counts as success, as in
AutoAttack; with a ``target`` given, either attack aims at it and success means predicting it.

A sample is broken when an adversarial iterate lies within the threat's ``eps``. With
``early_stop`` (the default) it stops there, so ``x_adv`` is the first such iterate; without,
it runs all steps as the reference and ``x_adv`` is the smallest adversarial point found.
``success`` is the same either way (the best norm only decreases). Samples never broken within
``eps`` return ``x0``.

Minimum-norm mode (:mod:`attacks.min_norm`): with ``eps=inf`` untargeted FAB runs all steps and
returns the smallest adversarial point found (adv-lib's ``fab``), ``distance`` its norm; restarts
then start at half the reference's default radius (Linf 0.3, L2 1, L1 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .min_norm import MinimumNorm
from .targets import Siblings, TargetClasses, pack, stop_siblings, target_groups

Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- projections onto a hyperplane within the [0, 1] box --------------------------------------
def _orient(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each hyperplane ``w·z = b`` so that ``c = w·t - b >= 0``: the step must lower ``w·z``
    by ``c``. Returns the flipped ``w``, ``c`` and ``room``, how far each coordinate can move in
    the direction that lowers ``w·z`` (to 0 where ``w > 0``, to 1 where ``w < 0``)."""
    c = (w * points).sum(1) - b
    flip = torch.where(c >= 0, 1.0, -1.0).to(w)
    w = w * flip[:, None]
    room = torch.where(w < 0, 1 - points, points)
    return w, c * flip, room


def _saturation_level(
    weights: torch.Tensor, caps: torch.Tensor, c: torch.Tensor, max_steps: int = 32, unchecked: int = 4
) -> torch.Tensor:
    """Per row, the ``lam >= 0`` with ``sum_i weights_i·min(lam, caps_i) = c`` (``inf`` where even
    every coordinate at its cap falls short).

    The sum is concave, piecewise linear and nondecreasing in ``lam``, so Newton's method from
    ``lam = 0`` climbs monotonically and lands exactly on the root once the set of saturated
    coordinates stops growing, usually within 3 to 5 steps. Each step is two masked sums, far
    cheaper than the sort FAB's Linf projection used to run every iteration (35% of FAB-T's
    time); rows still moving after ``max_steps`` are solved by the sort (:func:`_saturation_level_sorted`).

    A step on a row that has reached its root leaves it there, so the first ``unchecked`` steps
    run without asking whether every row has converged (a host synchronization each); on FAB's
    hyperplanes 3 or 4 steps nearly always suffice, so one check usually ends the loop.
    """
    at_caps = weights * caps
    lam = torch.zeros_like(c)
    free = caps > 0
    for step in range(max_steps):
        slope = torch.where(free, weights, 0).sum(1)
        below = torch.where(free, 0, at_caps).sum(1)  # the sum is below + slope·lam
        stuck = torch.where(below >= c, lam, torch.full_like(lam, float("inf")))  # no free weight left
        lam = torch.where(slope > 0, ((c - below) / slope.clamp_min(1e-30)).maximum(lam), stuck)
        now_free = caps > lam[:, None]
        if step + 1 < min(unchecked, max_steps):
            free = now_free
            continue
        moving = (now_free != free).any(1)  # the saturated set grew: not yet the root
        if not moving.any():
            return lam
        free = now_free
    lam[moving] = _saturation_level_sorted(weights[moving], caps[moving], c[moving])
    return lam


def _saturation_level_sorted(weights: torch.Tensor, caps: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """:func:`_saturation_level` by sorting the caps (the kinks of the sum): find the segment
    that holds the root, then solve on it."""
    caps_sorted, order = caps.sort(1)
    w_sorted = weights.gather(1, order)
    saturated = (w_sorted * caps_sorted).cumsum(1) - w_sorted * caps_sorted  # sum over caps below k
    free = w_sorted.flip(1).cumsum(1).flip(1)  # weight of coordinates from k on
    at_kinks = saturated + caps_sorted * free
    below = (at_kinks < c[:, None]).sum(1)  # kinks at which the sum is still short of c
    k = below.clamp_max(caps.shape[1] - 1)[:, None]
    lam = (c - saturated.gather(1, k)[:, 0]) / free.gather(1, k)[:, 0].clamp_min(1e-30)
    return torch.where(below < caps.shape[1], lam.clamp_min(0), torch.full_like(lam, float("inf")))


def project_linf(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-Linf ``d`` with ``w·(t + d) = b`` and ``t + d`` in [0, 1], per row of ``points``
    (rows flattened); where the box makes it impossible, the box corner closest to the plane."""
    w, c, room = _orient(points, w, b)
    lam = _saturation_level(w.abs(), room, c)
    return -w.sign() * torch.minimum(lam[:, None], room)


def project_l2(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-L2 ``d`` with ``w·(t + d) = b`` and ``t + d`` in [0, 1]: ``d = -lam·w`` clipped
    to the box, i.e. coordinate ``i`` saturates at ``lam = room_i / |w_i|``."""
    w, c, room = _orient(points, w, b)
    w = torch.where(w.abs() > 1e-8, w, torch.zeros_like(w))
    caps = torch.where(w != 0, room / w.abs().clamp_min(1e-30), torch.zeros_like(w))
    lam = _saturation_level(w**2, caps, c)
    return -w * torch.minimum(lam[:, None], caps)


def project_l1(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-L1 ``d`` with ``w·(t + d) = b`` and ``t + d`` in [0, 1]: move the coordinates with
    the largest ``|w|`` first, each as far as the box allows, until the plane is reached."""
    w, c, room = _orient(points, w, b)
    full = -w.sign() * room
    order = w.abs().argsort(1, descending=True)
    rank = order.argsort(1)
    remaining = c[:, None] - (w.abs() * room).gather(1, order).cumsum(1)  # left after the first k+1
    used = (remaining > 0).sum(1, keepdim=True)  # coordinates moved all the way
    partial_at = order.gather(1, used.clamp_max(w.shape[1] - 1))
    left = torch.where(used > 0, remaining.gather(1, (used - 1).clamp_min(0)), c[:, None])
    w_partial = w.gather(1, partial_at)
    step = torch.where(w_partial.abs() > 1e-8, -left / w_partial, torch.zeros_like(left))
    d = torch.where(rank < used, full, torch.zeros_like(full)).scatter(1, partial_at, step)
    reachable = remaining[:, -1:] < 0
    d = torch.where(reachable, d, full)
    return torch.where(w.abs() > 1e-8, d, torch.zeros_like(d))


PROJECTIONS: dict[str, Projection] = {"linf": project_linf, "l2": project_l2, "l1": project_l1}
RESTART_RADIUS = {"linf": 0.3, "l2": 1.0, "l1": 5.0}  # without eps: the reference's default eps


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm dual to ``norm`` over the last dimension (distance to a hyperplane = |f| / dual(g))."""
    if norm == "linf":
        return g.abs().sum(-1)
    if norm == "l2":
        return g.norm(dim=-1)
    return g.abs().amax(-1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@ATTACKS.register("fab")
class FAB(MinimumNorm, Attack):
    """Untargeted FAB (AutoAttack's ``FABAttack_PT``); see the module docstring."""

    name = "fab"
    supported_norms = ("linf", "l2", "l1")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if steps < 1 or restarts < 1:
            raise UsageError(f"{self.name} needs steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}.")
        if not 0 <= alpha_max <= 1 or eta < 1 or not 0 < beta <= 1:
            raise UsageError(
                f"{self.name} needs 0 <= alpha_max <= 1, eta >= 1 and 0 < beta <= 1, "
                f"got alpha_max={alpha_max}, eta={eta}, beta={beta}."
            )
        self.steps = steps
        self.restarts = restarts
        self.alpha_max = alpha_max
        self.eta = eta
        self.beta = beta
        self.project = PROJECTIONS[threat.norm]

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "restarts": self.restarts,
            "alpha_max": self.alpha_max,
            "eta": self.eta,
            "beta": self.beta,
        }

    # -- the attack ----------------------------------------------------------------------
    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        return self.attack_classes(forward, x, y, None if target is None else [target], target, generator)

    def attack_classes(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        towards: list[torch.Tensor] | None,
        target: torch.Tensor | None,
        generator: torch.Generator,
        budget: int | None = None,
    ) -> AttackResult:
        """Runs (``restarts`` each) towards every class of ``towards`` (per-sample classes,
        packed within ``budget`` rows as :mod:`attacks.targets` explains; ``None``: the closest
        boundary), on the samples not yet broken."""
        x_adv = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        pending = lambda: int((~found).sum())  # noqa: E731
        groups = [None] if towards is None else target_groups(towards, pending, budget or len(x))
        for group in groups:
            for restart in range(self.restarts):
                # the random start is drawn for all samples, so results do not depend on early_stop
                start = x if restart == 0 else self.random_start(x, generator)
                rows = (~found).nonzero().flatten()
                if not len(rows):
                    return AttackResult(x_adv=x_adv, success=found)
                packed, toward = (rows, None) if group is None else pack(rows, group)
                owner = packed if group is not None and len(group) > 1 and self.early_stop else None
                aim = None if target is None else target[packed]
                run_adv, run_found = self.run(forward, x[packed], y[packed], toward, aim, start[packed], owner)
                for part in reversed(range(len(run_found) // len(rows))):  # the first class to break a point wins
                    cut = slice(part * len(rows), (part + 1) * len(rows))
                    x_adv[rows[run_found[cut]]] = run_adv[cut][run_found[cut]]
                found[rows] = run_found.view(-1, len(rows)).any(0)
        return AttackResult(x_adv=x_adv, success=found)

    def random_start(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The reference's restart point: ``x`` plus a random direction at norm ``eps / 2``
        (uniform for Linf, Gaussian for L2 and L1)."""
        if self.threat.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        else:
            t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = t / _view(self.threat.norm_of(t).clamp_min(1e-12), t)
        radius = self.threat.eps if self.threat.bounded else RESTART_RADIUS[self.threat.norm]
        return self.threat.clip(x + 0.5 * radius * t, x)

    def linearize(
        self, forward: Forward, x1: torch.Tensor, y: torch.Tensor, toward: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f = z_k - z_y`` at ``x1`` and its gradient (flattened), for the class ``k`` given
        (one backward pass) or, with ``toward=None``, for the class whose linearized boundary
        is closest (the full Jacobian: one backward pass per class)."""
        rows = torch.arange(len(x1), device=x1.device)
        with torch.enable_grad():
            xg = x1.detach().requires_grad_(True)
            logits = forward(xg)
            if toward is not None:
                f = logits[rows, toward] - logits[rows, y]
                (g,) = torch.autograd.grad(f.sum(), xg)
                return f.detach(), g.flatten(1)
            num_classes = logits.shape[1]
            jac = torch.stack(
                [
                    torch.autograd.grad(logits[:, k].sum(), xg, retain_graph=k < num_classes - 1)[0].flatten(1)
                    for k in range(num_classes)
                ],
                dim=1,
            )
        logits = logits.detach()
        df = logits - logits[rows, y][:, None]
        dg = jac - jac[rows, y][:, None]
        dist = df.abs() / (_dual_norm(dg, self.threat.norm) + 1e-12)
        dist[rows, y] = float("inf")
        k = dist.argmin(1)
        return df[rows, k], dg[rows, k]

    def run(
        self,
        forward: Forward,
        x0: torch.Tensor,
        y: torch.Tensor,
        toward: torch.Tensor | None,
        target: torch.Tensor | None,
        start: torch.Tensor,
        owner: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run from ``start``: the adversarial points found and which samples are broken
        (an adversarial point within eps); a broken row stops the rows of the same ``owner``."""
        n = len(x0)
        eps = self.threat.eps
        x0f = x0.flatten(1)
        x1 = start.flatten(1).clone()
        x_best = x0f.clone()
        best = torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
        alive = torch.ones(n, dtype=torch.bool, device=x0.device)
        everyone = torch.arange(n, device=x0.device)
        siblings = None if owner is None else Siblings(owner)
        # masks and torch.where instead of boolean indexing: no host synchronization besides the
        # early-stop check and the projection's convergence check
        for _ in range(self.steps):
            rows = alive.nonzero().flatten() if self.early_stop else everyone
            if not len(rows):
                break
            m = len(rows)
            xr, x0r = x1[rows], x0f[rows]
            tr = None if toward is None else toward[rows]
            f, g = self.linearize(forward, xr.view(-1, *x0.shape[1:]), y[rows], tr)
            b = (g * xr).sum(1) - f  # the linearized boundary: g·z = b
            d = self.project(torch.cat([xr, x0r]), torch.cat([g, g]), torch.cat([b, b]))
            size = self.threat.norm_of(d).clamp_min(1e-8)
            alpha = (size[:m] / (size[:m] + size[m:])).clamp(0, self.alpha_max)[:, None]
            # the image box: FAB searches the box, the eps-ball only decides success
            xr = ((xr + self.eta * d[:m]) * (1 - alpha) + (x0r + self.eta * d[m:]) * alpha).clamp(0, 1)
            with torch.no_grad():
                logits = forward(xr.view(-1, *x0.shape[1:]))
            adv = self.is_success(logits, y[rows], None if target is None else target[rows])
            dist = self.threat.norm_of(xr - x0r)
            closer = adv & (dist < best[rows])
            x_best[rows] = torch.where(closer[:, None], xr, x_best[rows])
            best[rows] = torch.where(closer, dist, best[rows])
            x1[rows] = torch.where(adv[:, None], x0r + self.beta * (xr - x0r), xr)
            if self.early_stop:
                broken = adv & (dist <= eps)
                alive[rows] &= ~broken
                if siblings is not None:
                    stop_siblings(alive, siblings, torch.zeros_like(alive).index_put_((rows,), broken))
        found = best.isfinite() & (best <= eps)
        return x_best.view_as(x0), found


@ATTACKS.register("fab-t")
class FABT(TargetClasses, FAB):
    """Targeted FAB, as AutoAttack's ``FABAttack_PT(targeted=True)`` in its standard version:
    one run per target class, the 2nd to ``(n_target_classes + 1)``-th most likely classes at
    the clean point (``n_target_classes`` defaults to ``min(9, C - 1)``)."""

    name = "fab-t"

    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
        budget: int | None = None,
    ) -> AttackResult:
        """``budget``: rows in flight when target classes are packed (default ``len(x)``)."""
        if target is not None:
            return self.attack_classes(forward, x, y, [target], target, generator)
        with torch.no_grad():
            clean = forward(x)
        return self.attack_classes(forward, x, y, self.target_classes(clean), None, generator, budget)
