"""The FGSM-AT "bag of tricks" against catastrophic overfitting (Li, Liu, Wang, Zhou and Xie,
"Bag of Tricks for FGSM Adversarial Training", arXiv:2209.02684; code announced at
github.com/UCSC-VLAA/Bag-of-Tricks-for-FGSM-AT).

What the paper states (abstract): FGSM-AT stops overfitting catastrophically with simple tricks
from three perspectives — a) *data initialization*: masking partial pixels, even without
randomness; b) *network structure*: a large convolution stride and smooth activation functions;
c) *optimization*: regularizing the weights of the first convolutional layer — alone or combined.

Provenance of the numbers below: the authors' repository holds only a README ("More info coming
soon!", commit c2d7cde114977fd34c577570a87d0ab79d4ee2fc), so no default could be read from their
code, and the paper body was not available to us. **Every numeric default here is ours**:
``mask_ratio=0.4``, ``stride=2``, ``activation="silu"``, ``reg_lambda=0.1`` (sum of ``|w|^p``),
``reg_p=2``; the choice of what exactly is masked (below) is ours too. The benchmark
``benchmarks/co_fgsm_tricks.py`` (MNIST, eps 0.3, ``mnist-cnn-a``) shows weight-reg at these
defaults preventing the catastrophic overfitting plain FGSM-AT suffers; the mask trick did not
prevent it there (MNIST is ~80% black background, so masking pixels changes little; the paper's
evidence is on CIFAR-10), see ``benchmarks/results/co_fgsm_tricks.md``.

The tricks come in two shapes:

* **options of the training strategy** (see ``defenses/adversarial_training.py``): ``mask``
  changes where the FGSM gradient is taken; ``weight-reg`` adds a penalty to the loss.
* **architecture transforms**, registered in ``DEFENSES`` with ``kind = "architecture"``:
  ``large-stride`` sets the stride of the first convolution, ``smooth-activation`` swaps ReLU for
  a smooth function. They are recorded in the trained model's sidecar and replayed on loading.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from robustkit.errors import UsageError
from robustkit.registry import DEFENSES

#: Trick names accepted by ``--trick`` (repeatable, combinable).
TRICKS = ("mask", "stride", "smooth-act", "weight-reg")
#: Activations accepted by the smooth-activation trick.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}
MASK_PATTERNS = ("random", "fixed")


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrickOptions:
    """Which tricks are on and their settings (all defaults ours; see the module docstring)."""

    tricks: tuple[str, ...] = ()
    mask_ratio: float = 0.4
    mask_pattern: str = "random"
    stride: int = 2
    activation: str = "silu"
    reg_lambda: float = 0.1
    reg_p: float = 2.0

    def __post_init__(self) -> None:
        tricks = tuple(dict.fromkeys(str(t).strip().lower() for t in self.tricks))
        for t in tricks:
            if t not in TRICKS:
                close = difflib.get_close_matches(t, TRICKS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"Unknown trick {t!r}.{hint} Accepted: {', '.join(TRICKS)}.")
        object.__setattr__(self, "tricks", tricks)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UsageError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio:g}.")
        if self.mask_pattern not in MASK_PATTERNS:
            raise UsageError(f"Unknown mask pattern {self.mask_pattern!r}; accepted: {', '.join(MASK_PATTERNS)}.")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise UsageError(f"The first-conv stride must be a positive integer, got {self.stride!r}.")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"Unknown activation {self.activation!r}; accepted: {', '.join(ACTIVATIONS)}.")
        if not (math.isfinite(self.reg_lambda) and self.reg_lambda >= 0):
            raise UsageError(f"--reg-lambda must be a non-negative number, got {self.reg_lambda:g}.")
        if not (math.isfinite(self.reg_p) and self.reg_p > 0):
            raise UsageError(f"--reg-p must be a positive number, got {self.reg_p:g}.")

    def has(self, trick: str) -> bool:
        return trick in self.tricks

    def architecture(self, input_size: tuple[int, ...]) -> list[dict[str, Any]]:
        """The architecture transforms these tricks ask for, as replayable specs (for the sidecar)."""
        specs: list[dict[str, Any]] = []
        if self.has("stride"):
            specs.append({"name": "large-stride", "stride": self.stride, "input_size": list(input_size)})
        if self.has("smooth-act"):
            specs.append({"name": "smooth-activation", "activation": self.activation})
        return specs


# -- trick: mask ------------------------------------------------------------------------


def pixel_mask(
    shape: tuple[int, ...] | torch.Size,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A {0, 1} mask over pixel positions (shared by the channels of a pixel) with a fraction
    ``ratio`` of zeros; shape ``(N, 1, H, W)`` for an ``(N, C, H, W)`` batch. Exactly
    ``round(ratio * H * W)`` pixels of each image are masked."""
    n, _, h, w = shape
    k = round(ratio * h * w)
    scores = torch.rand((n, h * w), generator=generator, device=device)
    mask = torch.ones((n, h * w), device=device)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1).indices, 0.0)
    return mask.view(n, 1, h, w)


class MaskInit:
    """The masking trick's data initialization: the FGSM gradient is taken at ``M ⊙ x0`` (the
    method's usual start ``x0`` with a fraction ``ratio`` of pixels set to 0), the FGSM step is
    taken from there, and the result is projected back into the threat set around ``x``.

    ``pattern="random"`` draws a new mask per batch from the training generator; ``"fixed"``
    draws one mask from ``seed`` and reuses it for every image and batch (the paper reports that
    masking works even without randomness).
    """

    def __init__(self, ratio: float, pattern: str = "random", seed: int = 0):
        self.ratio = ratio
        self.pattern = pattern
        self.seed = seed
        self._fixed: torch.Tensor | None = None

    def mask(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.pattern == "fixed":
            if self._fixed is None or self._fixed.shape[-2:] != x.shape[-2:] or self._fixed.device != x.device:
                g = torch.Generator(device=x.device).manual_seed(self.seed)
                self._fixed = pixel_mask((1, *x.shape[1:]), self.ratio, generator=g, device=x.device)
            return self._fixed.expand(len(x), 1, *x.shape[-2:])
        return pixel_mask(x.shape, self.ratio, generator=generator, device=x.device)

    def __call__(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x0 * self.mask(x0, generator)


# -- trick: weight-reg --------------------------------------------------------------------


def first_conv(model: nn.Module, sample: torch.Tensor | None = None) -> tuple[str, nn.Conv2d]:
    """``(name, module)`` of the first convolution the model applies to its input.

    With ``sample`` (one input batch), the first ``Conv2d`` executed in a forward pass (robust to
    module registration order); without, the first ``Conv2d`` registered.
    """
    convs = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise UsageError(f"{type(model).__name__} has no Conv2d layer; the stride and weight-reg tricks need one.")
    if sample is None:
        return next(iter(convs.values()))
    seen: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _a: seen.append(mod)) for _n, m in convs.values()]
    try:
        with torch.no_grad():
            _forward_shape_probe(model, sample)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return next(iter(convs.values()))
    return convs[id(seen[0])]


def _forward_shape_probe(model: nn.Module, sample: torch.Tensor) -> None:
    was = model.training
    model.eval()
    try:
        model(sample)
    finally:
        model.train(was)


def weight_penalty(conv: nn.Conv2d, p: float) -> torch.Tensor:
    """``sum |w|^p`` over the weights of ``conv`` (our form of the first-layer regularizer)."""
    return conv.weight.abs().pow(p).sum()


# -- architecture transforms ----------------------------------------------------------------


class _LinearMismatch(Exception):
    def __init__(self, module: nn.Linear, features: int):
        self.module, self.features = module, features


def _refit_linears(model: nn.Module, sample: torch.Tensor, max_fixes: int = 8) -> list[str]:
    """Replace Linear layers whose input width no longer fits (after a stride change) by fresh
    layers of the right width; returns their names. Needed for flatten-then-linear heads."""
    names = {id(m): n for n, m in model.named_modules()}
    fixed: list[str] = []
    for _ in range(max_fixes):

        def check(mod: nn.Module, args: tuple) -> None:
            if isinstance(mod, nn.Linear) and args and args[0].shape[-1] != mod.in_features:
                raise _LinearMismatch(mod, args[0].shape[-1])

        handles = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            with torch.no_grad():
                _forward_shape_probe(model, sample)
            return fixed
        except _LinearMismatch as e:
            old = e.module
            new = nn.Linear(e.features, old.out_features, bias=old.bias is not None)
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            name = names[id(old)]
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            names[id(new)] = name
            fixed.append(name)
        finally:
            for h in handles:
                h.remove()
    raise UsageError("The stride trick changed the feature size in a way the classifier cannot be refitted to.")


class ArchitectureTransform:
    """Base for registered model transforms (``kind = "architecture"``)."""

    kind: ClassVar[str] = "architecture"
    description: ClassVar[str] = ""

    def apply(self, model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError


@DEFENSES.register("large-stride")
@dataclass
class LargeStride(ArchitectureTransform):
    """Architecture trick for FGSM-AT: a larger stride in the first convolution (default 2, ours)."""

    description: ClassVar[str] = "FGSM-AT trick: larger stride in the first convolution (model transform)"
    stride: int = 2
    input_size: list[int] | None = None
    refitted: list[str] = field(default_factory=list)

    def apply(self, model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
        """Set the first convolution's stride in place; refit a flatten-linear head if the feature
        size changed (its weights are then fresh). ``sample`` (or ``input_size``) is one input."""
        if sample is None and self.input_size is not None:
            sample = torch.zeros(1, *self.input_size)
        if sample is not None:
            p = next(model.parameters(), None)
            sample = sample[:1].to(p.device if p is not None else "cpu")
            self.input_size = list(sample.shape[1:])
        _name, conv = first_conv(model, sample)
        conv.stride = (self.stride, self.stride)
        if sample is not None:
            self.refitted = _refit_linears(model, sample)
        return model

    def spec(self) -> dict[str, Any]:
        return {"name": "large-stride", "stride": self.stride, "input_size": self.input_size}


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}


class _ReluToSmooth(TorchFunctionMode):
    """Redirects functional ReLU calls (``F.relu``, ``torch.relu``, ``x.relu()``) to ``fn``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in _RELU_FUNCS:
            self.calls += 1
            return self.fn(args[0])
        return func(*args, **(kwargs or {}))


def _count_relu_calls(model: nn.Module, sample: torch.Tensor) -> int:
    mode = _ReluToSmooth(lambda t: t)
    with torch.no_grad(), mode:
        _forward_shape_probe(model, sample)
    return mode.calls


@DEFENSES.register("smooth-activation")
@dataclass
class SmoothActivation(ArchitectureTransform):
    """Architecture trick for FGSM-AT: smooth activations (SiLU/softplus/GELU/ELU) instead of ReLU."""

    description: ClassVar[str] = "FGSM-AT trick: SiLU/softplus/GELU instead of ReLU (model transform)"
    activation: str = "silu"
    replaced: int = 0
    functional: bool = False

    def apply(self, model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
        """Swap every ``nn.ReLU`` module in place. Networks that call ``F.relu`` in ``forward``
        (PreActResNet, ResNet-20, ...) are also covered: when a probe forward pass still sees
        functional ReLU calls, those modules' ``forward`` runs under a function mode that maps
        them to the same activation. State-dict keys never change."""
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"Unknown activation {self.activation!r}; accepted: {', '.join(ACTIVATIONS)}.")
        make = ACTIVATIONS[self.activation]
        count = 0
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, child_name, make())
                    count += 1
        self.replaced = count
        probe = sample if sample is not None else _default_probe(model)
        if probe is not None and _count_relu_calls(model, probe[:1]) > 0:
            _wrap_forward(model, make())
            self.functional = True
        return model

    def spec(self) -> dict[str, Any]:
        return {"name": "smooth-activation", "activation": self.activation}


def _default_probe(model: nn.Module) -> torch.Tensor | None:
    info = getattr(model, "info", None)
    if info is not None:
        return torch.zeros(1, *info.input_size)
    return None


def _wrap_forward(model: nn.Module, act: nn.Module) -> None:
    """Run ``model.forward`` under :class:`_ReluToSmooth` (the activation module is registered as
    a non-persistent attribute so it follows ``.to()``; it has no parameters)."""
    inner = model.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _ReluToSmooth(act):
            return inner(*args, **kwargs)

    model.forward = types.MethodType(forward, model)  # type: ignore[method-assign]


def relu_calls(model: nn.Module, sample: torch.Tensor) -> int:
    """How many ReLUs (modules or functional calls) one forward pass of ``model`` still runs."""
    mods = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    seen = [0]
    handles = [m.register_forward_hook(lambda *_: seen.__setitem__(0, seen[0] + 1)) for m in mods]
    try:
        functional = _count_relu_calls(model, sample[:1])
    finally:
        for h in handles:
            h.remove()
    return functional if functional else seen[0]


def apply_architecture(model: nn.Module, specs: list[dict[str, Any]], sample: torch.Tensor | None = None) -> nn.Module:
    """Replay recorded architecture transforms (sidecar ``architecture`` entries) on ``model``."""
    for spec in specs:
        opts = dict(spec)
        name = opts.pop("name")
        cls = DEFENSES.get(name)
        if getattr(cls, "kind", None) != "architecture":
            raise UsageError(f"{name!r} is not an architecture transform.")
        cls(**opts).apply(model, sample)
    return model
