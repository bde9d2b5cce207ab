"""Target-class handling shared by the targeted cascades (APGD-T, FAB-T).

Packing: once some points are broken, the target classes still to run are attacked several
at a time, one row per (point, target class), so the rows in flight stay close to the batch
the attack was given (``budget``, in AutoAttack the cascade's batch) and never exceed it. A
small batch of robust points runs at a poor per-image cost, so on the robust points that
dominate an AutoAttack evaluation this is cheaper than one small batch per target class. Each
row's run does not depend on the others; a point broken by one of its rows stops all of them
(APGD-T without ``early_stop``: freezes them, still computed), so every target class still
runs only on points not yet broken, and the class that breaks a point first keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from robustkit.errors import UsageError
from robustkit.threat import ThreatModel


class TargetClasses:
    """Mixin: ``n_target_classes`` (default ``min(9, C - 1)``, never a hard-coded count) for an
    attack that runs once per target class, the most likely wrong classes first."""

    name: str
    takes_budget = True

    def __init__(self, threat: ThreatModel, *, n_target_classes: int | None = None, **kwargs: Any):
        super().__init__(threat, **kwargs)  # type: ignore[call-arg]
        if n_target_classes is not None and n_target_classes < 1:
            raise UsageError(f"{self.name} needs n_target_classes >= 1, got {n_target_classes}.")
        self.n_target_classes = n_target_classes

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_target_classes": self.n_target_classes}  # type: ignore[misc]

    def target_count(self, num_classes: int) -> int:
        """How many target classes a ``num_classes``-class model gets."""
        if self.n_target_classes is None:
            return min(9, num_classes - 1)
        if self.n_target_classes > num_classes - 1:
            raise UsageError(
                f"{self.name}: n_target_classes={self.n_target_classes} but a {num_classes}-class "
                f"model has only {num_classes - 1} classes other than the true one."
            )
        return self.n_target_classes

    def target_classes(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The target of each run: the 2nd, 3rd, ... most likely classes of ``logits``."""
        ranked = logits.sort(1).indices  # ascending, as the reference
        return [ranked[:, -rank] for rank in range(2, self.target_count(logits.shape[1]) + 2)]


def target_groups(targets: list[torch.Tensor], pending: Callable[[], int], budget: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of ``targets`` to attack together: as many target classes as keep
    ``pending()`` (the points still robust when the group starts) times the group within
    ``budget`` rows, at least one. Stops when no point is pending."""
    i = 0
    while i < len(targets):
        points = pending()
        if not points:
            return
        size = max(1, budget // points)
        yield targets[i : i + size]
        i += size


def pack(rows: torch.Tensor, group: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per (point, target class): the points' indices repeated per target (also the
    owner of each row, to stop a broken point's siblings) and each row's target class."""
    return rows.repeat(len(group)), torch.cat([t[rows] for t in group])


class Siblings:
    """The rows that share an owner (the rows :func:`pack` makes for one point), worked out on
    the device once per run, so that stopping a broken point's rows each iteration needs no
    host synchronization."""

    def __init__(self, owner: torch.Tensor):
        ordered, self.order = owner.sort(stable=True)
        self.first = torch.searchsorted(ordered, ordered, side="left")  # its owner's rows, in sorted order
        self.end = torch.searchsorted(ordered, ordered, side="right")
        self.rank = torch.empty_like(self.order).scatter_(0, self.order, torch.arange(len(owner), device=owner.device))

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Per row: whether some row of the same owner is set in ``mask`` (a bool per row)."""
        counts = torch.cat([mask.new_zeros(1, dtype=torch.long), mask[self.order].long().cumsum(0)])
        return (counts[self.end] > counts[self.first])[self.rank]


def stop_siblings(alive: torch.Tensor, siblings: Siblings | None, broken: torch.Tensor) -> None:
    """Stop every row whose point has a row set in ``broken`` (a bool per row); in place."""
    if siblings is not None:
        alive &= ~siblings.any(broken)
