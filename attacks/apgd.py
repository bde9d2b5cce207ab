"""Auto-PGD (Croce & Hein, ICML 2020, arXiv 2003.01690): APGD-CE, APGD-DLR and APGD-T.

The schedule follows AutoAttack's ``APGDAttack`` / ``APGDAttack_targeted``
(``autoattack/autopgd_base.py``):

* step size ``2·eps`` (Linf, L2) or ``eps`` (L1) per sample, momentum 0.75 (Linf, L2);
* checkpoints after ``p_j·steps`` iterations, ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (see :func:`checkpoints`); at a
  checkpoint a sample's step size is halved and it restarts from its best point when the loss
  increased in at most ``rho = 0.75`` of the steps since the last checkpoint, or when its step
  size was not reduced at the last checkpoint and its best loss has not improved since;
* random start as the reference draws it (Linf: uniform, rescaled so that the largest
  coordinate sits on the ball; L2: on the sphere of radius eps; L1: a Gaussian projected on
  the L1 ball and the box). ``ThreatModel.random_init`` has other distributions, so the draw is
  made here; the ball and the box are ``ThreatModel.clip``'s;
* L1 (the reference's specifics): the step moves only the coordinates with the largest
  gradients (a sparsity level adapted at checkpoints every ``0.04·steps`` iterations), the
  step size is reset or divided by 1.5 there, and every iterate is the exact Euclidean
  projection onto the intersection of the L1 ball and the [0, 1] box (:func:`project_l1_box`;
  ``ThreatModel.clip`` projects on the ball, then clamps, which loses budget on sparse
  steps). ``use_largereps`` runs the reference's 3·eps, 2·eps, eps schedule (AutoAttack's
  standard L1 version uses it, with 5 restarts).

Semantics shared with :mod:`attacks.pgd`: a sample counts as broken at its first adversarial
iterate (the start included) and is frozen there. With ``early_stop`` it leaves the batch;
without, it is still computed (as the reference does) but its result is kept, so the per-sample
outcome is the same either way. Restarts and target classes run only on samples not yet broken.
Samples never broken return their highest-loss point; ``loss`` is the best loss per sample
(for APGD-T: over all target classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .losses import get_loss
from .targets import Siblings, TargetClasses, pack, stop_siblings, target_groups

MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """Iteration counts after which APGD (Linf, L2) checks its step size: for 100 steps
    22, 41, 57, 70, 80, 87, 93, 99 (``p_j·steps`` of the paper, rounded as the reference)."""
    first = max(int(0.22 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    points, at, window = [], 0, first
    while at + window <= steps:
        at += window
        points.append(at)
        window = max(window - shrink, shortest)
    return points


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of ``delta`` onto {d : ||d||_1 <= eps, 0 <= x + d <= 1}, per sample.

    The solution is ``sign(v)·clip(|v| - lam, 0, u)`` with ``u`` the room the box leaves in the
    direction of ``v`` and ``lam >= 0`` the smallest threshold meeting the budget; the
    piecewise-linear budget is evaluated at all its breakpoints (sorted) to find ``lam``.
    """
    shape = delta.shape
    v = delta.flatten(1)
    xf = x.flatten(1)
    a = v.abs()
    room = torch.where(v > 0, 1 - xf, xf).clamp_min(0)
    direct = a.minimum(room)  # lam = 0: only the box
    over = direct.sum(1, keepdim=True) > eps
    # every row is solved and the rows within budget keep ``direct`` (no host synchronization)
    # Breakpoints of f(lam) = sum(clip(a - lam, 0, room)): a (a term reaches 0) and a - room
    # (a term leaves its cap). Walking lam downwards, the slope grows by 1 at a and drops by 1
    # at a - room.
    points = torch.cat([a, a - room], 1)
    slope_change = torch.cat([torch.ones_like(a), -torch.ones_like(a)], 1)
    points, order = points.sort(1, descending=True)
    slope = slope_change.gather(1, order).cumsum(1)  # active terms just below each breakpoint
    gaps = points[:, :-1] - points[:, 1:]
    f_at = torch.cat([torch.zeros_like(points[:, :1]), (slope[:, :-1] * gaps).cumsum(1)], 1)
    k = ((f_at < eps).sum(1, keepdim=True) - 1).clamp_min(0)  # last breakpoint below budget
    lam = points.gather(1, k) - (eps - f_at.gather(1, k)) / slope.gather(1, k).clamp_min(1)
    out = torch.where(over, (a - lam.clamp_min(0)).clamp_min(0).minimum(room), direct)
    return (v.sign() * out).view(shape)


def _l0(v: torch.Tensor) -> torch.Tensor:
    return (v != 0).flatten(1).sum(1).to(v.dtype)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _keep(live: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` on the live rows and ``old`` on the others (all live: ``live`` is None)."""
    return new if live is None else torch.where(_view(live, new), new, old)


def _and(mask: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    return mask if live is None else mask & live


@dataclass
class _Run:
    """Outcome of one APGD run on a set of samples."""

    found: torch.Tensor  # broken at some iterate
    x_found: torch.Tensor  # the first adversarial iterate (where found)
    x_best: torch.Tensor  # the highest-loss iterate
    loss_best: torch.Tensor

    def part(self, index: int, size: int) -> _Run:
        """The rows ``index·size`` to ``(index + 1)·size``: one target class of a packed run."""
        cut = slice(index * size, (index + 1) * size)
        return _Run(self.found[cut], self.x_found[cut], self.x_best[cut], self.loss_best[cut])


class _Batch:
    """Merges runs (restarts, target classes) into one per-sample outcome."""

    def __init__(self, x: torch.Tensor):
        self.found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.x_adv = x.clone()
        self.loss = torch.full((len(x),), float("-inf"), device=x.device)

    def todo(self) -> torch.Tensor:
        return (~self.found).nonzero().flatten()

    def merge(self, rows: torch.Tensor, run: _Run) -> None:
        """Add a run on ``rows``; a point already broken keeps its adversarial point."""
        fresh = ~self.found[rows]
        found = run.found & fresh
        better = fresh & ~run.found & (run.loss_best > self.loss[rows])
        self.x_adv[rows[better]] = run.x_best[better]
        self.x_adv[rows[found]] = run.x_found[found]
        self.found[rows[found]] = True
        self.loss[rows] = torch.maximum(self.loss[rows], run.loss_best)

    def result(self) -> AttackResult:
        return AttackResult(x_adv=self.x_adv, success=self.found, loss=self.loss)


@ATTACKS.register("apgd-ce", aliases=("apgd",))
class APGD(Attack):
    """Auto-PGD (Croce & Hein, 2020) with the cross-entropy loss, as AutoAttack's APGD-CE.

    ``steps`` and ``restarts`` are AutoAttack's ``n_iter`` and ``n_restarts`` (defaults 100
    and 1, as in AutoAttack's standard version); ``eot_iter`` averages each gradient over that
    many forward passes (Expectation over Transformation, AutoAttack's ``rand`` version uses 20;
    logits and loss are those of the last pass, as the reference). ``loss`` is any of attacks.losses (ce, dlr,
    cw, pm); with a ``target`` its targeted form is maximized and success means hitting it.
    """

    name = "apgd-ce"
    supported_norms = ("linf", "l2", "l1")
    default_loss = "ce"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        loss: str | None = None,
        rho: float = 0.75,
        use_largereps: bool = False,
        eot_iter: int = 1,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if eot_iter < 1:
            raise UsageError(f"{self.name} needs eot_iter >= 1, got {eot_iter}.")
        if steps < 1 or restarts < 1:
            raise UsageError(
                f"{self.name} needs steps >= 1 and restarts >= 1, "
                f"got steps={steps}, restarts={restarts}."
            )
        if not 0 < rho < 1:
            raise UsageError(f"{self.name} needs 0 < rho < 1, got rho={rho}.")
        if use_largereps and threat.norm != "l1":
            raise UsageError(
                f"use_largereps is an L1 schedule; {self.name} got norm {threat.norm}."
            )
        self.steps = steps
        self.restarts = restarts
        self.loss_name = loss or self.default_loss
        self.loss_fn = get_loss(self.loss_name)
        self.rho = rho
        self.use_largereps = use_largereps
        self.eot_iter = eot_iter

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "steps": self.steps,
            "restarts": self.restarts,
            "loss": self.loss_name,
            "rho": self.rho,
        }
        if self.threat.norm == "l1":
            cfg["use_largereps"] = self.use_largereps
        if self.eot_iter > 1:
            cfg["eot_iter"] = self.eot_iter
        return cfg

    # -- checks --------------------------------------------------------------------------
    def check_classes(self, num_classes: int, targeted: bool) -> None:
        """DLR uses the 3rd (targeted: 4th) largest logit; refuse models with too few classes."""
        if self.loss_name != "dlr":
            return
        need = 4 if targeted else 3
        if num_classes < need:
            kind = "targeted DLR" if targeted else "DLR"
            raise UsageError(
                f"{self.name}: the {kind} loss needs a model with at least {need} classes, "
                f"this one has {num_classes}; use loss='ce' (apgd-ce) instead."
            )

    # -- the attack ----------------------------------------------------------------------
    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        with torch.no_grad():
            self.check_classes(forward(x[:1]).shape[1], targeted=target is not None)
        batch = _Batch(x)
        for _ in range(self.restarts):
            rows = batch.todo()
            if not len(rows):
                break
            tgt = None if target is None else target[rows]
            batch.merge(rows, self.attack_once(forward, x[rows], y[rows], tgt, tgt, generator))
        return batch.result()

    def attack_once(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_target: torch.Tensor | None,
        success_target: torch.Tensor | None,
        generator: torch.Generator,
        owner: torch.Tensor | None = None,
    ) -> _Run:
        """One run from a random start (or the L1 3·eps, 2·eps, eps schedule); ``owner`` maps
        packed rows to their points (see :mod:`attacks.targets`)."""
        eps = self.threat.eps
        if not self.use_largereps:
            start = self.random_start(x, eps, generator)
            return self.run(forward, x, y, loss_target, success_target, start, eps, self.steps, owner=owner)
        stages = [math.ceil(0.3 * self.steps)] * 2
        stages.append(self.steps - sum(stages))
        epss = [3 * eps, 2 * eps, eps]
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = x + project_l1_box(x, noise, epss[0])
        run = None
        for i, (eps_i, steps_i) in enumerate(zip(epss, stages, strict=True)):
            start = x + project_l1_box(x, start - x, eps_i)
            # success at a larger eps is not success: only the last stage breaks samples
            run = self.run(
                forward,
                x,
                y,
                loss_target,
                success_target,
                start,
                eps_i,
                max(steps_i, 1),
                from_start=True,
                track_success=i == len(epss) - 1,
                owner=owner,
            )
            start = run.x_best
        assert run is not None
        return run

    def random_start(self, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
        """The reference's random start (see the module docstring)."""
        if self.threat.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
            t = t / _view(t.flatten(1).abs().amax(1) + 1e-12, t)
            return self.threat.clip(x + eps * t, x)
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.threat.norm == "l2":
            t = t / _view(t.flatten(1).norm(p=2, dim=1) + 1e-12, t)
            return self.threat.clip(x + eps * t, x)
        return (x + project_l1_box(x, t, eps)).clamp(0, 1)

    def evaluate(
        self,
        forward: Forward,
        xa: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        need_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits, per-sample loss and (if asked) the gradient of the loss at ``xa``."""
        if not need_grad:
            with torch.no_grad():
                logits = forward(xa)
                return logits, self.loss_fn(logits, y, target), None
        grad = torch.zeros_like(xa)
        for _ in range(self.eot_iter):  # EOT: average the gradient over the model's randomness
            with torch.enable_grad():
                xg = xa.detach().requires_grad_(True)
                logits = forward(xg)
                loss = self.loss_fn(logits, y, target)
                grad += torch.autograd.grad(loss.sum(), xg)[0]
        return logits.detach(), loss.detach(), grad / self.eot_iter

    def step(
        self,
        x: torch.Tensor,
        cur: torch.Tensor,
        prev: torch.Tensor,
        grad: torch.Tensor,
        size: torch.Tensor,
        momentum: float,
        eps: float,
        topk: torch.Tensor,
    ) -> torch.Tensor:
        """The next iterate: a projected step, then the momentum combination (Linf, L2), or the
        sparse L1 step."""
        size = _view(size, x)
        if self.threat.norm == "l1":
            flat = grad.abs().flatten(1)
            n = flat.shape[1]
            kth = ((1 - topk) * n).clamp(0, n - 1).long()
            thresh = flat.sort(1).values.gather(1, kth[:, None])
            direction = (grad * (grad.abs() >= _view(thresh, grad))).sign()
            moved = cur + size * direction / _view(direction.flatten(1).abs().sum(1) + 1e-10, x)
            return (x + project_l1_box(x, moved - x, eps)).clamp(0, 1)
        if self.threat.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _view(grad.flatten(1).norm(p=2, dim=1) + 1e-12, grad)
        z = self.threat.clip(cur + size * direction, x)
        return self.threat.clip(cur + momentum * (z - cur) + (1 - momentum) * (cur - prev), x)

    def run(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_target: torch.Tensor | None,
        success_target: torch.Tensor | None,
        start: torch.Tensor,
        eps: float,
        steps: int,
        from_start: bool = False,
        track_success: bool = True,
        owner: torch.Tensor | None = None,
    ) -> _Run:
        """One APGD run of ``steps`` iterations on the samples ``x`` from ``start``; a broken
        row stops the rows of the same ``owner`` (packed target classes)."""
        n, dev = len(x), x.device
        l1 = self.threat.norm == "l1"
        logits, loss, grad = self.evaluate(forward, start, y, loss_target, need_grad=True)
        assert grad is not None
        cur, prev = start.clone(), start.clone()
        x_best, grad_best, loss_best = start.clone(), grad.clone(), loss.clone()
        found = (
            self.is_success(logits, y, success_target)
            if track_success
            else torch.zeros(n, dtype=torch.bool, device=dev)
        )
        x_found = start.clone()
        alive = ~found
        size = torch.full((n,), (1.0 if l1 else 2.0) * eps, device=dev, dtype=x.dtype)
        # the step-size rule's bookkeeping
        loss_prev = torch.zeros(n, device=dev)  # the reference compares the first loss with 0
        n_incr = torch.zeros(n, device=dev)
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones(n, dtype=torch.bool, device=dev)
        n_fts = x[0].numel()
        if l1:
            window = max(int(0.04 * steps), 1)
            if from_start:
                sp_old = _l0(start - x)
                topk = sp_old / n_fts / 1.5
            else:
                topk = torch.full((n,), 0.2, device=dev, dtype=x.dtype)
                sp_old = torch.full((n,), float(n_fts), device=dev, dtype=x.dtype)
            marks = set(range(window, steps + 1, window))
        else:
            topk = torch.zeros(n, device=dev, dtype=x.dtype)
            marks = set(checkpoints(steps))
        last_mark = 0
        all_rows = torch.arange(n, device=dev)
        siblings = None if owner is None else Siblings(owner)

        # Masks and torch.where instead of boolean indexing: the only host synchronization per
        # iteration is the early-stop check (which rows are still running).
        for i in range(steps):
            run = alive.nonzero().flatten() if self.early_stop else all_rows
            if not len(run):
                break
            new = self.step(
                x[run],
                cur[run],
                prev[run],
                grad[run],
                size[run],
                MOMENTUM if i > 0 else 1.0,
                eps,
                topk[run],
            )
            tgt = None if loss_target is None else loss_target[run]
            logits, loss, g = self.evaluate(forward, new, y[run], tgt, need_grad=i < steps - 1)
            # without early_stop, broken samples are computed but frozen (live is False)
            live = None if self.early_stop else alive[run]
            rows = run
            prev[rows] = _keep(live, cur[rows], prev[rows])
            cur[rows] = _keep(live, new, cur[rows])
            if g is not None:
                grad[rows] = _keep(live, g, grad[rows])
            if track_success:
                st = None if success_target is None else success_target[rows]
                hit = _and(self.is_success(logits, y[rows], st), live)
                x_found[rows] = torch.where(_view(hit, new), new, x_found[rows])
                found[rows] |= hit
                alive[rows] &= ~hit
                if siblings is not None:
                    stop_siblings(alive, siblings, torch.zeros_like(alive).index_put_((rows,), hit))
            better = _and(loss > loss_best[rows], live)
            x_best[rows] = torch.where(_view(better, new), new, x_best[rows])
            if g is not None:
                grad_best[rows] = torch.where(_view(better, g), g, grad_best[rows])
            loss_best[rows] = _keep(live, torch.maximum(loss_best[rows], loss), loss_best[rows])
            n_incr[rows] = _keep(live, n_incr[rows] + (loss > loss_prev[rows]).float(), n_incr[rows])
            loss_prev[rows] = _keep(live, loss, loss_prev[rows])

            if i + 1 not in marks:
                continue
            window, last_mark = i + 1 - last_mark, i + 1
            if l1:
                sparsity = _l0(x_best[rows] - x[rows])
                fewer = sparsity / sp_old[rows] < 0.95
                topk[rows] = _keep(live, sparsity / n_fts / 1.5, topk[rows])
                full = eps  # the L1 initial step
                size[rows] = _keep(live, torch.where(
                    fewer, torch.full_like(sparsity, full), size[rows] / 1.5
                ).clamp(full / 10, full), size[rows])
                sp_old[rows] = _keep(live, sparsity, sp_old[rows])
                back = _and(fewer, live)
            else:
                oscillating = n_incr[rows] <= window * self.rho
                stalled = ~reduced_last[rows] & (loss_best_last[rows] >= loss_best[rows])
                reduce = oscillating | stalled
                reduced_last[rows] = _keep(live, reduce, reduced_last[rows])
                loss_best_last[rows] = _keep(live, loss_best[rows], loss_best_last[rows])
                n_incr[rows] = _keep(live, torch.zeros_like(n_incr[rows]), n_incr[rows])
                back = _and(reduce, live)
                size[rows] = torch.where(back, size[rows] / 2, size[rows])
            cur[rows] = torch.where(_view(back, cur), x_best[rows], cur[rows])
            grad[rows] = torch.where(_view(back, grad), grad_best[rows], grad[rows])
        return _Run(found=found, x_found=x_found, x_best=x_best, loss_best=loss_best)


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGD):
    """Auto-PGD with the Difference of Logits Ratio loss (AutoAttack's APGD-DLR; >= 3 classes)."""

    name = "apgd-dlr"
    default_loss = "dlr"


@ATTACKS.register("apgd-t", aliases=("apgd-dlr-t",))
class APGDT(TargetClasses, APGD):
    """Targeted Auto-PGD on the targeted DLR loss (AutoAttack's APGD-T; >= 4 classes).

    Without a ``target`` it runs once per target class (``restarts`` runs each), for the
    2nd, 3rd, ... most likely classes at the clean point, on the samples still robust; any
    misclassification counts as success, as in AutoAttack. ``n_target_classes`` defaults to
    ``min(9, C - 1)`` for a ``C``-class model. With a ``target`` it attacks that class and
    success means predicting it.
    """

    name = "apgd-t"
    default_loss = "dlr"

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
            return super().perturb(forward, x, y, target, generator)
        with torch.no_grad():
            clean = forward(x)
        self.check_classes(clean.shape[1], targeted=True)
        batch = _Batch(x)
        for group in target_groups(self.target_classes(clean), lambda: len(batch.todo()), budget or len(x)):
            for _ in range(self.restarts):
                rows = batch.todo()
                if not len(rows):
                    return batch.result()
                packed, towards = pack(rows, group)
                owner = packed if len(group) > 1 else None  # without early_stop: frozen, still computed
                run = self.attack_once(forward, x[packed], y[packed], towards, None, generator, owner)
                for part in range(len(group)):  # in target order: the first to break a point keeps it
                    batch.merge(rows, run.part(part, len(rows)))
        return batch.result()
