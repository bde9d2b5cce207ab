"""The Attack base class: the contract every attack keeps, implemented once.

A subclass implements ``perturb`` for a batch of points still to be attacked. The base class
validates inputs, puts the model in eval mode and restores it, freezes parameters so no
gradient reaches them, seeds the attack's own ``torch.Generator``, skips points that are
already misclassified, applies the final projection and clamp and measures success on the
returned points. ``early_stop`` lets iterative attacks drop points once broken (same result,
less compute). Verdicts (already broken, success) are always taken on fp32 logits, whatever
precision the attack runs in (see :class:`Forward` for mixed precision); a point that an attack
under autocast stopped at as broken, which fp32 does not confirm, is attacked again in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from robustkit.errors import DataError, UsageError
from robustkit.threat import ThreatModel

# -- progress, for displays ---------------------------------------------------------------------
# listener(event, attack, n): "start" (an attack begins on n points; nested attacks, such as a
# transfer attack's inner one, too), "end" (it returned), "stage" (a cascade's next stage, the
# stage's attack), "call" (one model call through Forward on n rows). Host-side only: no event
# reads a tensor, so watching an attack adds no device synchronization.
Listener = Callable[[str, Any, int], None]
_listeners: list[Listener] = []


def _tell(event: str, attack: Any, n: int) -> None:
    for listener in _listeners:
        listener(event, attack, n)


def tell_stage(attack: Any, n: int) -> None:
    """A cascade starts its next stage, ``attack``, on ``n`` points (for progress displays)."""
    if _listeners:
        _tell("stage", attack, n)


@contextlib.contextmanager
def watch(listener: Listener) -> Iterator[None]:
    """Call ``listener(event, attack, n)`` while attacks run (see above), e.g. to move a progress
    bar per attack step rather than per batch."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


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
    """Calls the model the way an attack should: optional autocast and channels_last, fp32 logits.

    Under fp16 autocast (this Forward's own, or one active around it, as in a training step)
    input gradients are taken with dynamic loss scaling, as GradScaler does for weights: the
    gradient of the loss with respect to the fp32 logits is exact, and it is carried back through
    the half-precision model scaled per row so that its largest entry is ``2**HALF_TARGET_EXP``,
    then unscaled in fp32. (Unscaled, a confidently classified point's cross-entropy gradient,
    1e-8 or less, flushes to zero in fp16 and ``sign(0)`` never moves it.) Rows that overflow are
    retried with a smaller scale, rows that come back all zero with a larger one; rows still
    non-finite or zero after that are recomputed in fp32. With a BatchNorm in train mode (batch
    statistics couple the rows) rows are scaled in bands instead, one scale and one backward pass
    per band, which is exact for coupled rows too. Callers need nothing special:
    ``torch.autograd.grad(loss, x)`` through the logits returned gives the scaled-and-unscaled
    gradient. This applies when no parameter of the model requires a gradient (inside
    :func:`attack_mode` or :func:`frozen_parameters`); otherwise the logits come back as autograd
    builds them. Success is judged on :meth:`fp32` logits.
    """

    def __init__(self, model: nn.Module, autocast: str | None = None, channels_last: bool = False):
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last

    def dtype(self, device_type: str) -> torch.dtype | None:
        """The half type the model runs in on ``device_type`` (None: fp32)."""
        if self.autocast:
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]
        return autocast_dtype(device_type)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model under this Forward's autocast, fp32 logits, with no loss scaling."""
        if _listeners:  # a display counts the attack's model calls (a host-side int, no sync)
            _tell("call", None, len(x))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast:
            with torch.autocast(x.device.type, dtype=self.dtype(x.device.type)):
                out = self.model(x)
        else:
            out = self.model(x)
        return logits_of(out).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.requires_grad and torch.is_grad_enabled() and self.dtype(x.device.type) == torch.float16
                and not any(p.requires_grad for p in self.model.parameters())):
            return _ScaledBackward.apply(x, self)
        return self.logits(x)

    def fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own logits, without autocast or channels_last: what success is judged on
        (the logits evaluation predicts with)."""
        with _without_autocast(x.device.type):
            return logits_of(self.model(x)).float()


# fp16 input gradients (Forward): a row's largest |dloss/dlogit| is scaled to 2**HALF_TARGET_EXP;
# coupled rows share one scale per band of 2**HALF_BAND_BITS; a retry moves the scale by
# 2**HALF_STEP_EXP, at most HALF_RETRIES times, before the row is recomputed in fp32.
HALF_TARGET_EXP = 8
HALF_BAND_BITS = 16
HALF_STEP_EXP = 6
HALF_RETRIES = 4


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast active here on ``device_type``; None when none is."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _ScaledBackward(torch.autograd.Function):
    """The fp32 logits of ``Forward.logits(x)``; backward takes the input gradient with dynamic
    loss scaling through the model's own graph (kept for repeated backward passes, FAB's Jacobian)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward: Forward) -> torch.Tensor:  # type: ignore[override]
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            logits = forward.logits(xd)
        coupled = any(isinstance(m, _BatchNorm) and m.training for m in forward.model.modules())
        ctx.inner = (forward, xd, logits, coupled)
        return logits.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        forward, xd, logits, coupled = ctx.inner
        with torch.enable_grad():
            return scaled_input_grad(forward.model, xd, logits, grad_logits, coupled=coupled), None


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _unscale(grad: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """``grad * 2**-exp`` per row in ``grad``'s dtype, in two exact power-of-two factors (one
    factor would underflow fp32 for the tiny gradients of confident points)."""
    half = torch.floor(exp / 2)
    return grad * _view(torch.exp2(-half).to(grad.dtype), grad) * _view(torch.exp2(half - exp).to(grad.dtype), grad)


def scaled_input_grad(
    model: nn.Module, x: torch.Tensor, logits: torch.Tensor, grad_logits: torch.Tensor, *, coupled: bool = False
) -> torch.Tensor:
    """``d(logits)/dx`` transposed times ``grad_logits``, through the (half-precision) graph from
    ``x`` to ``logits``, with dynamic loss scaling per row (see :class:`Forward`). ``coupled``: rows
    interact in the graph (train-mode BatchNorm), so rows are scaled in bands, one scale each, and
    the bands' unscaled gradients add up (the backward pass is linear in ``grad_logits``)."""
    g = grad_logits.double()
    peak = g.flatten(1).abs().amax(1)
    live = (peak > 0) & torch.isfinite(peak)
    top = torch.frexp(torch.where(live, peak, 1.0))[1].double()  # peak in [2**(top-1), 2**top)
    redo = ~torch.isfinite(peak)  # a NaN or infinite loss gradient (fp16 logits overflowed)

    def vjp(scale: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(logits, x, (g * _view(scale, g)).float(), retain_graph=True)
        return grad

    if coupled:
        result = torch.zeros_like(x)
        bands = torch.div(top, HALF_BAND_BITS, rounding_mode="floor")
        biggest = float(peak[live].max()) if bool(live.any()) else 0.0
        for band in bands[live].unique().tolist():
            rows = live & (bands == band)
            if float(peak[rows].max()) * len(x) < 2.0**-24 * biggest:
                continue  # far below what the batch statistics carry from the largest rows to every row
            exp = HALF_TARGET_EXP - float(top[rows].max())  # the band's largest row at 2**HALF_TARGET_EXP
            for _ in range(HALF_RETRIES + 1):
                grad = vjp(rows * 2.0**exp)
                if bool(torch.isfinite(grad).all()):  # an overflow anywhere spoils every row
                    result += _unscale(grad, torch.full((len(x),), exp, dtype=torch.float64, device=x.device))
                    redo |= rows & (grad.flatten(1) == 0).all(1)
                    break
                exp -= HALF_STEP_EXP
            else:
                redo |= rows
    else:
        result = torch.zeros_like(x)
        exp = HALF_TARGET_EXP - top
        low = torch.full_like(exp, float("inf"))  # the smallest exponent seen to overflow, per row
        pending, raised = live.clone(), torch.zeros_like(exp)
        for attempt in range(HALF_RETRIES + 1):
            grad = vjp(torch.exp2(exp) * pending)
            flat = grad.flatten(1)
            finite, zero = torch.isfinite(flat).all(1), (flat == 0).all(1)
            up = pending & finite & zero & (exp + HALF_STEP_EXP < low) & (raised < 2) & (attempt < HALF_RETRIES)
            done = pending & finite & ~up
            result = torch.where(_view(done, x), _unscale(grad, exp), result)
            redo |= done & zero  # all zero in fp16 even scaled up: confirmed in fp32 below
            over = pending & ~finite
            low = torch.where(over, exp, low)
            exp = exp + HALF_STEP_EXP * (up.double() - over.double())
            raised += up.double()
            pending = over | up
            if not bool(pending.any()):
                break
        redo |= pending
    if bool(redo.any()):
        # rows fp16 could not give: recomputed in fp32 (rare; coupled rows: the whole batch, which in
        # train mode updates BatchNorm's running statistics once more; a random model draws again)
        idx = torch.arange(len(x), device=x.device) if coupled else redo.nonzero().flatten()
        with _without_autocast(x.device.type):
            xr = x[idx].detach().requires_grad_(True)
            (exact,) = torch.autograd.grad(logits_of(model(xr)).float(), xr, grad_logits[idx])
        if coupled:
            return exact
        result[idx] = exact
    return result


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
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires a gradient for the duration (restored after): only input
    gradients are taken, and :class:`Forward` may scale them."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack; both restored after."""
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            yield
    finally:
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
        if not math.isfinite(threat.eps) and not getattr(self, "minimum_norm", False):  # MinimumNorm's flag
            raise UsageError(f"{self.name} needs a finite eps; only the minimum-norm attacks (fmn, ddn, alma, cw, "
                             f"deepfool, fab) run without one.")
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

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "config" in cls.__dict__:
            cls.config = _records_precision(cls.__dict__["config"])  # type: ignore[method-assign]

    def config(self) -> dict[str, Any]:
        """Hyper-parameters that define this attack (stored with results). The precision is added
        to every attack's config: ``autocast`` when it is set (fp32 configs are unchanged)."""
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
        if self.channels_last:  # the weights too, once (in place; a no-op on later calls)
            model.to(memory_format=torch.channels_last)
        forward = Forward(model, self.autocast, self.channels_last)
        with attack_mode(model):
            with torch.no_grad():  # verdicts are fp32 (the logits evaluation predicts with)
                done = self.is_success(forward.fp32(x), y, target)
            todo = (~done).nonzero().flatten()  # already-broken points keep x: they count as broken
            x_adv = x.clone()
            queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
            loss = None
            stages = None
            if len(todo):
                aim = None if target is None else target[todo]
                budget = {"budget": len(x)} if self.takes_budget else {}  # the points skipped leave room
                if _listeners:
                    _tell("start", self, len(todo))
                try:
                    sub = self.perturb(forward, x[todo], y[todo], aim, generator, **budget)
                finally:
                    if _listeners:
                        _tell("end", self, len(todo))
                x_adv[todo] = self.threat.clip(sub.x_adv.detach(), x[todo])
                if sub.queries is not None:
                    queries[todo] = sub.queries
                if sub.loss is not None:
                    loss = torch.full((len(x),), float("nan"), device=x.device)
                    loss[todo] = sub.loss.float()
                if sub.stages is not None:
                    stages = {name: done.clone().index_put_((todo,), hit) for name, hit in sub.stages.items()}
            with torch.no_grad():
                success = self.is_success(forward.fp32(x_adv), y, target)
            if self.autocast and len(todo):
                # points the attack stopped at because half-precision logits called them broken,
                # which fp32 does not: attacked again in fp32, so precision costs no broken point
                false = todo[sub.success.to(x.device) & ~success[todo]]
                if len(false):
                    plain = copy.copy(self)
                    plain.autocast = None
                    again = plain(model, x[false], y[false], target=None if target is None else target[false])
                    x_adv[false], success[false] = again.x_adv, again.success
                    if again.queries is not None:
                        queries[false] += again.queries
        return AttackResult(x_adv=x_adv, success=success, queries=queries, loss=loss, stages=stages)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({self.threat.describe()}{', ' if cfg else ''}{cfg})"


def _records_precision(config: Any) -> Any:
    """``config`` with the attack's ``autocast`` added when set, so a mixed-precision result is
    never stored (or resumed) as the fp32 one."""
    if getattr(config, "records_precision", False):
        return config

    @functools.wraps(config)
    def with_precision(self: Attack) -> dict[str, Any]:
        cfg = config(self)
        autocast = getattr(self, "autocast", None)
        return {**cfg, "autocast": autocast} if autocast and "autocast" not in cfg else cfg

    with_precision.records_precision = True  # type: ignore[attr-defined]
    return with_precision


Attack.config = _records_precision(Attack.config)  # type: ignore[method-assign]
