"""Training strategies (``kind = "training"``): how a batch is made adversarial and what loss is
minimized. ``robustkit.training.loop`` runs the loop; a strategy only sees one batch at a time.

Registered methods: ``standard``, ``pgd-at`` (Madry et al., 2018), ``trades`` (Zhang et al.,
2019), ``mart`` (Wang et al., 2020), ``fgsm-rs`` (Wong, Rice and Kolter, 2020, "Fast is better
than free") and ``fgsm-at`` (Goodfellow et al., 2015: plain FGSM from the clean point). Every
method accepts the architecture and weight-regularization tricks of ``fgsm_tricks``; the mask
trick changes the FGSM starting point and so applies to ``fgsm-at`` and ``fgsm-rs``.

Training-time perturbations are computed here and not with the evaluation attacks of
``robustkit.attacks``: those keep the evaluation contract (already misclassified points are left
alone, each point is frozen at its first adversarial iterate, eval mode), which measures
robustness correctly but is not what these methods train on (the last iterate of every point).
Projection, clamping and random starts still come from :class:`~robustkit.threat.ThreatModel`.
Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so nothing
accumulates in the parameters; under fp16 autocast they are loss-scaled (:func:`ascend`). PGD-AT
and the FGSM methods generate their perturbation in train mode (as the reference code of Rice
et al. and Wong et al. does); TRADES and MART in eval mode (as their official code does).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attack import Forward, frozen_parameters
from robustkit.errors import UnknownNameError, UsageError
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel

from .fgsm_tricks import MaskInit, TrickOptions, apply_architecture, first_conv, weight_penalty
from .kinds import defenses_of_kind


@dataclass
class StepOutput:
    """One training step's loss (a scalar to back-propagate), the logits on the inputs it trained
    on (for the running train accuracy) and named loss parts for logging."""

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.dim() - 1)))


def ascend(
    model: nn.Module,
    x: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    loss_fn: Any,
) -> torch.Tensor:
    """``steps`` steepest-ascent steps on ``loss_fn(logits, cur)`` (summed, on fp32 logits) from
    ``start``, each projected onto the threat set around ``x``; returns the last iterate (detached).
    Under the training step's fp16 autocast the input gradient is loss-scaled (robustkit's
    :class:`~robustkit.attack.Forward`; the parameters are frozen meanwhile), so it does not
    underflow to zero on confidently classified points."""
    cur = start.detach()
    forward = Forward(model)
    with frozen_parameters(model):
        for _ in range(steps):
            cur.requires_grad_(True)
            loss = loss_fn(forward(cur), cur)
            (grad,) = torch.autograd.grad(loss, cur)
            cur = threat.clip(cur.detach() + step_size * _direction(grad, threat.norm), x).detach()
    return cur


class TrainingStrategy:
    """Base class: subclasses set ``name``/``description`` and implement :meth:`loss_on`.

    Options: ``steps``/``step_size`` of the inner attack (defaults per method), ``beta`` (TRADES,
    MART), ``tricks`` (:class:`~robustkit.defenses.fgsm_tricks.TrickOptions`), ``seed`` (fixed
    mask pattern).
    """

    kind: ClassVar[str] = "training"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    adversarial: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "multistep"
    default_steps: ClassVar[int] = 10
    default_beta: ClassVar[float | None] = None
    eval_mode_attack: ClassVar[bool] = False
    accepts_mask: ClassVar[bool] = False
    soft_targets: bool = False  # step() takes N×K soft targets (batches mixed with --mix)
    aux: nn.Module | None = None  # a module the loop trains and checkpoints with the model (PubDef's statistics)
    aux_name: ClassVar[str] = "aux"  # its file: AUX_NAME.safetensors

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int | None = None,
        step_size: float | None = None,
        beta: float | None = None,
        tricks: TrickOptions | None = None,
        seed: int = 0,
    ):
        if threat.norm not in ("linf", "l2"):
            raise UsageError(f"Training supports the linf and l2 threat models, not {threat.norm}.")
        self.threat = threat
        self.steps = self.default_steps if steps is None else int(steps)
        if self.steps < 1:
            raise UsageError(f"--attack-steps must be at least 1, got {self.steps}.")
        self.step_size = self.default_step_size() if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise UsageError(f"--attack-step-size must be positive, got {self.step_size:g}.")
        self._step_per_eps = self.step_size / threat.eps
        if beta is not None and self.default_beta is None:
            raise UsageError(f"{self.name} has no beta; beta is an option of trades and mart.")
        self.beta = self.default_beta if beta is None else float(beta)
        if self.beta is not None and not self.beta >= 0:
            raise UsageError(f"beta must be non-negative, got {self.beta:g}.")
        self.tricks = tricks or TrickOptions()
        if self.tricks.has("mask") and not self.accepts_mask:
            raise UsageError(
                f"The mask trick sets the FGSM starting point; use it with fgsm-at or fgsm-rs, not {self.name}."
            )
        self.mask = (MaskInit(self.tricks.mask_ratio, self.tricks.mask_pattern, seed)
                     if self.tricks.has("mask") else None)
        self._reg_conv: nn.Conv2d | None = None

    # -- configuration -----------------------------------------------------------------
    def set_eps(self, eps: float) -> None:
        """Change the training radius (eps warmup); the step size keeps its ratio to eps."""
        if eps == self.threat.eps:
            return
        self.step_size = self._step_per_eps * eps  # from the ratio, so the result never depends on history
        self.threat = ThreatModel(self.threat.norm, eps)

    def passes_per_image(self) -> float | None:
        """Forward/backward passes per training image relative to standard training, for
        --same-budget; None where the method does not state its cost (the default)."""
        return None

    def default_step_size(self) -> float:
        """eps/4 (2/255 at eps 8/255, as Rice et al. and the TRADES/MART code use)."""
        return self.threat.eps / 4

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"method": self.name, "norm": self.threat.norm, "eps": self.threat.eps}
        if self.adversarial:
            cfg.update(steps=self.steps, step_size=self.step_size)
        if self.beta is not None:
            cfg["beta"] = self.beta
        if self.tricks.tricks:
            cfg["tricks"] = list(self.tricks.tricks)
        return cfg

    # -- the model -----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        """Apply the architecture tricks to ``model`` in place (``sample``: one input batch) and
        find the layer the weight regularizer acts on. Returns the replayable transform specs."""
        specs = self.tricks.architecture(tuple(sample.shape[1:]))
        target = getattr(model, "net", model)
        apply_architecture(target, specs, sample)
        if self.tricks.has("weight-reg"):
            self._reg_conv = first_conv(model, sample[:1])[1]
        return specs

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """``reg_lambda * sum |W|^p`` over the first convolution's weights (weight-reg trick)."""
        if not self.tricks.has("weight-reg"):
            return None
        if self._reg_conv is None:
            self._reg_conv = first_conv(model)[1]
        return self.tricks.reg_lambda * weight_penalty(self._reg_conv, self.tricks.reg_p)

    # -- one batch -------------------------------------------------------------------------
    @contextlib.contextmanager
    def attacking(self, model: nn.Module) -> Iterator[None]:
        """The model's mode while the batch is made adversarial: eval mode for ``eval_mode_attack``
        methods, unchanged otherwise; restored after."""
        was = model.training
        if self.eval_mode_attack:
            model.eval()
        try:
            yield
        finally:
            model.train(was)

    def adversarial_input(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """``perturb`` in the attack's mode (:meth:`attacking`); ``x`` itself for clean methods."""
        if not self.adversarial:
            return x
        with self.attacking(model):
            return self.perturb(model, x, y, generator)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The adversarial inputs this method trains on (``x`` for standard training)."""
        return x

    def loss_on(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = model(x_adv).float()
        return F.cross_entropy(logits, y), logits, {}

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        """Make the batch adversarial, compute the loss (plus the regularizer) in train mode."""
        x_adv = self.adversarial_input(model, x, y, generator)
        loss, logits, parts = self.loss_on(model, x, x_adv, y)
        parts = {"task": float(loss.detach()), **parts}
        reg = self.regularizer(model)
        if reg is not None:
            parts["reg"] = float(reg.detach())
            loss = loss + reg
        return StepOutput(loss, logits.detach(), parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.config().items())})"


def _ce_sum(y: torch.Tensor) -> Any:
    return lambda logits, _cur: F.cross_entropy(logits, y, reduction="sum")


@DEFENSES.register("standard")
class Standard(TrainingStrategy):
    """Standard (non-adversarial) training with cross-entropy on clean inputs."""

    soft_targets = True
    name = "standard"
    description = "Standard training on clean inputs (cross-entropy)"
    adversarial = False


@DEFENSES.register("pgd-at", aliases=("madry", "pgd"))
class PGDAT(TrainingStrategy):
    """PGD adversarial training (Madry et al., 2018): random start, ``steps`` (10) steps of eps/4."""

    soft_targets = True
    name = "pgd-at"
    description = "PGD adversarial training (Madry et al. 2018): 10 steps of eps/4 from a random start"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        start = self.threat.random_init(x, generator)
        return ascend(model, x, start, self.threat, steps=self.steps, step_size=self.step_size, loss_fn=_ce_sum(y))


class _FGSMBase(TrainingStrategy):
    soft_targets = True
    default_steps = 1
    accepts_mask = True
    random_start: ClassVar[bool] = False

    def start(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x0 = self.threat.random_init(x, generator) if self.random_start else x
        return self.mask(x0, generator) if self.mask is not None else x0

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ascend(
            model, x, self.start(x, generator), self.threat, steps=self.steps, step_size=self.step_size,
            loss_fn=_ce_sum(y),
        )  # fmt: skip


@DEFENSES.register("fgsm-at", aliases=("fgsm",))
class FGSMAT(_FGSMBase):
    """FGSM adversarial training: one signed-gradient step of size eps from the clean input."""

    name = "fgsm-at"
    description = "FGSM adversarial training: one step of size eps from the clean input (zero init)"

    def default_step_size(self) -> float:
        return self.threat.eps


@DEFENSES.register("fgsm-rs", aliases=("fast-at", "fast"))
class FGSMRS(_FGSMBase):
    """"Fast is better than free" (Wong et al., 2020): uniform random start, one step of 1.25 eps."""

    name = "fgsm-rs"
    description = "Fast AT (Wong et al. 2020): random start, FGSM step 1.25 eps, cyclic learning rate"
    default_schedule = "cyclic"
    random_start = True

    def default_step_size(self) -> float:
        return 1.25 * self.threat.eps


@DEFENSES.register("trades")
class TRADES(TrainingStrategy):
    """TRADES (Zhang et al., 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), beta = 6."""

    soft_targets = True
    name = "trades"
    description = "TRADES (Zhang et al. 2019): clean CE + beta KL to the adversarial output (beta 6)"
    default_beta = 6.0
    eval_mode_attack = True

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = self.threat.clip(x + 0.001 * noise, x)  # TRADES' start: x + 0.001 N(0, I)

        def kl(logits: torch.Tensor, _cur: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")

        return ascend(model, x, start, self.threat, steps=self.steps, step_size=self.step_size, loss_fn=kl)

    def loss_on(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits_nat = model(x).float()
        logits_adv = model(x_adv).float()
        natural = F.cross_entropy(logits_nat, y)
        robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="batchmean")
        assert self.beta is not None
        parts = {"natural": float(natural.detach()), "robust": float(robust.detach())}
        return natural + self.beta * robust, logits_adv, parts


@DEFENSES.register("mart")
class MART(TrainingStrategy):
    """MART (Wang et al., 2020): boosted CE on x_adv + beta * (1 - p_y(x)) * KL(f(x) || f(x_adv))."""

    name = "mart"
    description = "MART (Wang et al. 2020): boosted CE + misclassification-aware KL (beta 6)"
    default_beta = 6.0
    eval_mode_attack = True

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = self.threat.clip(x + 0.001 * noise, x)
        return ascend(model, x, start, self.threat, steps=self.steps, step_size=self.step_size, loss_fn=_ce_sum(y))

    def loss_on(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits_nat = model(x).float()
        logits_adv = model(x_adv).float()
        p_adv = F.softmax(logits_adv, dim=1)
        # boosted CE: CE plus a margin term pushing down the most likely wrong class
        top2 = p_adv.topk(2, dim=1).indices
        wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        p_nat = F.softmax(logits_nat, dim=1)
        true_p = p_nat.gather(1, y[:, None]).squeeze(1)
        kl = (p_nat * (torch.log(p_nat + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
        robust = (kl * (1.0000001 - true_p)).mean()
        assert self.beta is not None
        return bce + self.beta * robust, logits_adv, {"bce": float(bce.detach()), "robust": float(robust.detach())}


def training_methods() -> list[str]:
    """Names of the registered training strategies."""
    return defenses_of_kind("training")


def build_strategy(name: str, threat: ThreatModel, **options: Any) -> TrainingStrategy:
    """The training strategy ``name`` (alias allowed) with ``options``; one-line errors for an
    unknown name, a defense of another kind, or options the method does not take."""
    methods = training_methods()
    if name not in DEFENSES:
        raise UnknownNameError("training method", name, methods)
    key = DEFENSES.canonical(name)
    cls = DEFENSES.get(key)
    kind = getattr(cls, "kind", None)
    if kind != "training":
        raise UsageError(
            f"{key!r} is a defense of kind {kind!r}, not a training method; accepted: {', '.join(methods)}."
        )
    if not isinstance(cls, type) or not issubclass(cls, TrainingStrategy):
        try:  # a third-party strategy: pass the options it declares
            params = inspect.signature(cls).parameters
            options = {k: v for k, v in options.items() if k in params}
        except (TypeError, ValueError):
            pass
    return cls(threat, **options)
