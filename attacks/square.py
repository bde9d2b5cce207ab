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
  halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 iterations, as AutoAttack runs
  it (``rescale_schedule=False``, the default); ``rescale_schedule=True`` (the standalone
  reference ``SquareAttack``'s default) first rescales the iteration count to a budget of
  10,000, so the schedule runs its course within ``n_queries``;
* Linf step: the window of every channel is moved to ``±eps`` (a random sign per channel);
  L2 step: the mass of a second window is moved into the first one, which gets the
  centred-square pattern plus its old content, so the norm stays eps.

Differences from the reference, none of which changes the distribution of one image's run:
the windows, signs and transpositions are drawn per image (the reference shares them across
the batch; the paper draws them per image), for every (iteration, image) in a fixed order from
the run's own stream (seeded from the attack's ``generator``), so an image's result does not
depend on which other images are still being attacked, nor on how many proposals are
evaluated at once.

Lookahead: a proposal is built from the current best point and random draws that do not
depend on it, and most proposals are rejected (on robust points about 19 in 20), so the next
``lookahead`` proposals of a point are built from the same best point and evaluated in one
batch; the first accepted one is kept and the proposals after it are dropped and built again
from the new best point. As the draws do not depend on the evaluation order, every
point follows exactly the trajectory of the one-proposal-at-a-time loop (``lookahead=1``); only
the batching changes. A batch of a few robust points runs at a poor per-image cost, so this is
faster; the rows in flight stay within ``budget`` (default: the batch given; AutoAttack passes
its cascade's batch), and the dropped proposals are not counted as queries.

Query counting (``AttackResult.queries``), as the reference: one query for the initial point,
plus one per iteration while the point is not yet broken. A point broken by its initial point
costs 1; a point that survives costs ``n_queries + 1`` per restart (summed over restarts, which
run only on points still robust). Points misclassified before the attack cost 0 (the base class
skips them). With ``early_stop`` (the default) broken points leave the batch; without it they
are still evaluated (one proposal at a time), but neither updated nor counted, so the result
is the same.
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


def _window_masks(h: int, w: int, s: int | torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Boolean masks (N, 1, H, W) of the s x s windows with corners ``(top, left)`` (``s`` one
    size or one per window)."""
    r = torch.arange(h, device=top.device)
    c = torch.arange(w, device=top.device)
    size = s[:, None] if isinstance(s, torch.Tensor) else s
    in_rows = (r[None] >= top[:, None]) & (r[None] < top[:, None] + size)
    in_cols = (c[None] >= left[:, None]) & (c[None] < left[:, None] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


@dataclass
class _Draws:
    """Per-row random draws of a proposal: window side and corner, a sign per channel and, for
    L2, the second window and the pattern's transposition."""

    side: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    signs: torch.Tensor  # (N, C), +-1
    top2: torch.Tensor | None = None
    left2: torch.Tensor | None = None
    flip: torch.Tensor | None = None

    def subset(self, keep: torch.Tensor) -> _Draws:
        return _Draws(*[None if v is None else v[keep] for v in vars(self).values()])


class _DrawTable:
    """The draws of every (iteration, image) of one run, made chunk by chunk in one fixed order
    from the run's own generator, so they do not depend on which pairs are evaluated when."""

    CHUNK = 256

    def __init__(self, attack: Square, x: torch.Tensor, generator: torch.Generator):
        self.attack, self.generator = attack, generator
        self.n, self.c, self.h, self.w = x.shape
        self.device, self.dtype = x.device, x.dtype
        self.l2 = attack.threat.norm == "l2"
        self.side = torch.zeros(0, dtype=torch.long, device=self.device)  # per iteration
        self.columns: dict[str, torch.Tensor] = {}  # per (iteration, image), small integer types
        self.made = 0  # iterations drawn so far

    def extend(self) -> None:
        iterations = range(self.made, self.made + self.CHUNK)
        side = torch.tensor([self.attack.window_size(i, self.h, self.w) for i in iterations], device=self.device)
        new = {}

        def corner(room: torch.Tensor) -> torch.Tensor:  # in [0, room), as the reference's random_int
            u = torch.rand(self.CHUNK, self.n, generator=self.generator, device=self.device)
            return (u * room[:, None]).long().clamp_max(room[:, None] - 1).to(torch.int32)

        rows, cols = (self.h - side).clamp_min(1), (self.w - side).clamp_min(1)  # 0 when the window fills
        new["top"], new["left"] = corner(rows), corner(cols)
        if self.l2:
            new["top2"], new["left2"] = corner(rows), corner(cols)
            new["flip"] = torch.randint(0, 2, (self.CHUNK, self.n), generator=self.generator, device=self.device,
                                        dtype=torch.int8)
        bits = torch.randint(0, 2, (self.CHUNK, self.n, self.c), generator=self.generator, device=self.device)
        new["signs"] = (2 * bits - 1).to(torch.int8)
        self.columns = {k: torch.cat([self.columns[k], v]) if self.columns else v for k, v in new.items()}
        self.side = torch.cat([self.side, side])
        self.made += self.CHUNK

    def pick(self, t: torch.Tensor, image: torch.Tensor, t_max: int | None = None) -> _Draws:
        """The draws of iteration ``t[i]`` for image ``image[i]``, one row per pair; ``t_max``:
        a bound on ``t`` known to the caller (saves a host synchronization)."""
        while self.made <= (int(t.max()) if t_max is None else t_max):
            self.extend()
        got = {k: v[t, image].long() for k, v in self.columns.items()}
        got["signs"] = got["signs"].to(self.dtype)
        return _Draws(side=self.side[t], **got)


@dataclass
class _Run:
    x_best: torch.Tensor
    found: torch.Tensor
    loss: torch.Tensor
    queries: torch.Tensor


@ATTACKS.register("square")
class Square(Attack):
    """Square Attack, as AutoAttack runs ``SquareAttack``: ``n_queries`` iterations per restart
    (default 5000), ``p_init`` 0.8, margin loss, per-sample early stop and query counts;
    ``lookahead`` proposals per point evaluated together (see the module docstring).

    ``rescale_schedule`` defaults to False, AutoAttack's setting, so Square alone and Square
    as a stage of AutoAttack are the same attack; True halves ``p`` at the same fractions of
    ``n_queries`` as of 10,000 queries (the standalone reference's default)."""

    name = "square"
    supported_norms = ("linf", "l2")
    takes_budget = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        loss: str = "cw",
        rescale_schedule: bool = False,
        lookahead: int = 8,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        if n_queries < 1 or restarts < 1 or lookahead < 1:
            raise UsageError(
                f"{self.name} needs n_queries, restarts and lookahead >= 1, got n_queries={n_queries}, "
                f"restarts={restarts}, lookahead={lookahead}."
            )
        if not 0 < p_init <= 1:
            raise UsageError(f"{self.name} needs 0 < p_init <= 1, got {p_init}.")
        self.n_queries = n_queries
        self.p_init = p_init
        self.restarts = restarts
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        self.rescale_schedule = rescale_schedule
        self.lookahead = lookahead

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
        budget: int | None = None,
    ) -> AttackResult:
        """``budget``: rows in flight with lookahead (default ``len(x)``)."""
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
                aim = None if target is None else target[rows]
                run = self.run(forward, x[rows], y[rows], aim, generator, budget or len(x))
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
        budget: int,
    ) -> _Run:
        """One run of ``n_queries`` iterations from the reference's initial point."""
        n, dev = len(x), x.device
        # the run's own stream: the draws it makes do not depend on lookahead or budget
        seed = int(torch.randint(2**62, (1,), generator=generator, device=dev))
        gen = torch.Generator(device=dev).manual_seed(seed)
        x_best = self.threat.clip(x + self.init_delta(x, gen), x)
        logits = forward(x_best)
        margin = cw_loss(logits, y, target)  # >= 0: broken
        loss_best = self.loss_fn(logits, y, target)
        queries = torch.ones(n, dtype=torch.long, device=dev)
        it = torch.zeros(n, dtype=torch.long, device=dev)  # each point's next iteration
        draws = _DrawTable(self, x, gen)
        everyone = torch.arange(n, device=dev)
        # Host-side bounds on the iteration of every point still attacked: each pass moves a point
        # on by 1 to ``depth`` iterations, so ``passes <= it <= bound``. They spare the host
        # synchronizations of looking at ``it``: one per pass (which points are still attacked)
        # and, only in the passes near the end of the budget, a second (which proposals exist).
        passes = bound = 0
        while True:
            todo = (margin < 0) & (it < self.n_queries)
            if self.early_stop:
                rows = todo.nonzero().flatten()
                if not len(rows):
                    break
                depth = max(1, min(self.lookahead, budget // len(rows)))
            else:  # every point, one proposal at a time; the broken ones are not updated
                if not todo.any():
                    break
                rows, depth = everyone, 1
            # (point, iteration) pairs, depth-major: proposal d of every point, then d + 1
            point = rows.repeat(depth)
            t = it[rows].repeat(depth) + torch.arange(depth, device=dev).repeat_interleave(len(rows))
            grid = torch.arange(len(point), device=dev).view(depth, len(rows))
            if bound + depth > self.n_queries:  # some proposals may lie past the budget
                valid = (t < self.n_queries).nonzero().flatten()
                point, t = point[valid], t[valid]
                grid = torch.full((depth, len(rows)), -1, dtype=torch.long, device=dev)
                grid.view(-1)[valid] = torch.arange(len(point), device=dev)
            t_max = min(bound + depth, self.n_queries) - 1
            # the window side does not grow with t: one side for all when the bounds agree
            side = self.window_size(min(passes, t_max), *x.shape[2:])
            one_side = side if side == self.window_size(t_max, *x.shape[2:]) else None
            candidates = self.propose(x[point], x_best[point], draws.pick(t, point, t_max), one_side)
            logits = forward(candidates)
            aim = None if target is None else target[point]
            margin_new = cw_loss(logits, y[point], aim)
            loss_new = margin_new if self.loss_name == "cw" else self.loss_fn(logits, y[point], aim)
            # per point, the first accepted proposal (its loss improves, or it breaks the point)
            pair = grid.clamp_min(0)
            improved = (loss_new[pair] > loss_best[rows]) & (grid >= 0)
            accept = (improved | (margin_new[pair] >= 0)) & (grid >= 0) & todo[rows]
            taken = accept.any(0)
            first = accept.float().argmax(0)
            used = torch.where(taken, first + 1, (grid >= 0).sum(0))
            queries[rows] += torch.where(todo[rows], used, 0)
            it[rows] += used
            cols = torch.arange(len(rows), device=dev)
            chosen = pair[first, cols]
            x_best[rows] = torch.where(_view(taken), candidates[chosen], x_best[rows])
            margin[rows] = torch.where(taken, margin_new[chosen], margin[rows])
            loss_best[rows] = torch.where(taken & improved[first, cols], loss_new[chosen], loss_best[rows])
            passes, bound = passes + 1, bound + depth
        return _Run(x_best=x_best, found=margin >= 0, loss=loss_best, queries=queries)

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

    def propose(self, x: torch.Tensor, x_best: torch.Tensor, draws: _Draws, side: int | None = None) -> torch.Tensor:
        """One proposal per row: ``x_best`` changed inside the row's window (``draws``, one row
        each); ``side``: the window side of every row, where the caller knows it is the same."""
        n, c, h, w = x.shape
        eps = self.threat.eps
        mask = _window_masks(h, w, draws.side, draws.top, draws.left)
        if self.threat.norm == "linf":  # the window moves to a vertex x ± eps (clipped to the box)
            return torch.where(mask, (x + eps * draws.signs[:, :, None, None]).clamp(0, 1), x_best)
        if side is not None:  # one side for all: no need to look
            return self.propose_l2(x, x_best, side, draws, mask)
        out = torch.empty_like(x)
        for s in draws.side.unique().tolist():  # the L2 step reshapes windows: one side at a time
            keep = (draws.side == s).nonzero().flatten()
            out[keep] = self.propose_l2(x[keep], x_best[keep], int(s), draws.subset(keep), mask[keep])
        return out

    def propose_l2(
        self, x: torch.Tensor, x_best: torch.Tensor, s: int, draws: _Draws, mask: torch.Tensor
    ) -> torch.Tensor:
        """The L2 proposal for windows of side ``s``: the mass of a second window moves into the
        first one, which gets the centred-square pattern plus its old content."""
        assert draws.top2 is not None and draws.left2 is not None and draws.flip is not None
        n, c, h, w = x.shape
        eps = self.threat.eps
        mask2 = _window_masks(h, w, s, draws.top2, draws.left2)
        signs = draws.signs[:, :, None, None]
        delta = x_best - x
        # the first window's content, (n, c, s, s), by index (no host synchronization)
        at = (
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            (draws.top[:, None] + torch.arange(s, device=x.device))[:, None, :, None],
            (draws.left[:, None] + torch.arange(s, device=x.device))[:, None, None, :],
        )
        old = delta[at]
        norm_old = old.flatten(2).norm(dim=2)[:, :, None, None]
        norm_img = _view(delta.flatten(1).norm(dim=1))
        norm_windows = (delta * (mask | mask2)).flatten(2).norm(dim=2)[:, :, None, None]
        new = _patterns(s).to(x)[draws.flip][:, None] * signs + old / (norm_old + 1e-12)
        # the windows get back their own mass plus their share of the budget left unused
        size = ((eps**2 - norm_img**2).clamp_min(0) / c + norm_windows**2).sqrt()
        new = new / (new.flatten(2).norm(dim=2)[:, :, None, None] + 1e-12) * size
        delta = delta.masked_fill(mask2, 0.0).index_put(at, new)
        delta = eps * delta / _view(delta.flatten(1).norm(dim=1) + 1e-12)
        return self.threat.clip(x + delta, x)

    @staticmethod
    def _signs(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
