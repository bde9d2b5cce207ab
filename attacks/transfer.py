"""Transfer-oriented iterative FGSM variants and a surrogate (black-box transfer) helper.

One class, :class:`TransferFGSM`, carries every switch; the registered names are presets:

=============  =================  ========  =====  ========  ============================
name           class              momentum  DI     TI        torchattacks counterpart
=============  =================  ========  =====  ========  ============================
``mi-fgsm``    :class:`MIFGSM`    1.0       off    off       ``MIFGSM`` (decay 1.0)
``di-fgsm``    :class:`DIFGSM`    0.0       p=0.5  off       ``DIFGSM`` (decay 0.0)
``ti-fgsm``    :class:`TIFGSM`    0.0       off    gaussian  ``TIFGSM(diversity_prob=0)``
``mdti-fgsm``  :class:`MDTIFGSM`  1.0       p=0.5  gaussian  ``TIFGSM(decay=1.0)``
=============  =================  ========  =====  ========  ============================

Every preset takes all switches as keyword arguments, so any combination is one constructor
call away (``DIFGSM(threat, decay=1.0)`` is M-DI²-FGSM). Note that torchattacks' ``TIFGSM``
also applies input diversity by default (``diversity_prob=0.5``); robustkit's ``ti-fgsm`` is
translation invariance alone, and ``mdti-fgsm`` is the full combination.

The update at step ``t`` (Linf only; ``supported_norms = ("linf",)``)::

    g   = ∇_x loss(model(DI(x_t)), y)            # DI: with probability p, random resize + pad
    g   = W * g                                  # TI: depthwise conv with a 15×15 Gaussian (nsig 3)
    g   = g / mean(|g|)                          # gradient normalization, per sample (L1)
    m   = decay · m + g                          # momentum (MI), decay 0 disables it
    x_t+1 = clip(x_t + step_size · sign(m))      # projection and [0, 1] clamp (ThreatModel)

Defaults follow torchattacks 3.5.1: 10 steps, step size ``2.5·eps/steps`` (2/255 at eps 8/255
and 10 steps, the torchattacks default ``alpha``; Dong et al. use ``eps/steps`` — pass
``step_size=eps/steps`` for the paper's setting), resize_rate 0.9, diversity_prob 0.5, kernel
15 with nsig 3, no random start, cross-entropy loss.

Like every iterative attack in ``pgd.py``, a point freezes at its first adversarial iterate
(judged on the *undiversified* input). Input diversity draws its randomness from the attack's
own generator, once per step for the whole batch (as torchattacks does), in the same order as
torchattacks, so the same seed gives the same result, independent of ``early_stop``. One
transform per step for the whole batch makes DI results move by several points between seeds
(DI-FGSM on abcrown resnet4b, Linf 8/255, 256 CIFAR-10 images: 21.5%, 17.2%, 25.0% robust
accuracy for three seeds): compare DI numbers at equal seeds, or average over seeds. The
15×15 TI kernel was tuned for ImageNet-sized inputs; on 32×32 images it smooths the gradient
heavily, which weakens the white-box attack (and is the point for transfer to defended models).

:func:`transfer_attack` crafts on a surrogate model and scores the points on a target model;
by default the attack runs its full budget on every point (the surrogate's success does not stop
it), as in the transfer literature and torchattacks. :func:`craft_transfer` is its crafting half
(also what PubDef trains on). :data:`TRANSFER_SUITE` lists the engine's transfer attacks: what
``robustkit eval --attack transfer --surrogate a,b,c`` runs from every surrogate.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attack import Attack, AttackResult, Forward, attack_mode, check_batch
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .pgd import PGD

KERNELS = ("gaussian", "linear", "uniform")
#: The transfer attacks of the engine, run from every surrogate by ``--attack transfer``.
TRANSFER_SUITE = ("pgd", "mi-fgsm", "di-fgsm", "ti-fgsm", "mdti-fgsm")


def smoothing_kernel(name: str = "gaussian", size: int = 15, nsig: float = 3.0) -> torch.Tensor:
    """The 2-D smoothing kernel of TI-FGSM (``size × size``, sums to 1), as torchattacks builds it.

    gaussian: outer product of the normal pdf sampled at ``linspace(-nsig, nsig, size)``;
    linear: a tent; uniform: a box.
    """
    if name not in KERNELS:
        raise UsageError(f"Unknown TI kernel {name!r}; accepted: {', '.join(KERNELS)}.")
    if size < 1:
        raise UsageError(f"The TI kernel length must be at least 1, got {size}.")
    if name == "gaussian":
        t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
        k1 = torch.exp(-0.5 * t**2) / math.sqrt(2 * math.pi)
    elif name == "linear":
        t = torch.linspace((-size + 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
        k1 = 1 - (t / (size + 1) * 2).abs()
    else:
        k1 = torch.ones(size, dtype=torch.float64)
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).float()


def diversify(x: torch.Tensor, generator: torch.Generator, *, prob: float,
              resize_rate: float = 0.9) -> tuple[torch.Tensor, bool]:
    """Input diversity (DI, Xie et al. 2019): resize to a random side in [H·rate, H) (rate < 1) or
    [H, H·rate) (rate > 1), pad with zeros at a random offset to ``max(H, int(H·rate))``; applied
    with probability ``prob``. One draw per call for the whole batch; the four random numbers are
    drawn in torchattacks' order whether or not the transform is applied. Returns the (maybe)
    transformed batch and whether it was transformed. Shared by the transfer attacks and by
    visual-prompt training (:mod:`robustkit.training.prompt`)."""
    side = x.shape[-1]
    low, high = sorted((int(side * resize_rate), side))
    if low < 1 or high <= low:
        raise UsageError(f"Input diversity needs images larger than {side} pixels at "
                         f"resize_rate {resize_rate}: the resize range [{low}, {high}) "
                         f"is empty.")

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=generator, device=generator.device,
                                 dtype=torch.int32))

    rnd = draw(low, high)
    rem = high - rnd
    top = draw(0, rem)
    left = draw(0, rem)
    u = torch.rand(1, generator=generator, device=generator.device)
    apply = bool(u < prob)
    if not apply:
        return x, False
    rows, out_rows = rnd, high
    if x.shape[-2] != side:  # not square: scale the height alike (torchattacks assumes H == W)
        rows = max(1, round(x.shape[-2] * rnd / side))
        out_rows = max(rows, x.shape[-2], int(x.shape[-2] * resize_rate))
        top = min(top, out_rows - rows)
    resized = F.interpolate(x, size=[rows, rnd], mode="bilinear", align_corners=False)
    return F.pad(resized, [left, rem - left, top, out_rows - rows - top], value=0.0), True


def normalize_gradient(grad: torch.Tensor, *, kind: str = "mean-abs", per_sample: bool = True) -> torch.Tensor:
    """``grad`` divided by its size: ``mean-abs`` (the mean absolute value, MI-FGSM's per-sample L1
    normalization) or ``l2`` (the Euclidean norm, EVP's normalization of the prompt's update);
    per sample (every dimension but the first) or over the whole tensor. A zero gradient stays zero."""
    dims = tuple(range(1, grad.dim())) if per_sample else tuple(range(grad.dim()))
    if kind == "mean-abs":
        scale = grad.abs().mean(dim=dims, keepdim=True)
    elif kind == "l2":
        scale = grad.square().sum(dim=dims, keepdim=True).sqrt()
    else:
        raise UsageError(f"Unknown gradient normalization {kind!r}; accepted: mean-abs, l2.")
    return grad / torch.where(scale > 0, scale, torch.ones_like(scale))


class TransferFGSM(PGD):
    """Iterative FGSM with switches for momentum (MI), input diversity (DI), translation
    invariance (TI) and gradient normalization; Linf only.

    ``decay``: momentum factor (0 = none). ``diversity_prob`` / ``resize_rate``: DI (0 = none).
    ``ti_kernel`` (``"gaussian"``, ``"linear"``, ``"uniform"`` or None = no TI), ``len_kernel``,
    ``nsig``: TI. ``grad_norm``: divide each sample's gradient by its mean absolute value before
    the momentum update (without momentum it does not change the sign step). ``steps``,
    ``step_size`` (default 2.5·eps/steps), ``random_start``, ``restarts``, ``loss``, ``schedule``
    and the base-class options (``seed``, ``early_stop``, ...) are those of :class:`PGD`.
    """

    name = "transfer-fgsm"
    supported_norms = ("linf",)

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        decay: float = 0.0,
        diversity_prob: float = 0.0,
        resize_rate: float = 0.9,
        ti_kernel: str | None = None,
        len_kernel: int = 15,
        nsig: float = 3.0,
        grad_norm: bool = True,
        random_start: bool = False,
        loss: str = "ce",
        **kwargs: Any,
    ):
        super().__init__(threat, steps=steps, step_size=step_size, random_start=random_start,
                         loss=loss, **kwargs)
        if not decay >= 0:
            raise UsageError(f"The momentum decay must be >= 0, got {decay}.")
        if not 0.0 <= diversity_prob <= 1.0:
            raise UsageError(f"diversity_prob is a probability in [0, 1], got {diversity_prob}.")
        if not resize_rate > 0 or resize_rate == 1.0:
            raise UsageError(f"resize_rate must be a positive number other than 1 (0.9 shrinks, "
                             f"1.1 enlarges), got {resize_rate}.")
        self.decay = float(decay)
        self.diversity_prob = float(diversity_prob)
        self.resize_rate = float(resize_rate)
        self.ti_kernel = ti_kernel
        self.len_kernel = int(len_kernel)
        self.nsig = float(nsig)
        self.grad_norm = bool(grad_norm)
        self._kernel = None
        if ti_kernel is not None:
            self._kernel = smoothing_kernel(ti_kernel, self.len_kernel, self.nsig)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update({
            "decay": self.decay,
            "diversity_prob": self.diversity_prob,
            "resize_rate": self.resize_rate,
            "ti_kernel": self.ti_kernel,
            "len_kernel": self.len_kernel,
            "nsig": self.nsig,
            "grad_norm": self.grad_norm,
        })
        return cfg

    # -- the pieces ----------------------------------------------------------------------
    def diversify(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
        """DI with this attack's ``diversity_prob`` and ``resize_rate``; see :func:`diversify`."""
        return diversify(x, generator, prob=self.diversity_prob, resize_rate=self.resize_rate)

    def smooth(self, grad: torch.Tensor) -> torch.Tensor:
        """TI: convolve each channel of the gradient with the kernel (zero 'same' padding)."""
        channels = grad.shape[1]
        weight = self._kernel.to(grad.device, grad.dtype).expand(channels, 1, *self._kernel.shape)
        return F.conv2d(grad, weight, stride=1, padding="same", groups=channels)

    # -- PGD hooks -----------------------------------------------------------------------
    def gradient(self, forward: Forward, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the (undiversified) ``x`` and the processed gradient (DI, TI, norm)."""
        x = x.detach().requires_grad_(True)
        applied = False
        x_in = x
        if self.diversity_prob > 0:
            x_in, applied = self.diversify(x, generator)
        logits = forward(x_in)
        grad, = torch.autograd.grad(self.loss_fn(logits, y, target).sum(), x)
        if applied:  # success is judged on the iterate itself, not on its diversified copy
            with torch.no_grad():
                logits = forward(x.detach())
        if self._kernel is not None:
            grad = self.smooth(grad)
        if self.grad_norm:
            grad = normalize_gradient(grad)
        return logits.detach(), grad

    def direction(self, grad: torch.Tensor, state: dict[str, torch.Tensor],
                  rows: torch.Tensor) -> torch.Tensor:
        """Sign of the momentum ``decay·m + g`` (of ``g`` itself when decay is 0)."""
        if self.decay > 0:
            momentum = state.get("momentum")
            if momentum is None:
                # The first step of a restart sees every row the restart will ever touch.
                momentum = grad.new_zeros((int(rows.max()) + 1, *grad.shape[1:]))
                state["momentum"] = momentum
            grad = grad + momentum[rows] * self.decay
            momentum[rows] = grad
        return grad.sign()


@ATTACKS.register("mi-fgsm", aliases=("mifgsm",))
class MIFGSM(TransferFGSM):
    """MI-FGSM (Dong et al., 2018): iterative FGSM with momentum 1.0 on L1-normalized gradients."""

    name = "mi-fgsm"

    def __init__(self, threat: ThreatModel, *, decay: float = 1.0, **kwargs: Any):
        super().__init__(threat, decay=decay, **kwargs)


@ATTACKS.register("di-fgsm", aliases=("difgsm", "di2-fgsm"))
class DIFGSM(TransferFGSM):
    """DI²-FGSM (Xie et al., 2019): iterative FGSM on randomly resized and padded inputs (p 0.5)."""

    name = "di-fgsm"

    def __init__(self, threat: ThreatModel, *, decay: float = 0.0, diversity_prob: float = 0.5,
                 **kwargs: Any):
        super().__init__(threat, decay=decay, diversity_prob=diversity_prob, **kwargs)


@ATTACKS.register("ti-fgsm", aliases=("tifgsm",))
class TIFGSM(TransferFGSM):
    """TI-FGSM (Dong et al., 2019): iterative FGSM with a Gaussian-smoothed (15×15) gradient."""

    name = "ti-fgsm"

    def __init__(self, threat: ThreatModel, *, ti_kernel: str | None = "gaussian", **kwargs: Any):
        super().__init__(threat, ti_kernel=ti_kernel, **kwargs)


@ATTACKS.register("mdti-fgsm", aliases=("mdtifgsm", "mi-di-ti-fgsm"))
class MDTIFGSM(TransferFGSM):
    """M-DI²-TI-FGSM: momentum 1.0, input diversity (p 0.5) and translation invariance together."""

    name = "mdti-fgsm"

    def __init__(self, threat: ThreatModel, *, decay: float = 1.0, diversity_prob: float = 0.5,
                 ti_kernel: str | None = "gaussian", **kwargs: Any):
        super().__init__(threat, decay=decay, diversity_prob=diversity_prob, ti_kernel=ti_kernel,
                         **kwargs)


def _never_success(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)


def craft_transfer(attack: Attack, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   target: torch.Tensor | None = None, stop_at_surrogate_success: bool = False,
                   seed: int | None = None) -> AttackResult:
    """``attack`` run on ``surrogate`` with the transfer semantics of :func:`transfer_attack`: the
    full budget on every point unless ``stop_at_surrogate_success``. ``seed`` replaces the
    attack's seed for this call (the caller's object is never changed). ``success`` is the
    surrogate's. The surrogate's parameters get no gradient (the attack base freezes them)."""
    crafter = attack
    if not stop_at_surrogate_success or seed is not None:
        crafter = copy.copy(attack)
    if not stop_at_surrogate_success:
        crafter.is_success = _never_success  # shadows the method on this copy only
    if seed is not None:
        crafter.seed = int(seed)
    return crafter(surrogate, x, y, target=target)


def transfer_attack(attack: Attack, surrogate: nn.Module, target_model: nn.Module, x: torch.Tensor,
                    y: torch.Tensor, *, target: torch.Tensor | None = None,
                    stop_at_surrogate_success: bool = False) -> AttackResult:
    """Craft adversarial points on ``surrogate`` and score them on ``target_model``.

    ``success`` is measured on the target model (misclassified, or the target label when
    ``target`` is given), so ``result.robust_accuracy`` is the target's accuracy under transfer.
    ``queries`` counts surrogate queries; ``loss`` is not carried over (a surrogate quantity).

    By default the attack runs its full budget on every point: the surrogate's success neither
    skips points it already misclassifies nor freezes a point at its first iterate adversarial
    *for the surrogate* (the attack is run as a copy whose success test never fires; the caller's
    object is not changed). For the PGD family this is torchattacks' semantics, the standard
    transfer setting: points frozen just across the surrogate's boundary transfer far less
    (resnet20 -> resnet32, MI-FGSM Linf 8/255, 200 CIFAR-10 images: 22% transfer success
    with stopping, 91% without, as torchattacks). ``stop_at_surrogate_success=True`` runs it with
    its white-box semantics. Attacks that judge success by other means than
    :meth:`Attack.is_success` keep their own stopping rule.
    """
    check_batch(x, y)
    crafted = craft_transfer(attack, surrogate, x, y, target=target,
                             stop_at_surrogate_success=stop_at_surrogate_success)
    y = y.to(x.device)
    target = target.to(x.device) if target is not None else None
    forward = Forward(target_model, attack.autocast, attack.channels_last)
    with attack_mode(target_model), torch.no_grad():
        success = attack.is_success(forward.fp32(crafted.x_adv), y, target)
    return AttackResult(x_adv=crafted.x_adv, success=success, queries=crafted.queries)


class Transferred:
    """``attack`` crafted on a fixed surrogate model and scored on the model under evaluation
    (what ``robustkit eval --surrogate`` runs); behaves like an :class:`Attack` for the runner.
    ``surrogate_sha256`` (its checkpoint's) goes into the config, so the leaderboard keeps the
    rows of two checkpoints of one architecture apart."""

    def __init__(self, attack: Attack, surrogate: nn.Module, surrogate_name: str,
                 surrogate_sha256: str = ""):
        self.attack = attack
        self.surrogate = surrogate
        self.surrogate_name = surrogate_name
        self.surrogate_sha256 = surrogate_sha256
        self.threat = attack.threat

    def config(self) -> dict[str, Any]:
        cfg = {**self.attack.config(), "surrogate": self.surrogate_name}
        if self.surrogate_sha256:
            cfg["surrogate_sha256"] = self.surrogate_sha256
        return cfg

    def stage_names(self) -> list[str]:
        return []  # a cascade's stages are scored on the surrogate; only the final outcome transfers

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 target: torch.Tensor | None = None) -> AttackResult:
        return transfer_attack(self.attack, self.surrogate.to(x.device), model, x, y, target=target)
