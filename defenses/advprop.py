"""AdvProp (Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020,
arXiv:1911.09665) and Fast AdvProp (Mei et al., ICLR 2022, arXiv:2204.09838).

AdvProp trains on clean images *and* adversarial examples, but normalizes the adversarial ones
with their own, auxiliary BatchNorm layers: the two kinds of input have different feature
statistics, and mixing them in one BatchNorm is what makes ordinary adversarial training lose
clean accuracy. Only the main BatchNorm is used at test time, so the deployed network has the
original architecture. Three pieces, all in ``robustkit.registry.DEFENSES``:

* ``dual-bn`` (kind ``architecture``): every BatchNorm layer becomes a :class:`DualBatchNorm`
  (a ``main`` and an ``aux`` copy of the original layer). Forward passes use the main one unless
  run inside :func:`auxiliary_bn`. Recorded in the training sidecar and replayed on loading, so a
  trained checkpoint (both BNs) loads back with ``load_trained_model``; :func:`plain_state_dict`
  gives the deployable weights (main BNs under the original key names).
* ``advprop`` (kind ``training``): PGD examples made and trained through the auxiliary BNs;
  loss = CE(clean, main BN) + CE(adversarial, aux BN) (the paper's objective).
* ``fast-advprop`` (kind ``training``): the Fast AdvProp recipe (below).

Defaults and where they come from. The reference code is github.com/meijieru/fast_advprop
(``scripts/run_fastadvprop.sh``, ``imagenet.py``, ``attacker.py``, ``fast_advprop.py``,
``normalization.py``). Its images are normalized to [-1, 1], and its attack sizes are in units of
``IMAGE_SCALE = 2/255`` there, i.e. 1/255 of our [0, 1] pixel scale.

* advprop: PGD with 5 steps of eps/4 — the paper's strongest and default attacker (eps 4, step
  1, n = eps + 1 iterations, in /255 units; Fast AdvProp's introduction counts AdvProp's default
  cost as 7x = 5 attack passes + clean + adversarial). Attack in eval mode through the
  auxiliary BNs (the reference's default: ``--attack_in_train`` off). The uniform random start
  in the eps-ball is ours (robustkit's PGD-AT start); the reference code's AdvProp attacker
  targets a random label, ours is untargeted (as the paper describes PGD).
* fast-advprop (all from ``run_fastadvprop.sh`` and the code it runs unless marked ours):
  ``--multi_clean_strategy 4:1`` -> ``adv_fraction=0.2`` of the batch is made adversarial (the
  last fifth of our already-shuffled batch); ``--attack-iter 1`` with step = eps -> 1 step of
  size eps; ``--attack-epsilon 1`` -> eps 1/255 on ImageNet (pass ``--eps 1/255`` to match; we
  take the radius from the training config like every method); a uniform random start with
  probability P(N(0,1) > 0.2) = 0.42 per batch, else the clean image (``PGDAttacker.attack_init``
  with ``prob_start_from_clean=0.2``), untargeted (``--original_attack``); the attack runs in
  train mode through the auxiliary BNs (``--attack_in_train``); ``--reuse_mid_grad``: the attack's
  forward/backward pass also gives the weight gradient of those "noisy" inputs (no extra pass);
  ``--loss_strategy clean:1,attack:0.5,adv:0.5`` -> ``loss_weights=(1, 0.5, 0.5)``; and the
  per-parameter averaging of ``imagenet.py`` (gradients divided by how many weighted samples each
  parameter saw; ``--lr_strategy shared:1,clean:1,adv:1``) -> ``sync_bn_grads=True``: shared
  weights get (1 * sum CE_clean + 0.5 * sum CE_noisy + 0.5 * sum CE_adv) / W with
  W = n_clean + n_adv, the main BNs' affine parameters the mean clean gradient, the auxiliary
  ones the weighted mean over the adversarial part. Not replicated: the reference shuffles the
  adversarial examples across GPUs before training on them (a no-op on one process), and its
  ``--exact_same_training_budget`` divides the epochs by the cost factor 1.2 (choose ``--epochs``
  yourself to match a budget).

Gradient reuse without touching the loop: the loop calls ``strategy.step`` and then back-propagates
the returned loss once. The attack pass's parameter gradient is computed together with its input
gradient (one ``torch.autograd.grad``) and handed to the loop as a linear term ``sum(p * g)`` whose
value is subtracted out, so back-propagating the loss adds exactly ``g`` to each parameter's
gradient (also under a GradScaler, gradient clipping and EMA). Under fp16 autocast that pass is
loss-scaled (:func:`noisy_pass_grads`): the input gradient through robustkit's
:func:`~robustkit.attack.scaled_input_grad` (as every attack's), the weight gradient with one
dynamic scale, so neither flushes to zero on confidently classified images.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from robustkit.attack import HALF_RETRIES, HALF_STEP_EXP, HALF_TARGET_EXP, autocast_dtype, scaled_input_grad
from robustkit.errors import UsageError
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel

from .adversarial_training import StepOutput, TrainingStrategy, _ce_sum, _direction, ascend
from .fgsm_tricks import ArchitectureTransform, TrickOptions

BRANCHES = ("main", "aux")


# -- dual BatchNorm -----------------------------------------------------------------------------


def _scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` unchanged in value, with its gradient multiplied by ``scale``."""
    d = t.detach()
    return d + (t - d) * scale


def noisy_pass_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """One forward/backward pass at ``x`` (which requires grad): the summed cross-entropy, its
    gradient for ``x`` and for ``params`` (None where unused). Without fp16 autocast one
    ``autograd.grad`` call gives both. Under fp16 autocast both are loss-scaled, so neither
    underflows to zero on confidently classified images: the input gradient by
    :func:`~robustkit.attack.scaled_input_grad` (per row, or per band where train-mode BatchNorm
    couples the rows), the weight gradient by :func:`_scaled_weight_grads`."""
    logits = model(x).float()
    ce = F.cross_entropy(logits, y, reduction="sum")
    if autocast_dtype(x.device.type) != torch.float16:
        g_in, *g_params = torch.autograd.grad(ce, [x, *params], allow_unused=True)
        return ce, g_in, g_params
    (g_logits,) = torch.autograd.grad(ce, logits, retain_graph=True)  # exact: fp32 logits
    coupled = any(isinstance(m, _BatchNorm) and m.training for m in model.modules())
    g_in = scaled_input_grad(model, x, logits, g_logits, coupled=coupled)
    return ce, g_in, _scaled_weight_grads(logits, params, g_logits)


def _scaled_weight_grads(
    logits: torch.Tensor, params: list[nn.Parameter], g_logits: torch.Tensor
) -> list[torch.Tensor | None]:
    """``params``' gradient of ``<logits, g_logits>`` through the half-precision graph, with one
    loss scale as GradScaler's (the largest logit gradient at ``2**HALF_TARGET_EXP``, backed off
    by ``2**HALF_STEP_EXP`` on overflow), unscaled in fp32. Still non-finite after the retries: the
    loop's GradScaler skips that step, as it does for any overflow."""
    if not params:
        return []
    peak = float(g_logits.abs().max())
    exp = HALF_TARGET_EXP - math.frexp(peak)[1] if math.isfinite(peak) and peak > 0 else 0
    exp = min(max(exp, -100), 100)  # 2**exp stays a normal fp32 number
    for _ in range(HALF_RETRIES + 1):
        grads = torch.autograd.grad(logits, params, g_logits * 2.0**exp, retain_graph=True, allow_unused=True)
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            break
        exp -= HALF_STEP_EXP
    return [None if g is None else g * 2.0 ** -(exp // 2) * 2.0 ** -(exp - exp // 2) for g in grads]


class DualBatchNorm(nn.Module):
    """A BatchNorm layer and an auxiliary copy of it; ``branch`` says which one normalizes.

    Both start as exact copies of the original layer (statistics and affine parameters), so a
    converted network computes what it computed before. ``grad_scale`` multiplies the gradient of
    the active branch's affine parameters (Fast AdvProp's per-parameter averaging); 1 by default.
    State-dict keys: ``<layer>.main.*`` and ``<layer>.aux.*``.
    """

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.branch = "main"
        self.grad_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.aux if self.branch == "aux" else self.main
        if self.grad_scale == 1.0 or not bn.affine:
            return bn(x)
        params = {"weight": _scale_grad(bn.weight, self.grad_scale), "bias": _scale_grad(bn.bias, self.grad_scale)}
        return functional_call(bn, params, (x,))  # running statistics stay the module's own buffers

    def extra_repr(self) -> str:
        return f"branch={self.branch}"


def dual_layers(model: nn.Module) -> list[DualBatchNorm]:
    """The model's :class:`DualBatchNorm` layers."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def to_dual_bn(model: nn.Module) -> int:
    """Replace every BatchNorm layer (1d/2d/3d, SyncBatchNorm) of ``model`` in place by a
    :class:`DualBatchNorm`; returns how many were replaced (layers already dual are left alone)."""
    done: dict[int, DualBatchNorm] = {}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, DualBatchNorm):
                continue
            if isinstance(child, _BatchNorm):
                if id(child) not in done:  # a layer shared by two places stays shared
                    done[id(child)] = DualBatchNorm(child)
                setattr(parent, name, done[id(child)])
            else:
                visit(child)

    visit(model)
    return len(done)


@contextlib.contextmanager
def use_bn(model: nn.Module, branch: str = "main", *, grad_scale: float = 1.0) -> Iterator[nn.Module]:
    """Route forward passes of ``model`` through the ``main`` or ``aux`` BatchNorms inside the
    ``with`` block (the previous routing comes back afterwards); ``grad_scale`` as in
    :class:`DualBatchNorm`. Independent of train/eval mode."""
    if branch not in BRANCHES:
        raise UsageError(f"Unknown BatchNorm branch {branch!r}; accepted: {', '.join(BRANCHES)}.")
    layers = dual_layers(model)
    if not layers:
        raise UsageError(f"{type(model).__name__} has no dual BatchNorm layers; apply the dual-bn transform first.")
    saved = [(m.branch, m.grad_scale) for m in layers]
    for m in layers:
        m.branch, m.grad_scale = branch, float(grad_scale)
    try:
        yield model
    finally:
        for m, (b, s) in zip(layers, saved, strict=True):
            m.branch, m.grad_scale = b, s


def auxiliary_bn(model: nn.Module, *, grad_scale: float = 1.0) -> contextlib.AbstractContextManager[nn.Module]:
    """``with auxiliary_bn(model):`` runs forward passes through the auxiliary BatchNorms."""
    return use_bn(model, "aux", grad_scale=grad_scale)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network without the auxiliary BNs: each ``<layer>.main.<name>``
    under its original key ``<layer>.<name>``, ``<layer>.aux.*`` left out. It loads (strictly) into
    the unmodified architecture, which then computes what the dual network computes by default."""
    duals = {name for name, m in model.named_modules() if isinstance(m, DualBatchNorm)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        base, _, branch = owner.rpartition(".")
        if branch in BRANCHES and base in duals:
            if branch == "main":
                out[f"{base}.{leaf}" if base else leaf] = value
            continue
        out[key] = value
    return out


def strip_dual_bn(model: nn.Module) -> nn.Module:
    """Put each :class:`DualBatchNorm`'s main BatchNorm back in its place (in place); returns
    ``model``, now the original architecture with the main BN weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DualBatchNorm):
                setattr(parent, name, child.main)
    return model


@DEFENSES.register("dual-bn", aliases=("dual-batchnorm", "auxiliary-bn"))
@dataclass
class DualBN(ArchitectureTransform):
    """AdvProp's architecture: every BatchNorm becomes a main + auxiliary pair (model transform)."""

    description: ClassVar[str] = "AdvProp: every BatchNorm becomes a main + auxiliary BatchNorm (model transform)"
    converted: int = 0

    def apply(self, model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
        """Convert ``model``'s BatchNorms in place (``sample`` is not needed)."""
        self.converted = to_dual_bn(model)
        if not dual_layers(model):
            raise UsageError(
                f"AdvProp needs BatchNorm layers and {type(model).__name__} has none; "
                "train a model with BatchNorm (e.g. resnet20)."
            )
        return model

    def spec(self) -> dict[str, Any]:
        return {"name": "dual-bn"}


# -- training strategies -------------------------------------------------------------------------


class _DualBNStrategy(TrainingStrategy):
    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        """The tricks' transforms, then the dual-BN transform (recorded last, replayed last)."""
        specs = super().prepare_model(model, sample)
        transform = DualBN()
        transform.apply(getattr(model, "net", model), sample)
        return [*specs, transform.spec()]


@DEFENSES.register("advprop")
class AdvProp(_DualBNStrategy):
    """AdvProp (Xie et al., 2020): CE on clean inputs (main BN) + CE on PGD examples (auxiliary BN)."""

    name = "advprop"
    description = "AdvProp (Xie et al. 2020): clean CE + CE on PGD-5 examples through auxiliary BatchNorms"
    default_steps = 5
    eval_mode_attack = True

    def passes_per_image(self) -> float:
        """Passes per training image relative to standard training: the clean one, ``steps``
        attack passes and the adversarial one (the reference's ``attack_iter + 2``)."""
        return float(self.steps + 2)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        start = self.threat.random_init(x, generator)
        with auxiliary_bn(model):
            return ascend(model, x, start, self.threat, steps=self.steps, step_size=self.step_size,
                          loss_fn=_ce_sum(y))

    def loss_on(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits = model(x).float()
        with auxiliary_bn(model):
            logits_adv = model(x_adv).float()
        clean, adv = F.cross_entropy(logits, y), F.cross_entropy(logits_adv, y)
        return clean + adv, logits, {"clean": float(clean.detach()), "adv": float(adv.detach())}


@DEFENSES.register("fast-advprop", aliases=("fastadvprop",))
class FastAdvProp(_DualBNStrategy):
    """Fast AdvProp (Mei et al., 2022): a fifth of the batch adversarial, one attack step whose
    forward/backward pass also trains, re-weighted losses, per-parameter gradient averaging.

    Options beyond the common ones (defaults from the reference code; see the module docstring):
    ``adv_fraction`` (0.2), ``loss_weights`` (clean, noisy, adversarial: 1, 0.5, 0.5),
    ``random_start_prob`` (0.42), ``sync_bn_grads`` (True).
    """

    name = "fast-advprop"
    description = "Fast AdvProp (Mei et al. 2022): 20% of the batch adversarial, 1 attack step reused for training"
    default_steps = 1

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int | None = None,
        step_size: float | None = None,
        beta: float | None = None,
        tricks: TrickOptions | None = None,
        seed: int = 0,
        adv_fraction: float = 0.2,
        loss_weights: tuple[float, float, float] = (1.0, 0.5, 0.5),
        random_start_prob: float = 0.4207,
        sync_bn_grads: bool = True,
    ):
        super().__init__(threat, steps=steps, step_size=step_size, beta=beta, tricks=tricks, seed=seed)
        if not 0.0 < adv_fraction < 1.0:
            raise UsageError(f"adv_fraction must be in (0, 1), got {adv_fraction:g}.")
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != 3 or min(weights) < 0 or weights[0] == 0 or weights[1] + weights[2] == 0:
            raise UsageError(f"loss_weights are (clean, noisy, adversarial) >= 0 with clean > 0, got {loss_weights}.")
        if not 0.0 <= random_start_prob <= 1.0:
            raise UsageError(f"random_start_prob must be in [0, 1], got {random_start_prob:g}.")
        self.adv_fraction = float(adv_fraction)
        self.loss_weights: tuple[float, float, float] = weights  # type: ignore[assignment]
        self.random_start_prob = float(random_start_prob)
        self.sync_bn_grads = bool(sync_bn_grads)

    def default_step_size(self) -> float:
        """eps: the reference's step is max(step, eps / iterations) = eps for its 1-step attack."""
        return self.threat.eps

    def config(self) -> dict[str, Any]:
        return {**super().config(), "adv_fraction": self.adv_fraction, "loss_weights": list(self.loss_weights),
                "random_start_prob": self.random_start_prob, "sync_bn_grads": self.sync_bn_grads}

    def passes_per_image(self) -> float:
        """Forward/backward passes per training image relative to standard training: the clean
        share once, the adversarial share ``steps`` attack passes plus its training pass (1.2)."""
        return 1 - self.adv_fraction + self.adv_fraction * (self.steps + 1)

    def split(self, n: int) -> int:
        """How many of a batch of ``n`` are made adversarial (the last ones); at least one stays clean."""
        return min(round(self.adv_fraction * n), n - 1)

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        n_adv = self.split(len(y))
        n_clean = len(y) - n_adv
        w_clean, w_noisy, w_adv = self.loss_weights
        clean_weight, adv_weight = n_clean * w_clean, n_adv * (self.steps * w_noisy + w_adv)
        total = clean_weight + adv_weight  # the reference's per-sample normalizer of shared weights
        main_scale = total / clean_weight if self.sync_bn_grads else 1.0
        aux_scale = total / adv_weight if self.sync_bn_grads and adv_weight else 1.0

        with use_bn(model, "main", grad_scale=main_scale):
            logits = model(x[:n_clean]).float()
        clean_sum = F.cross_entropy(logits, y[:n_clean], reduction="sum")
        loss = w_clean * clean_sum / total
        parts = {"clean": float(clean_sum.detach()) / n_clean}
        if n_adv:
            xa, ya = x[n_clean:], y[n_clean:]
            x_adv, noisy_sum, reused = self._attack(model, xa, ya, generator, aux_scale)
            with auxiliary_bn(model, grad_scale=aux_scale):
                logits_adv = model(x_adv).float()
            adv_sum = F.cross_entropy(logits_adv, ya, reduction="sum")
            linear = sum(((p * g).sum() for p, g in reused), torch.zeros((), device=x.device))  # d/dp = g
            loss = loss + (w_adv * adv_sum + w_noisy * noisy_sum + linear - linear.detach()) / total
            parts["noisy"] = noisy_sum / (n_adv * self.steps)
            parts["adv"] = float(adv_sum.detach()) / n_adv
            logits = torch.cat([logits, logits_adv])
        parts = {"task": float(loss.detach()), **parts}
        reg = self.regularizer(model)
        if reg is not None:
            parts["reg"] = float(reg.detach())
            loss = loss + reg
        return StepOutput(loss, logits.detach(), parts)

    def _attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, aux_scale: float
    ) -> tuple[torch.Tensor, float, list[tuple[nn.Parameter, torch.Tensor]]]:
        """``steps`` signed-gradient steps through the auxiliary BNs in train mode; each pass's
        backward gives the input gradient and, in the same call, the weight gradient of
        ``w_noisy * sum CE`` at that point. Returns the last iterate, the summed CE and the
        accumulated (parameter, gradient) pairs."""
        noisy = bool(torch.rand((), generator=generator, device=x.device) < self.random_start_prob)
        cur = self.threat.random_init(x, generator) if noisy else x.clone()
        w_noisy = self.loss_weights[1]
        params = [p for p in model.parameters() if p.requires_grad] if w_noisy else []  # 0: nothing to reuse
        grads: list[torch.Tensor | None] = [None] * len(params)
        total = 0.0
        with auxiliary_bn(model, grad_scale=aux_scale):
            for _ in range(self.steps):
                ce, g_in, g_params = noisy_pass_grads(model, cur.requires_grad_(True), y, params)
                for i, g in enumerate(g_params):
                    if g is not None:
                        g = w_noisy * g
                        grads[i] = g if grads[i] is None else grads[i] + g
                total += float(ce.detach())
                cur = self.threat.clip(cur.detach() + self.step_size * _direction(g_in, self.threat.norm), x).detach()
        return cur, total, [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
