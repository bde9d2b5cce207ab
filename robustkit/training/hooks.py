"""The training hook protocol: what the one training loop calls on a method. Training strategies
(:class:`~robustkit.defenses.adversarial_training.TrainingStrategy` and its subclasses) and
wrappers such as distillation's implement it; the loop reads nothing else."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from robustkit.defenses.adversarial_training import StepOutput


class TrainingHooks(Protocol):
    """A training method as the loop sees it."""

    name: str
    adversarial: bool  # whether the batch is made adversarial (held-out metrics and the CO detector)
    default_schedule: str  # the learning-rate schedule when --schedule is not given
    soft_targets: bool  # step() takes N×K soft targets (batches mixed with --mix)
    aux: nn.Module | None  # trained and checkpointed with the model (AUX_NAME.safetensors), or None
    aux_name: str

    def config(self) -> dict[str, Any]:
        """The method's options, stored in the sidecar and the metrics."""

    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        """Once, before training: architecture transforms in place; their replayable specs."""

    def set_eps(self, eps: float) -> None:
        """Per step: the training radius (eps warm-up)."""

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        """Per batch: the loss (to backpropagate), the logits and named loss parts."""

    def passes_per_image(self) -> float | None:
        """Forward/backward passes per image relative to standard training (--same-budget), or None."""
