"""RiFT, Robust Critical Fine-Tuning (Zhu et al., ICCV 2023, arXiv 2308.02533): a
:class:`RiftConfig` and an adversarially trained model in, fine-tuned weights out.

Three stages, as in the reference code (microsoft/robustlearn, ``RiFT/main.py`` and ``utils.py``):

1. **Module robust criticality (MRC).** Adversarial examples are made once by PGD on the AT
   model and then kept fixed. For every ``Conv2d`` and ``Linear`` module, its weight alone is
   pushed uphill on the cross-entropy of those examples (SGD, lr 1, on the negated mean loss,
   ``mrc_epochs`` passes in batches of 512) and, after each pass, pulled back into the ball
   ``||w - w0||_2 <= radius * ||w0||_2`` (radius 0.1). MRC is the largest loss increase seen
   over the passes; the robust-accuracy drop is read at that point. The unperturbed weights are
   in the ball, so MRC >= 0 (the reference starts its maximum at 0, which can report a negative
   value when the ascent overshoots; here the maximum starts at the unperturbed loss).
2. **Fine-tuning** of the module with the smallest MRC (the non-robust-critical one; or
   ``module``) on clean data: only its weight and bias train; SGD with momentum 0.9, weight decay
   5e-4, lr 0.001, batch 128, 10 epochs, lr x0.1 at half-time; random crop (reflect pad 4) and
   horizontal flip on 3-channel images; the epoch with the best held-out clean accuracy is kept.
3. **Interpolation** ``theta(alpha) = (1 - alpha) theta_AT + alpha theta_FT`` for alpha in
   0, 0.1, ..., 1, each evaluated for clean and PGD accuracy on the held-out set; the chosen point
   has the best clean accuracy among those whose PGD accuracy is at least the AT model's
   (minus ``robust_tolerance``, default 0). alpha 0 is the AT model itself, so it is always
   eligible and RiFT never returns a less robust model on that set.

Differences from the reference, all deliberate: the adversarial set for MRC is the first
``mrc_size`` images of the fine-tuning data (the reference attacks the test set); the network
stays in eval mode while fine-tuning (the reference's ``model.train()`` also moves every
BatchNorm's running statistics, so weights outside the chosen module would change); robust
accuracy uses robustkit's PGD (same steps and eps; step 2.5 eps / steps, i.e. 2/255 at 8/255,
where the reference writes 2/225).

Files under ``config.out``: ``model.safetensors`` with its sidecar ``model.json`` (the
``robustkit-train`` format, so ``robustkit eval --checkpoint OUT/model.safetensors`` rebuilds the
model) and ``rift.json`` (criticality table, fine-tuning history, interpolation table, choice).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks import PGD
from robustkit.data import Dataset
from robustkit.defenses.adversarial_training import ascend
from robustkit.errors import UsageError
from robustkit.evaluation.runner import check_model_fits, resolve_device
from robustkit.models import ZooModel, file_sha256, load_model
from robustkit.models.sidecar import (
    SIDECAR_FORMAT,
    load_trained_model,
    normalize_spec,
    read_sidecar,
    save_safetensors,
    sidecar_model_name,
    versions,
    write_text,
)
from robustkit.paths import check_dir
from robustkit.threat import ThreatModel
from robustkit.training.hooks import RunHooks
from robustkit.training.inputs import RunInputs
from robustkit.training.loop import EpochLoop, TrainConfig, TrainEvent, _fingerprint
from robustkit.training.run_state import RunState
from robustkit.units import parse_eps

AUGMENTS = ("auto", "crop-flip", "none")
DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
ProgressFn = Callable[[dict[str, Any]], None]


# -- configuration --------------------------------------------------------------------------------


@dataclass
class RiftConfig(RunInputs):
    """Everything that defines a RiFT run (``robustkit train rift`` options); defaults are the
    reference's except the data sizes and ``eps`` (0.1, the digits default; the paper's 8/255).

    ``model=None``: the model the checkpoint's robustkit sidecar records, else ``digits-cnn``.
    ``val_size`` images of ``val_dataset`` (default ``dataset``) split ``val_split`` are the
    held-out set for the epoch choice and the interpolation. ``mrc_size`` caps the adversarial
    set (default: all fine-tuning images). ``module`` skips the choice by MRC (the reference's
    ``--layer``); ``criticality_only`` stops after the table (the reference's ``--cal_mrc``).
    """

    norm: str = "linf"
    eps: float = 0.1
    attack_steps: int = 10
    attack_step_size: float | None = None
    mrc_size: int | None = None
    mrc_radius: float = 0.1
    mrc_epochs: int = 10
    mrc_lr: float = 1.0
    mrc_batch_size: int = 512
    module: str | None = None
    criticality_only: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "auto"
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    robust_tolerance: float = 0.0
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):
            self.eps = parse_eps(self.eps)
        self.alphas = [float(a) for a in (self.alphas or [])]
        self.validate()

    def validate(self) -> None:
        """A one-line UsageError for any value out of range."""
        if self.out is not None:
            check_dir(self.out, "--out")
        self.threat()
        for name, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--val-size", self.val_size, 1), ("--attack-steps", self.attack_steps, 1),
                                 ("--mrc-epochs", self.mrc_epochs, 1), ("--mrc-batch-size", self.mrc_batch_size, 1),
                                 ("--eval-batch-size", self.eval_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}.")
        for name, value in (("--lr", self.lr), ("--mrc-lr", self.mrc_lr), ("--mrc-radius", self.mrc_radius)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise UsageError(f"{name} must be a positive number, got {value!r}.")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise UsageError("--momentum must be in [0, 1) and --weight-decay >= 0.")
        if self.attack_step_size is not None and not self.attack_step_size > 0:
            raise UsageError(f"--attack-step-size must be positive, got {self.attack_step_size!r}.")
        for name, value in (("--n-examples", self.n_examples), ("--mrc-size", self.mrc_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be at least 1, got {value!r}.")
        if self.augment not in AUGMENTS:
            raise UsageError(f"Unknown --augment {self.augment!r}; accepted: {', '.join(AUGMENTS)}.")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise UsageError(f"--alphas must be numbers in [0, 1], got {self.alphas!r}.")
        if not 0 <= self.robust_tolerance <= 1:
            raise UsageError(f"--robust-tolerance is an accuracy in [0, 1], got {self.robust_tolerance!r}.")

    def threat(self) -> ThreatModel:
        if self.norm not in ("linf", "l2"):
            raise UsageError(f"RiFT's PGD supports the linf and l2 threat models, not {self.norm}.")
        return ThreatModel(self.norm, self.eps)

    def step_size(self) -> float:
        """PGD's step: ``attack_step_size``, else 2.5 eps / steps (2/255 at 8/255 and 10 steps)."""
        return self.attack_step_size if self.attack_step_size is not None else 2.5 * self.eps / self.attack_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_alphas(text: str) -> list[float]:
    """``0:1:0.1`` (start:stop:step, stop included) or ``0,0.5,1`` -> a list of alphas."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            return [round(start + i * step, 10) for i in range(max(n, 0))]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--alphas takes start:stop:step (e.g. 0:1:0.1) or a list (0,0.5,1); got {text!r}.") from None


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Criticality:
    """One module's MRC: the largest increase of the adversarial loss (mean CE) under weight
    perturbations within the relative radius, and the robust-accuracy drop at that point."""

    module: str
    parameters: int
    base_loss: float
    worst_loss: float
    base_acc: float
    worst_acc: float
    relative_norm: float  # ||w - w0|| / ||w0|| at the worst point

    @property
    def mrc(self) -> float:
        return self.worst_loss - self.base_loss

    @property
    def acc_drop(self) -> float:
        return self.base_acc - self.worst_acc

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mrc": self.mrc, "acc_drop": self.acc_drop}


@dataclass
class InterpolationPoint:
    alpha: float
    clean_acc: float
    robust_acc: float
    eligible: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RiftResult:
    """What a run found and produced; ``model`` holds the chosen weights (the AT ones when
    ``criticality_only``)."""

    config: RiftConfig
    model: ZooModel
    criticality: list[Criticality]
    module: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    interpolation: list[InterpolationPoint] = field(default_factory=list)
    alpha: float | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    n_val: int = 0
    weights: Path | None = None
    sidecar: Path | None = None


# -- helpers ---------------------------------------------------------------------------------------


def network(model: nn.Module) -> nn.Module:
    """The network whose modules RiFT names: ``model.net`` of a ZooModel, else ``model``."""
    return model.net if isinstance(model, ZooModel) else model


def candidate_modules(model: nn.Module) -> list[str]:
    """Names (within :func:`network`) of the modules RiFT considers: every ``Conv2d`` and
    ``Linear`` with a weight, in definition order."""
    return [name for name, m in network(model).named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and getattr(m, "weight", None) is not None and name]


def _module(model: nn.Module, name: str) -> nn.Module:
    names = candidate_modules(model)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"No Conv2d/Linear module {name!r} in the model.{hint} Modules: {', '.join(names)}.")
    return network(model).get_submodule(name)


@torch.no_grad()
def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size]).float()
        loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return loss / max(len(x), 1), correct / max(len(x), 1)


def adversarial_set(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, steps: int,
                    step_size: float, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """PGD examples for MRC, made once on the AT model in eval mode: random start, ``steps``
    ascent steps on the cross-entropy, the last iterate of every point (as torchattacks' PGD of
    the reference; not the evaluation attack, which stops at the first adversarial iterate)."""
    was = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    parts = []
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            start = threat.random_init(xb, generator)
            parts.append(ascend(model, xb, start, threat, steps=steps, step_size=step_size,
                                loss_fn=lambda logits, _cur, yb=yb: F.cross_entropy(logits, yb, reduction="sum")))
    finally:
        model.train(was)
    return torch.cat(parts) if parts else x.clone()


def module_criticality(model: nn.Module, name: str, x_adv: torch.Tensor, y: torch.Tensor, *, radius: float = 0.1,
                       epochs: int = 10, lr: float = 1.0, batch_size: int = 512, seed: int = 0) -> Criticality:
    """MRC of module ``name``: gradient ascent on its weight alone over the fixed adversarial
    examples, projected after every pass onto ``||w - w0|| <= radius ||w0||``; the weight is
    restored bit for bit afterwards."""
    module = _module(model, name)
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    w0 = weight.detach().clone()
    norm0 = float(w0.norm())
    was = model.training
    model.eval()
    base_loss, base_acc = _loss_acc(model, x_adv, y, batch_size)
    worst_loss, worst_acc, worst_norm = base_loss, base_acc, 0.0
    generator = torch.Generator().manual_seed(seed)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x_adv), generator=generator).to(x_adv.device)
            for i in range(0, len(x_adv), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x_adv[idx]).float(), y[idx])
                (grad,) = torch.autograd.grad(loss, weight)
                with torch.no_grad():
                    weight.add_(grad, alpha=lr)
            with torch.no_grad():
                diff = weight - w0
                times = float(diff.norm()) / norm0 if norm0 > 0 else 0.0
                if times > radius:
                    weight.copy_(w0 + diff * (radius / times))
                    times = radius
            loss_now, acc_now = _loss_acc(model, x_adv, y, batch_size)
            if loss_now > worst_loss:
                worst_loss, worst_acc, worst_norm = loss_now, acc_now, times
    finally:
        with torch.no_grad():
            weight.copy_(w0)
        model.train(was)
    params = sum(p.numel() for p in module.parameters(recurse=False))
    return Criticality(name, params, base_loss, worst_loss, base_acc, worst_acc, worst_norm)


def criticality_table(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, modules: Sequence[str] | None = None,
                      progress: ProgressFn | None = None, **options: Any) -> list[Criticality]:
    """:func:`module_criticality` of every candidate module (or ``modules``), in model order."""
    names = list(modules) if modules is not None else candidate_modules(model)
    rows = []
    for i, name in enumerate(names):
        rows.append(module_criticality(model, name, x_adv, y, **options))
        if progress:
            progress({"kind": "step", "stage": "criticality", "step": i + 1, "steps": len(names),
                      "status": f"{name}: MRC {rows[-1].mrc:.3f}"})
    return rows


def least_critical(rows: Sequence[Criticality]) -> str:
    """The non-robust-critical module: the smallest MRC (the first of equals)."""
    if not rows:
        raise UsageError("The model has no Conv2d or Linear module to fine-tune.")
    return min(rows, key=lambda r: r.mrc).module


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded image (pad 4 at 32 px, scaled) and a horizontal flip."""
    if kind != "crop-flip":
        return x
    n, _, h, w = x.shape
    pad = max(1, round(4 * h / 32))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    flip = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    for i in range(n):
        if flip[i]:
            out[i] = out[i].flip(-1)
    return out


def resolve_augment(kind: str, data: Dataset) -> str:
    """``auto``: crop and flip for 3-channel images (the reference's CIFAR pipeline), none for
    grey ones (digits are not flip-invariant)."""
    if kind == "auto":
        return "crop-flip" if data.x.shape[1] == 3 else "none"
    return kind


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for _, xb, yb in data.batches(batch_size):
        correct += int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
    return correct / max(len(data), 1)


def robust_accuracy(model: nn.Module, data: Dataset, threat: ThreatModel, device: torch.device, *, steps: int = 10,
                    step_size: float | None = None, seed: int = 0, batch_size: int = 256) -> float:
    """PGD accuracy (robustkit's evaluation PGD: random start, ``steps`` steps)."""
    attack = PGD(threat, steps=steps, step_size=step_size, seed=seed)
    robust = 0
    for _, xb, yb in data.batches(batch_size):
        robust += int((~attack(model, xb.to(device), yb.to(device)).success).sum())
    return robust / max(len(data), 1)


class _FineTuneRun(RunHooks):
    """RiFT's fine-tuning as a run of the one loop: one generator (seeded once) draws every
    epoch's order and the augmentations, the network stays in eval mode with only the chosen
    module in train mode, and the learning rate drops x0.1 at half the epochs (the reference's)."""

    def __init__(self, module: nn.Module, augment: str, generator: torch.Generator, epochs: int):
        self.module, self.augment, self.rng = module, augment, generator
        self.milestone = epochs // 2  # the reference's single lr decay (x0.1) at half the epochs

    def begin_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.epoch = epoch  # no global re-seeding: the one generator runs across the epochs

    def epoch_order(self, n: int, epoch: int, epoch_seed: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.rng)

    def load_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _augment(x[idx], self.augment, self.rng), y[idx]

    def train_mode(self, model: nn.Module) -> None:
        model.eval()
        self.module.train()

    def lr_factor(self, lr_factor: Callable[[float], float], progress: float) -> float:
        return 0.1 if self.milestone and self.epoch >= self.milestone else 1.0


def fine_tune_module(model: nn.Module, name: str, data: Dataset, *, val: Dataset | None = None, epochs: int = 10,
                     batch_size: int = 128, lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4,
                     augment: str = "none", seed: int = 0, device: torch.device | None = None,
                     progress: ProgressFn | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune only module ``name`` of ``model`` on clean ``data`` (in place) and return the
    state dict of the epoch with the best clean accuracy on ``val`` (the last epoch without
    ``val``) and one history row per epoch. Everything else stays bitwise equal: the other
    parameters are frozen and the network stays in eval mode (BatchNorm statistics untouched).
    The epochs are those of the one training loop (:class:`~robustkit.training.loop.EpochLoop`)
    with the standard method's clean cross-entropy step."""
    device = device or torch.device("cpu")
    module = _module(model, name)
    params = list(module.parameters(recurse=False))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    run = _FineTuneRun(module, augment, torch.Generator().manual_seed(seed), epochs)
    config = TrainConfig(method="standard", epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, schedule="constant", val_size=0, seed=seed, device=str(device))

    def on_event(ev: TrainEvent) -> None:
        if progress and ev.kind == "step":
            progress({"kind": "step", "stage": f"fine-tune {ev.epoch + 1}/{epochs}", "step": ev.step,
                      "steps": ev.steps, "status": f"loss {ev.loss:.3f}"})

    loop = EpochLoop(config, model, config.make_strategy(), optimizer, data.x, data.y, device=device, hooks=run,
                     emit=on_event)
    history: list[dict[str, Any]] = []
    best_acc, best_state = -1.0, None
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            totals, _ = loop.run_epoch(epoch)
            val_acc = clean_accuracy(model, val, device) if val is not None else float("nan")
            history.append({"epoch": epoch + 1, "lr": loop.last_lr, "loss": totals["loss"] / len(data),
                            "train_acc": totals["correct"] / len(data), "val_acc": val_acc,
                            "seconds": time.perf_counter() - t0})
            score = val_acc if val is not None else float(epoch)
            if score > best_acc:
                best_acc = score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.eval()
    assert best_state is not None
    return best_state, history


def interpolate(at_state: dict[str, torch.Tensor], ft_state: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * at + alpha * ft`` for the tensors that differ; the others, and every tensor
    at alpha 0 (or 1), are copied exactly from ``at`` (or ``ft``)."""
    if set(at_state) != set(ft_state):
        raise UsageError("The two state dicts to interpolate have different keys.")
    out = {}
    for key, a in at_state.items():
        b = ft_state[key]
        if alpha == 0 or not a.dtype.is_floating_point or torch.equal(a, b):
            out[key] = a.clone()
        elif alpha == 1:
            out[key] = b.clone()
        else:
            out[key] = (1 - alpha) * a + alpha * b
    return out


def select_alpha(points: Sequence[InterpolationPoint], base_robust: float, tolerance: float = 0.0) -> float | None:
    """The reference's rule: among the points whose robust accuracy is at least the AT model's
    (minus ``tolerance``), the best clean accuracy (the smallest alpha of equals); marks each
    point's ``eligible``. None when no point qualifies (keep the AT weights)."""
    best: InterpolationPoint | None = None
    for p in points:
        p.eligible = p.robust_acc >= base_robust - tolerance - 1e-12
        if p.eligible and (best is None or p.clean_acc > best.clean_acc
                           or (p.clean_acc == best.clean_acc and p.alpha < best.alpha)):
            best = p
    return best.alpha if best is not None else None


# -- the procedure ---------------------------------------------------------------------------------


def load_at_model(config: RiftConfig, data: Dataset) -> tuple[ZooModel, dict[str, Any] | None]:
    """The adversarially trained model and the robustkit sidecar of its checkpoint (if any)."""
    side = read_sidecar(config.checkpoint) if config.checkpoint else None
    if side is not None and config.normalize == "default" and config.model in (None, side["model"],
                                                                                 sidecar_model_name(side)):
        return load_trained_model(config.checkpoint), side  # type: ignore[arg-type]
    model = config.model or "digits-cnn"
    zoo = load_model(model, config.checkpoint, normalize=config.normalize, num_classes=data.num_classes)
    return zoo, None


def _datasets(config: RiftConfig) -> tuple[Dataset, Dataset]:
    val = config.held_out()
    assert val is not None  # validate(): val_size >= 1
    return config.training_set(), val


def run_rift(config: RiftConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None,
             data: Dataset | None = None, val: Dataset | None = None) -> RiftResult:
    """Run RiFT as the module docstring describes; ``model``, ``data`` and ``val`` replace
    loading them from ``config``. Writes ``config.out`` when set (not with ``criticality_only``)."""
    config.validate()
    emit = progress or (lambda _e: None)
    device = resolve_device(config.device)
    threat = config.threat()
    if data is None or val is None:
        loaded, held = _datasets(config)
        data = loaded if data is None else data
        val = held if val is None else val
    side = None
    if model is None:
        model, side = load_at_model(config, data)
    check_model_fits(model, data, torch.device("cpu"))
    model.to(device).eval()
    if config.module is not None:
        _module(model, config.module)  # a wrong name fails before the long stages
    if config.out and config.checkpoint and not config.criticality_only:
        target = (Path(config.out).expanduser() / "model.safetensors").resolve()
        if target == Path(config.checkpoint).expanduser().resolve():
            raise UsageError(f"--out {config.out} would overwrite the checkpoint being fine-tuned; "
                             "choose another --out.")
    torch.manual_seed(config.seed)
    at_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # each stage's result is kept in OUT/rift-state until the model is written (--resume reads it back)
    state = RunState(None if config.criticality_only else config.out, "rift-state", config,
                     lambda: {"data.x": data.x, "data.y": data.y, "val.x": val.x, "val.y": val.y,
                              **{f"model.{k}": v for k, v in at_state.items()}},
                     resume=config.resume, what="RiFT run")

    # 1. module robust criticality on fixed PGD examples of the AT model
    stored = state.value("criticality")
    if stored is not None:
        rows = [Criticality(**r) for r in stored]
    else:
        k = min(config.mrc_size or len(data), len(data))
        x, y = data.x[:k].to(device), data.y[:k].to(device)
        emit({"kind": "stage", "stage": "adversarial set", "n": k})
        x_adv = adversarial_set(model, x, y, threat, steps=config.attack_steps, step_size=config.step_size(),
                                seed=config.seed, batch_size=config.eval_batch_size)
        rows = criticality_table(model, x_adv, y, progress=emit, radius=config.mrc_radius, epochs=config.mrc_epochs,
                                 lr=config.mrc_lr, batch_size=config.mrc_batch_size, seed=config.seed)
        state.keep_value("criticality", [dataclasses.asdict(r) for r in rows])
    result = RiftResult(config=config, model=model, criticality=rows, n_val=len(val))
    if config.criticality_only:
        return result
    chosen = config.module or least_critical(rows)
    result.module = chosen

    # 2. fine-tune the non-robust-critical module on clean data
    stored_ft = state.tensors("fine_tuned")
    if stored_ft is not None:
        ft_state, result.history = {k: v.to(device) for k, v in stored_ft[0].items()}, stored_ft[1]
    else:
        augment = resolve_augment(config.augment, data)
        ft_state, result.history = fine_tune_module(
            model, chosen, data, val=val, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            momentum=config.momentum, weight_decay=config.weight_decay, augment=augment, seed=config.seed,
            device=device, progress=emit)
        state.keep_tensors("fine_tuned", ft_state, result.history)

    # 3. interpolate and keep the best clean accuracy that loses no robust accuracy
    def measure(label: str, weights: Callable[[], dict[str, torch.Tensor]]) -> tuple[float, float]:
        measured = state.value("interpolation") or {}
        if label in measured:
            return tuple(measured[label])
        model.load_state_dict(weights())
        clean = clean_accuracy(model, val, device, config.eval_batch_size)
        robust = robust_accuracy(model, val, threat, device, steps=config.attack_steps,
                                 step_size=config.step_size(), seed=config.seed, batch_size=config.eval_batch_size)
        state.keep_value("interpolation", {**measured, label: [clean, robust]})
        return clean, robust

    base_clean, base_robust = measure("before", lambda: at_state)
    result.before = {"clean_acc": base_clean, "robust_acc": base_robust}
    for i, alpha in enumerate(config.alphas):
        clean, robust = (base_clean, base_robust) if alpha == 0 else measure(
            f"alpha={alpha!r}", lambda alpha=alpha: interpolate(at_state, ft_state, alpha))
        result.interpolation.append(InterpolationPoint(alpha, clean, robust))
        emit({"kind": "step", "stage": "interpolation", "step": i + 1, "steps": len(config.alphas),
              "status": f"alpha {alpha:g}: clean {clean:.1%}, PGD {robust:.1%}"})
    result.alpha = select_alpha(result.interpolation, base_robust, config.robust_tolerance)
    alpha = result.alpha if result.alpha is not None else 0.0
    model.load_state_dict(interpolate(at_state, ft_state, alpha))
    model.eval()
    chosen_point = next((p for p in result.interpolation if p.alpha == alpha), None)
    result.after = ({"clean_acc": chosen_point.clean_acc, "robust_acc": chosen_point.robust_acc}
                    if chosen_point else dict(result.before))
    if config.out:
        result.weights, result.sidecar = save_rift(Path(config.out).expanduser(), result, data, val, side)
    state.clear()
    return result


def save_rift(out: Path, result: RiftResult, data: Dataset, val: Dataset,
              side: dict[str, Any] | None) -> tuple[Path, Path]:
    """``model.safetensors`` + ``model.json`` (robustkit-train sidecar) + ``rift.json``."""
    out.mkdir(parents=True, exist_ok=True)
    zoo, config = result.model, result.config
    weights = out / "model.safetensors"
    base_model = side["model"] if side else zoo.name
    save_safetensors(zoo.net.state_dict(), weights, metadata={"format": SIDECAR_FORMAT, "model": base_model})
    report = {
        "module": result.module, "alpha": result.alpha, "before": result.before, "after": result.after,
        "criticality": [r.as_dict() for r in result.criticality], "fine_tune": result.history,
        "interpolation": [p.as_dict() for p in result.interpolation],
    }  # fmt: skip
    sidecar = {
        "format": SIDECAR_FORMAT,
        "model": base_model,
        "normalize": side["normalize"] if side else normalize_spec(zoo.normalization),
        "num_classes": side["num_classes"] if side else data.num_classes,
        "in_channels": side["in_channels"] if side else int(data.x.shape[1]),
        "input_size": side.get("input_size", list(data.x.shape[1:])) if side else list(data.x.shape[1:]),
        "architecture": side.get("architecture", []) if side else [],
        "weights": "rift",
        "sha256": file_sha256(weights),
        "recipe": {"method": "rift", "base_checkpoint": config.checkpoint, "module": result.module,
                   "alpha": result.alpha, "config": config.to_dict()},
        "data": {"dataset": data.name, "split": config.split, "n_examples": len(data), "sha256": _fingerprint(data),
                 "val_dataset": val.name, "val_split": config.val_split, "val_size": len(val)},
        "seed": config.seed,
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
        "final_metrics": result.after,
        "rift": report,
    }
    path = weights.with_suffix(".json")
    write_text(path, json.dumps(sidecar, indent=1, default=str))
    write_text(out / "rift.json", json.dumps(report, indent=1, default=str))
    return weights, path
