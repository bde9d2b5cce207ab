"""Square Attack (Andriushchenko et al., ECCV 2020, arXiv 1912.00049), Linf and L2.

A score-based attack: it only reads the model's logits (forward passes under ``no_grad``).
Each iteration changes the current best point inside one random square window and keeps the
change when the loss improves. It follows AutoAttack's ``SquareAttack``
(``autoattack/square.py``):

* loss: the margin (``cw``, maximized; untargeted: best other logit minus the true one;
  targeted: the target's logit minus the best other one); any loss of :mod:`attacks.losses`
  can be chosen. A point counts as broken as soon as its margin is >= 0 and stops there;
* initialisation: Linf, vertical stripes ``x ± eps`` (one random sign per channel and
  column); L2, a 5x5 grid of centred-square patterns (:func:`centred_squares`) with random
  signs per channel, rescaled to norm eps;
* window side ``s = round(sqrt(p·H·W))`` with ``p`` from :func:`p_selection`: ``p_init``
  halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 iterations, the iteration
  count rescaled to a budget of 10,000 (``rescale_schedule``; AutoAttack's standard
  ensemble runs 5,000 queries with ``rescale_schedule=False``);
* Linf step: the window of every channel is moved to ``±eps`` (a random sign per channel);
  L2 step: the mass of a second window is moved into the first one, which gets the
  centred-square pattern plus its old content, so the norm stays eps.

Differences from the reference, none of which changes the distribution of one image's run:
the windows, signs and transpositions are drawn per image (the reference shares them across
the batch; the paper draws them per image), from the attack's own ``generator``, and they
are drawn for the whole batch at every iteration, so an image's result does not depend on
which other images are still being attacked.

Query counting (``AttackResult.queries``), as the reference: one query for the initial point,
plus one per iteration while the point is not yet broken. A point broken by its initial point
costs 1; a point that survives costs ``n_queries + 1`` per restart (summed over restarts, which
run only on points still robust). Points misclassified before the attack cost 0 (the base class
skips them). With ``early_stop`` (the default) broken points leave the batch; without it they
are still evaluated, but neither updated nor counted, so the result is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .losses import cw_loss, get_loss

# (iteration bound, divisor of p_init) pairs: p = p_init / divisor while it <= bound
P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """Fraction of the image a window covers at iteration ``it`` (the reference's schedule)."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, divisor in P_SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def centred_squares(rows: int, cols: int) -> torch.Tensor:
    """Nested centred squares: cell value sum_{k >= ring} 1/(k+1)^2, ``ring`` its Chebyshev
    distance to the centre; unit L2 norm (the reference's ``eta_rectangles``)."""
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    ring = torch.maximum((i - rows // 2).abs(), (j - cols // 2).abs())
    weights = 1.0 / torch.arange(1, max(rows // 2, cols // 2) + 2, dtype=torch.float) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum of weights[d:]
    pattern = tail[ring]
    return pattern / pattern.norm().clamp_min(1e-12)


def eta(s: int) -> torch.Tensor:
    """The L2 window pattern: centred squares on the top half, their negative on the bottom half."""
    pattern = torch.cat([centred_squares(s // 2, s), -centred_squares(s - s // 2, s)])
    return pattern / pattern.norm().clamp_min(1e-12)


@lru_cache(maxsize=64)
def _patterns(s: int) -> torch.Tensor:
    """``eta(s)`` and its transpose, stacked (2, s, s); cached, so never modified in place."""
    pattern = eta(s)
    return torch.stack([pattern, pattern.T])


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _window_masks(h: int, w: int, s: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Boolean masks (N, 1, H, W) of the s x s windows with corners ``(top, left)``."""
    r = torch.arange(h, device=top.device)
    c = torch.arange(w, device=top.device)
    in_rows = (r[None] >= top[:, None]) & (r[None] < top[:, None] + s)
    in_cols = (c[None] >= left[:, None]) & (c[None] < left[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


@dataclass
class _Run:
    x_best: torch.Tensor
    found: torch.Tensor
    loss: torch.Tensor
    queries: torch.Tensor


@ATTACKS.register("square")
class Square(Attack):
    """Square Attack, as AutoAttack's ``SquareAttack``: ``n_queries`` iterations per restart
    (default 5000), ``p_init`` 0.8, margin loss, per-sample early stop and query counts
    (see the module docstring)."""

    name = "square"
    supported_norms = ("linf", "l2")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        loss: str = "cw",
        rescale_schedule: bool = True,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if n_queries < 1 or restarts < 1:
            raise UsageError(
                f"{self.name} needs n_queries >= 1 and restarts >= 1, got n_queries={n_queries}, restarts={restarts}."
            )
        if not 0 < p_init <= 1:
            raise UsageError(f"{self.name} needs 0 < p_init <= 1, got {p_init}.")
        self.n_queries = n_queries
        self.p_init = p_init
        self.restarts = restarts
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        self.rescale_schedule = rescale_schedule

    def config(self) -> dict[str, Any]:
        return {
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "restarts": self.restarts,
            "loss": self.loss_name,
            "rescale_schedule": self.rescale_schedule,
        }

    def window_size(self, it: int, h: int, w: int) -> int:
        """Side of the square window at iteration ``it`` (odd and >= 3 for L2, as the reference)."""
        s = round(math.sqrt(self.p_selection(it) * h * w))
        if self.threat.norm == "l2":
            s = max(s, 3)
            s += 1 - s % 2
        return min(max(s, 1), h, w)

    def p_selection(self, it: int) -> float:
        return p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)

    # -- the attack ----------------------------------------------------------------------
    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        if x.dim() != 4:
            raise UsageError(f"{self.name} needs images (N, C, H, W), got shape {tuple(x.shape)}.")
        x_adv = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        loss = torch.full((len(x),), float("-inf"), device=x.device)
        queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
        with torch.no_grad():
            for _ in range(self.restarts):
                rows = (~found).nonzero().flatten()
                if not len(rows):
                    break
                run = self.run(forward, x[rows], y[rows], None if target is None else target[rows], generator)
                keep = run.found | (run.loss > loss[rows])
                x_adv[rows[keep]] = run.x_best[keep]
                found[rows] = run.found
                loss[rows] = torch.maximum(loss[rows], run.loss)
                queries[rows] += run.queries
        return AttackResult(x_adv=x_adv, success=found, queries=queries, loss=loss)

    def run(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> _Run:
        """One run of ``n_queries`` iterations from the reference's initial point."""
        n = len(x)
        x_best = self.threat.clip(x + self.init_delta(x, generator), x)
        logits = forward(x_best)
        margin = cw_loss(logits, y, target)  # >= 0: broken
        loss_best = self.loss_fn(logits, y, target)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        alive = margin < 0
        everyone = torch.arange(n, device=x.device)
        for it in range(self.n_queries):
            if not alive.any():
                break
            x_new_all = self.propose(x, x_best, it, generator)  # drawn for all n: see the module doc
            rows = alive.nonzero().flatten() if self.early_stop else everyone
            logits = forward(x_new_all[rows])
            margin_new = cw_loss(logits, y[rows], None if target is None else target[rows])
            loss_new = self.loss_fn(logits, y[rows], None if target is None else target[rows])
            active = alive[rows]
            improved = active & (loss_new > loss_best[rows])
            accept = improved | (active & (margin_new >= 0))
            loss_best[rows[improved]] = loss_new[improved]
            margin[rows[accept]] = margin_new[accept]
            x_best[rows[accept]] = x_new_all[rows[accept]]
            queries[rows[active]] += 1
            alive = margin < 0
        return _Run(x_best=x_best, found=~alive, loss=loss_best, queries=queries)

    def init_delta(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The reference's initial perturbation (before the clip to the threat set)."""
        n, c, h, w = x.shape
        eps = self.threat.eps
        if self.threat.norm == "linf":
            return eps * self._signs((n, c, 1, w), generator, x)
        s = max(min(h, w) // 5, 1)
        patterns = _patterns(s).to(x)
        delta = torch.zeros_like(x)
        for top in range((h - 5 * s) // 2, h - s + 1, s):
            for left in range((w - 5 * s) // 2, w - s + 1, s):
                flip = torch.randint(0, 2, (n,), generator=generator, device=x.device)
                delta[:, :, top : top + s, left : left + s] += (
                    patterns[flip][:, None] * self._signs((n, c, 1, 1), generator, x)
                )
        return eps * delta / _view(delta.flatten(1).norm(dim=1).clamp_min(1e-12))

    def propose(self, x: torch.Tensor, x_best: torch.Tensor, it: int, generator: torch.Generator) -> torch.Tensor:
        """The candidate of iteration ``it`` for every point (random windows drawn per image)."""
        n, c, h, w = x.shape
        eps = self.threat.eps
        s = self.window_size(it, h, w)
        mask = self._random_windows(n, h, w, s, generator, x.device)
        if self.threat.norm == "linf":
            step = 2 * eps * self._signs((n, c, 1, 1), generator, x)
            return self.threat.clip(x_best + mask * step, x)

        mask2 = self._random_windows(n, h, w, s, generator, x.device)
        flip = torch.randint(0, 2, (n,), generator=generator, device=x.device)
        signs = self._signs((n, c, 1, 1), generator, x)
        delta = x_best - x
        full = mask.expand_as(delta)
        old = delta.masked_select(full).view(n, c, s, s)
        norm_old = old.flatten(2).norm(dim=2)[:, :, None, None]
        norm_img = _view(delta.flatten(1).norm(dim=1))
        norm_windows = (delta * (mask | mask2)).flatten(2).norm(dim=2)[:, :, None, None]
        new = _patterns(s).to(x)[flip][:, None] * signs + old / (norm_old + 1e-12)
        # the windows get back their own mass plus their share of the budget left unused
        size = ((eps**2 - norm_img**2).clamp_min(0) / c + norm_windows**2).sqrt()
        new = new / (new.flatten(2).norm(dim=2)[:, :, None, None] + 1e-12) * size
        delta = delta.masked_fill(mask2, 0.0).masked_scatter(full, new)
        delta = eps * delta / _view(delta.flatten(1).norm(dim=1) + 1e-12)
        return self.threat.clip(x + delta, x)

    @staticmethod
    def _signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)

    @staticmethod
    def _random_windows(
        n: int, h: int, w: int, s: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        # corners in [0, H - s) as the reference's random_int (0 when the window fills the image)
        top = torch.randint(0, max(h - s, 1), (n,), generator=generator, device=device)
        left = torch.randint(0, max(w - s, 1), (n,), generator=generator, device=device)
        return _window_masks(h, w, s, top, left)
