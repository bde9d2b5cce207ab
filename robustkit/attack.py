"""The Attack base class: the contract every attack keeps, implemented once.

A subclass implements ``perturb`` for a batch of points still to be attacked. The base class
validates inputs, puts the model in eval mode and restores it, freezes parameters so no
gradient reaches them, seeds the attack's own ``torch.Generator``, skips points that are
already misclassified, applies the final projection and clamp and measures success on the
returned points. ``early_stop`` lets iterative attacks drop points once broken (same result,
less compute).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import DataError, UsageError
from .threat import ThreatModel


@dataclass
class AttackResult:
    """Adversarial points and per-sample outcome (``success``: misclassified / hit target)."""

    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    stages: dict[str, torch.Tensor] | None = None  # a cascade's cumulative success after each stage
    distance: torch.Tensor | None = None  # minimum-norm attacks: norm of x_adv - x where success, else inf

    @property
    def robust_accuracy(self) -> float:
        return float((~self.success).float().mean()) if len(self.success) else float("nan")


class Forward:
    """Calls the model the way an attack should: optional autocast and channels_last, fp32 logits."""

    def __init__(self, model: nn.Module, autocast: str | None = None, channels_last: bool = False):
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]
            with torch.autocast(x.device.type, dtype=dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return logits_of(out).float()


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a tuple's first element or a dict's
    ``logits`` (models with auxiliary outputs; the sanity checks warn when this is used)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    raise UsageError(f"The model returned {type(out).__name__}; robustkit needs a model that returns a logits "
                     "tensor (or a tuple whose first element, or a dict whose 'logits', is one).")


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack; both restored after."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise a clear error for inputs an attack cannot use."""
    if not torch.is_floating_point(x) or x.dim() < 2:
        raise DataError(
            f"Inputs must be a float tensor of shape (N, C, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}."
        )
    if y.shape != (x.shape[0],):
        raise DataError(f"Labels must have shape ({x.shape[0]},) to match the inputs, got {tuple(y.shape)}.")
    if not torch.isfinite(x).all():
        raise DataError("Inputs contain NaN or infinite values.")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DataError(f"Inputs must lie in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}].")


class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`perturb`."""

    name: ClassVar[str] = "attack"
    supported_norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    supports_targeted: ClassVar[bool] = True
    # perturb takes ``budget=``: how many rows it may run at once (target classes packed,
    # Square's lookahead); AutoAttack passes its batch size, so robust leftovers fill the batch
    takes_budget: ClassVar[bool] = False

    def __init__(
        self,
        threat: ThreatModel,
        *,
        seed: int = 0,
        early_stop: bool = True,
        autocast: str | None = None,
        channels_last: bool = False,
    ):
        if threat.norm not in self.supported_norms:
            raise UsageError(f"{self.name} supports the norms {', '.join(self.supported_norms)}, not {threat.norm}.")
        if autocast not in (None, "bf16", "fp16"):
            raise UsageError(f"autocast must be bf16 or fp16, got {autocast!r}.")
        self.threat = threat
        self.seed = seed
        self.early_stop = early_stop
        self.autocast = autocast
        self.channels_last = channels_last

    # -- to implement -------------------------------------------------------------------
    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> AttackResult:
        """Attack the points ``x`` (all still correctly classified when early_stop is on)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Hyper-parameters that define this attack (stored with results)."""
        return {}

    def stage_names(self) -> list[str]:
        """The stages of a cascade (AutoAttack), whose per-stage results are reported; [] for one attack."""
        return []

    # -- the contract -------------------------------------------------------------------
    def is_success(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == target if target is not None else pred != y

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None
    ) -> AttackResult:
        check_batch(x, y)
        if target is not None and not self.supports_targeted:
            raise UsageError(f"{self.name} is untargeted; it does not take a target.")
        y = y.to(x.device)
        target = target.to(x.device) if target is not None else None
        x = x.detach()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        forward = Forward(model, self.autocast, self.channels_last)
        with attack_mode(model):
            with torch.no_grad():
                done = self.is_success(forward(x), y, target)
            todo = (~done).nonzero().flatten()  # already-broken points keep x: they count as broken
            x_adv = x.clone()
            queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
            loss = None
            stages = None
            if len(todo):
                aim = None if target is None else target[todo]
                budget = {"budget": len(x)} if self.takes_budget else {}  # the points skipped leave room
                sub = self.perturb(forward, x[todo], y[todo], aim, generator, **budget)
                x_adv[todo] = self.threat.clip(sub.x_adv.detach(), x[todo])
                if sub.queries is not None:
                    queries[todo] = sub.queries
                if sub.loss is not None:
                    loss = torch.full((len(x),), float("nan"), device=x.device)
                    loss[todo] = sub.loss.float()
                if sub.stages is not None:
                    stages = {name: done.clone().index_put_((todo,), hit) for name, hit in sub.stages.items()}
            with torch.no_grad():
                success = self.is_success(forward(x_adv), y, target)
        return AttackResult(x_adv=x_adv, success=success, queries=queries, loss=loss, stages=stages)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({self.threat.describe()}{', ' if cfg else ''}{cfg})"
