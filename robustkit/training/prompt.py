"""Training an EVP visual prompt: a :class:`PromptConfig` in, a trained prompt file and metrics out.

The backbone is frozen and stays in eval mode; the only trained values are the frame's pixels
(:class:`~robustkit.models.prompted.PromptedModel`). One step, as in EVP's ``main.py``
(``train_with_prompt``), with input diversity added as the paper describes::

    z     = compose(x)                          # shrunk image, learned frame around it
    z     = DI(z)                               # with probability p: random resize + zero pad
    g     = ∇_frame CE(map(backbone(z)), y)     # batch-mean cross-entropy
    frame = frame - lr_t · g / ||g||_2          # gradient normalization (plain SGD when off)

``lr_t`` follows a cosine from ``lr`` to 0 over the run (the reference steps it per epoch; here per
step). DI and the normalization are those of the transfer attacks (``robustkit.attacks.transfer``:
:func:`~robustkit.attacks.transfer.diversify`, :func:`~robustkit.attacks.transfer.normalize_gradient`).
Defaults come from the reference (``main.py``): SGD without momentum or weight decay, lr 70 for its
30-px frame at 224 px (scaled here by the frame size, :func:`~robustkit.models.prompted.reference_lr`),
batch 256, 1000 epochs, a zero-initialized frame. The input-diversity probability 0.5 and resize
rate 0.9 are DI's (Xie et al.), which the paper adopts; the released code has no DI.

Files under ``out``: ``prompt.safetensors`` with its sidecar ``prompt.json`` and ``metrics.json``;
``prompt-state/`` holds the last finished epoch until then (``resume`` continues from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn.functional as F
from torch import nn

from robustkit import __version__
from robustkit.attacks.transfer import diversify, normalize_gradient
from robustkit.data import Dataset
from robustkit.defenses.adversarial_training import StepOutput
from robustkit.errors import UsageError
from robustkit.evaluation.runner import resolve_device
from robustkit.models import file_sha256, load_model
from robustkit.models.prompted import (
    LABEL_MAPS,
    PromptedModel,
    default_prompt_size,
    frequency_label_map,
    normalize_spec,
    reference_lr,
    resolve_label_map,
    save_prompt,
)
from robustkit.paths import check_dir
from robustkit.training.hooks import RunHooks
from robustkit.training.inputs import RunInputs
from robustkit.training.loop import EpochLoop, TrainConfig, TrainEvent
from robustkit.training.run_state import RunState

SCHEDULES = ("cosine", "constant")


@dataclass
class PromptConfig(RunInputs):
    """Everything that defines a prompt-training run (``robustkit train prompt`` options).

    ``prompt_size=None``: the paper's 30 px at 224 px, scaled to the backbone's input (4 at 32).
    ``lr=None``: :func:`~robustkit.models.prompted.reference_lr` of the frame (70 at the paper's
    geometry) — meant for normalized updates; pass ``lr`` with ``grad_norm=False``.
    ``label_map``: ``auto`` (frequency mapping when the class counts differ), ``frequency`` or
    ``identity``. ``val_size`` images of ``val_dataset`` (default ``dataset``), split ``val_split``,
    give the clean accuracy after every epoch (0: none).
    """

    prompt_size: int | None = None
    label_map: str = "auto"
    epochs: int = 1000
    batch_size: int = 256
    lr: float | None = None
    schedule: str = "cosine"
    input_diversity: bool = True
    diversity_prob: float = 0.5
    resize_rate: float = 0.9
    grad_norm: bool = True
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A one-line UsageError for any value out of range."""
        if self.out is not None:
            check_dir(self.out, "--out")
        for name, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--val-size", self.val_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}.")
        if self.lr is not None and not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr!r}.")
        if self.prompt_size is not None and (isinstance(self.prompt_size, bool) or not isinstance(self.prompt_size, int)
                                             or self.prompt_size < 1):
            raise UsageError(f"--prompt-size must be a positive number of pixels, got {self.prompt_size!r}.")
        if self.label_map not in LABEL_MAPS:
            raise UsageError(f"Unknown --label-map {self.label_map!r}; accepted: {', '.join(LABEL_MAPS)}.")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"Unknown --schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}.")
        if not 0.0 <= self.diversity_prob <= 1.0:
            raise UsageError(f"--diversity-prob is a probability in [0, 1], got {self.diversity_prob}.")
        if not self.resize_rate > 0 or self.resize_rate == 1.0:
            raise UsageError(f"--resize-rate must be positive and not 1 (0.9 shrinks), got {self.resize_rate}.")
        if self.n_examples is not None and self.n_examples < 1:
            raise UsageError(f"--n-examples must be at least 1, got {self.n_examples}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PromptResult:
    """The trained prompted model and what happened."""

    config: PromptConfig
    model: PromptedModel
    lr: float
    label_map_kind: str
    history: list[dict[str, Any]]
    weights: Path | None = None
    sidecar: Path | None = None


ProgressFn = Callable[[dict[str, Any]], None]


# -- one step --------------------------------------------------------------------------------------


def prompt_update(grad: torch.Tensor, lr: float, *, grad_norm: bool = True) -> torch.Tensor:
    """What the frame loses in one step: ``lr · g / ||g||_2`` (EVP), or ``lr · g`` without the
    normalization."""
    return lr * (normalize_gradient(grad, kind="l2", per_sample=False) if grad_norm else grad)


@dataclass
class StepResult:
    loss: float
    logits: torch.Tensor
    update: torch.Tensor
    diversified: bool


class PromptStrategy:
    """The prompt's per-batch step as a training method of the one loop
    (:class:`~robustkit.training.hooks.TrainingHooks`): compose, input diversity (counted in
    ``diversified``), the mapped backbone logits and their cross-entropy. The frame's update is
    :class:`NormalizedStep`'s."""

    name = "evp"
    adversarial = False
    default_schedule = "cosine"
    soft_targets = False
    aux: nn.Module | None = None
    aux_name = "aux"

    def __init__(self, *, input_diversity: bool = True, diversity_prob: float = 0.5, resize_rate: float = 0.9):
        self.input_diversity, self.diversity_prob, self.resize_rate = input_diversity, diversity_prob, resize_rate
        self.diversified = 0  # steps whose batch input diversity changed

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "input_diversity": self.input_diversity, "diversity_prob": self.diversity_prob,
                "resize_rate": self.resize_rate}

    def prepare_model(self, model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
        return []

    def set_eps(self, eps: float) -> None:
        """Prompting trains on clean images: no radius."""

    def passes_per_image(self) -> float | None:
        return None

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        assert isinstance(model, PromptedModel)
        inputs = model.compose(x)
        if self.input_diversity:
            inputs, diversified = diversify(inputs, generator, prob=self.diversity_prob, resize_rate=self.resize_rate)
            self.diversified += int(diversified)
        logits = model.map_labels(model.backbone(inputs))
        return StepOutput(F.cross_entropy(logits, y), logits.detach())


class NormalizedStep(torch.optim.Optimizer):
    """EVP's update of the frame: ``p -= lr · g / ||g||_2`` (:func:`prompt_update`; plain
    ``lr · g`` with ``grad_norm=False``)."""

    def __init__(self, params: list[torch.Tensor], lr: float, *, grad_norm: bool = True):
        super().__init__(params, {"lr": lr, "grad_norm": grad_norm})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - the Optimizer signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(prompt_update(p.grad, group["lr"], grad_norm=group["grad_norm"]))


def prompt_step(model: PromptedModel, x: torch.Tensor, y: torch.Tensor, lr: float, generator: torch.Generator, *,
                input_diversity: bool = True, diversity_prob: float = 0.5, resize_rate: float = 0.9,
                grad_norm: bool = True) -> StepResult:
    """One training step on the frame (in place); no gradient reaches the backbone."""
    strategy = PromptStrategy(input_diversity=input_diversity, diversity_prob=diversity_prob, resize_rate=resize_rate)
    out = strategy.step(model, x, y, generator)
    grad, = torch.autograd.grad(out.loss, model.frame)
    update = prompt_update(grad, lr, grad_norm=grad_norm)
    with torch.no_grad():
        model.frame.sub_(update)
    return StepResult(float(out.loss.detach()), out.logits, update, bool(strategy.diversified))


class _PromptRun(RunHooks):
    """Prompt training as a run of the one loop: one generator (seeded once) for the data order,
    one for input diversity, both running across the epochs; a cosine (or constant) learning rate
    per step."""

    def __init__(self, order: torch.Generator, diversity: torch.Generator, schedule: str, epochs: int):
        self.order, self.diversity, self.schedule, self.epochs = order, diversity, schedule, epochs

    def begin_epoch(self, epoch: int, epoch_seed: int) -> None:
        """No re-seeding: the generators run across the epochs (as the reference's loaders)."""

    def epoch_order(self, n: int, epoch: int, epoch_seed: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.order)

    def generator(self, epoch_seed: int, device: torch.device) -> torch.Generator:
        return self.diversity

    def lr_factor(self, lr_factor: Callable[[float], float], progress: float) -> float:
        frac = progress / self.epochs
        return 0.5 * (1 + math.cos(math.pi * frac)) if self.schedule == "cosine" else 1.0


# -- helpers ---------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``model``'s argmax on ``x``, batch by batch (on the CPU)."""
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Clean accuracy of ``model`` on ``data``."""
    model.eval()
    return float((predict(model, data.x, device, batch_size) == data.y).float().mean()) if len(data) else float("nan")


def _backbone_input_size(backbone: nn.Module) -> tuple[int, int, int]:
    info = getattr(backbone, "info", None)
    if info is None:
        raise UsageError("The backbone's input size is unknown; load it with robustkit.models.load_model.")
    return tuple(int(v) for v in info.input_size)  # type: ignore[return-value]


def _fingerprint(data: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(data.x.numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {"robustkit": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def build_prompted_model(config: PromptConfig, backbone: nn.Module, data: Dataset,
                         device: torch.device) -> tuple[PromptedModel, str]:
    """The zero-initialized prompted model for ``data`` with its label mapping (and its kind):
    the frequency mapping is measured on ``data`` as prompted at initialization (empty frame)."""
    input_size = _backbone_input_size(backbone)
    prompt_size = config.prompt_size or default_prompt_size(min(input_size[1:]))
    model = PromptedModel(backbone, input_size=input_size, prompt_size=prompt_size).to(device)
    with torch.no_grad():
        num_source = int(model(data.x[:1].to(device)).shape[1])
    kind = resolve_label_map(config.label_map, num_source, data.num_classes)
    if kind == "frequency":
        preds = predict(model, data.x, device, config.batch_size)
        model.label_map = frequency_label_map(preds, data.y, data.num_classes, num_source).to(device)
    elif data.num_classes != num_source:
        model.label_map = torch.arange(data.num_classes, device=device)
    return model, kind


# -- the loop --------------------------------------------------------------------------------------


def train_prompt(config: PromptConfig, *, backbone: nn.Module | None = None, data: Dataset | None = None,
                 val: Dataset | None = None, progress: ProgressFn | None = None) -> PromptResult:
    """Train an EVP prompt for ``config.model`` on ``config.dataset``; see the module docstring.

    ``backbone`` (a ZooModel from ``load_model``), ``data`` and ``val`` replace loading them from
    the config. ``progress(event)`` gets dicts with ``kind`` step or epoch.
    """
    config.validate()
    emit = progress or (lambda _e: None)
    device = resolve_device(config.device)
    if backbone is None:
        if not config.model:
            raise UsageError("Name the frozen backbone with --model (and its weights with --checkpoint).")
        backbone = load_model(config.model, config.checkpoint, normalize=config.normalize)
    if data is None:
        data = config.training_set()
    if val is None:
        val = config.held_out()

    torch.manual_seed(config.seed)
    model, kind = build_prompted_model(config, backbone, data, device)
    lr = float(config.lr) if config.lr is not None else reference_lr(model.trainable_parameters())
    strategy = PromptStrategy(input_diversity=config.input_diversity, diversity_prob=config.diversity_prob,
                              resize_rate=config.resize_rate)
    run = _PromptRun(torch.Generator().manual_seed(config.seed),
                     torch.Generator(device=device).manual_seed(config.seed + 1), config.schedule, config.epochs)
    loop_config = TrainConfig(method="standard", epochs=config.epochs, batch_size=config.batch_size, lr=lr,
                              val_size=0, seed=config.seed, device=str(device))

    def on_event(ev: TrainEvent) -> None:
        if ev.kind == "step":
            emit({"kind": "step", "epoch": ev.epoch, "epochs": config.epochs, "step": ev.step, "steps": ev.steps,
                  "loss": ev.loss, "lr": ev.info["lr"]})

    loop = EpochLoop(loop_config, model, strategy, NormalizedStep([model.frame], lr, grad_norm=config.grad_norm),
                     data.x, data.y, device=device, hooks=run, emit=on_event)
    n = len(data)
    # every finished epoch (frame, generators, history) is kept in OUT/prompt-state until the prompt
    # is written; --resume continues from the last one
    held_out = {"val.x": val.x, "val.y": val.y} if val is not None else {}
    state = RunState(config.out, "prompt-state", config,
                     lambda: {"data.x": data.x, "data.y": data.y, **held_out,
                              **{f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
                     resume=config.resume, what="prompt training run")
    history: list[dict[str, Any]] = []
    stored = state.tensors("epoch")
    if stored is not None:
        tensors, saved = stored
        with torch.no_grad():
            model.frame.copy_(tensors["frame"].to(device))
        run.order.set_state(tensors["order"])
        run.diversity.set_state(tensors["diversity"])
        history, loop.global_step = saved["history"], saved["global_step"]
    for epoch in range(len(history), config.epochs):
        t0 = time.perf_counter()
        strategy.diversified = 0
        totals, _ = loop.run_epoch(epoch)
        row = {"epoch": epoch + 1, "lr": loop.last_lr, "loss": totals["loss"] / n, "train_acc": totals["correct"] / n,
               "diversified_steps": strategy.diversified, "seconds": time.perf_counter() - t0,
               "val_acc": accuracy(model, val, device, config.batch_size) if val is not None else float("nan")}
        history.append(row)
        state.keep_tensors("epoch", {"frame": model.frame, "order": run.order.get_state(),
                                     "diversity": run.diversity.get_state()},
                           {"history": history, "global_step": loop.global_step})
        emit({"kind": "epoch", **row, "epochs": config.epochs})
    model.eval()
    result = PromptResult(config, model, lr, kind, history)
    if config.out:
        out = Path(config.out).expanduser()
        checkpoint = getattr(backbone, "checkpoint", None) or config.checkpoint
        sidecar = {
            "method": "evp",
            "backbone": {
                "model": getattr(backbone, "name", config.model),
                "checkpoint": str(Path(checkpoint).resolve()) if checkpoint and Path(checkpoint).is_file() else None,
                "sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
                "normalize": normalize_spec(backbone),
            },
            "label_map_kind": kind,
            "target": {"dataset": data.name, "split": config.split, "n_examples": len(data),
                       "num_classes": data.num_classes, "image_size": list(data.x.shape[1:]),
                       "sha256": _fingerprint(data)},
            "recipe": {**config.to_dict(), "lr": lr, "prompt_size": model.prompt_size,
                       "reference": "UCSC-VLAA/EVP main.py (train_with_prompt); arXiv 2212.10556"},
            "seed": config.seed,
            "history": history,
            "final_metrics": history[-1] if history else {},
            "versions": _versions(),
            "command": " ".join(sys.argv) if sys.argv else "",
        }
        result.weights, result.sidecar = save_prompt(model, out / "prompt.safetensors", sidecar)
        (out / "metrics.json").write_text(json.dumps({"epochs": history}, indent=1))
    state.clear()
    return result


__all__ = ["NormalizedStep", "PromptConfig", "PromptResult", "PromptStrategy", "StepResult", "accuracy",
           "build_prompted_model", "prompt_step", "prompt_update", "train_prompt"]
