"""Target-class handling shared by the targeted cascades (APGD-T, FAB-T)."""

from __future__ import annotations

from typing import Any

import torch

from robustkit.errors import UsageError
from robustkit.threat import ThreatModel


class TargetClasses:
    """Mixin: ``n_target_classes`` (default ``min(9, C - 1)``, never a hard-coded count) for an
    attack that runs once per target class, the most likely wrong classes first."""

    name: str

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
