"""The training loop: a :class:`TrainConfig` in, a trained model, metrics and files out.

Training methods are strategies registered in ``DEFENSES`` with ``kind = "training"``
(``defenses/adversarial_training.py``); the loop here owns everything else — data order, the
optimizer and its schedule, autocast, channels_last, gradient clipping, EMA weights, the
catastrophic-overfitting detector, per-epoch checkpoints with resume, metrics files, and the
final ``.safetensors`` weights with a JSON sidecar that ``read_sidecar`` reads back.

Files written under ``config.out``::

    config.yaml                      the resolved configuration (``--config`` reads it back)
    metrics.csv, metrics.json        one row per epoch (+ every CO check in the JSON)
    checkpoint/state.json            progress, detector state, history; points at the latest
    checkpoint/epoch-NNNN/           model.safetensors, optimizer.pt (weights_only), ema.safetensors,
                                     aux.safetensors (a strategy's extra trained modules)
    model.safetensors, model.json    final network weights and their sidecar
    projection.safetensors           the extra modules, named by the strategy (distillation's projections)

Determinism: the global RNG, the data order and the attacks' generator are re-seeded from
``(seed, epoch)`` at every epoch start and the learning rate is a pure function of progress, so a
run resumed from its last epoch checkpoint ends with the same weights as an uninterrupted one
(on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from robustkit.data import Dataset, load_dataset, load_held_out
from robustkit.errors import CheckpointError, UsageError
from robustkit.evaluation.runner import check_model_fits, resolve_device
from robustkit.models import (
    ZooModel,
    build_model,
    is_external,
    load_model,
    load_state_dict,
    model_info,
)
from robustkit.models.normalize import training_normalize
from robustkit.models.sidecar import (
    SIDECAR_FORMAT,
    cpu_state,
    normalize_spec,
    read_sidecar,
    save_safetensors,
    sidecar_model_name,
    sidecar_path,
    versions,
    write_text,
)
from robustkit.paths import check_dir
from robustkit.registry import MODELS
from robustkit.threat import ThreatModel
from robustkit.training.co_detector import COCheck, CODetector
from robustkit.training.hooks import TrainingHooks
from robustkit.training.optim import OPTIMIZERS, SCHEDULES, lr_factor, make_optimizer
from robustkit.units import parse_eps

log = logging.getLogger("robustkit.training.loop")

ON_CO = ("continue", "stop", "rollback")
AUTOCAST = ("bf16", "fp16")
#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "device", "eval_attacks", "eval_n_examples", "db", "out"})
MAX_ROLLBACKS = 3
METRIC_COLUMNS = (
    "epoch", "steps", "lr", "loss", "train_acc", "clean_acc", "fgsm_acc", "pgd_acc", "co", "co_reason",
    "seconds", "eval_seconds", "rollbacks",
)  # fmt: skip


# -- configuration --------------------------------------------------------------------------


def _eps_text(eps: float) -> str | float:
    """``8/255`` when that is exactly ``eps``, else the number (kept exact in YAML)."""
    k = round(eps * 255)
    if k and float(Fraction(k, 255)) == eps:
        return f"{k}/255"
    return eps


@dataclass
class TrainConfig:
    """Everything that defines a training run; round-trips through YAML (:meth:`to_yaml`).

    ``eps`` accepts ``8/255`` text in YAML. ``schedule=None`` uses the method's default
    (``cyclic`` for fgsm-rs, ``multistep`` otherwise); ``milestones`` are fractions of the run.
    ``val_size`` images of ``val_dataset`` (default: ``dataset``) split ``val_split`` form the
    fixed held-out batch for the per-epoch clean/FGSM/PGD accuracy and the CO detector
    (``val_size=0`` turns both off). ``eps_warmup_epochs`` ramps the training eps linearly from
    0 (the held-out metrics always use the full eps). ``co_every`` adds a CO check every N steps (0: at epoch ends
    only). ``ema`` is the decay of an exponential moving average of the weights; when set, the
    final weights are the EMA ones. ``mix`` (mixup, cutmix or sdmp; :mod:`robustkit.training.mixing`)
    mixes every training batch before the method makes it adversarial and trains on soft labels;
    ``mix_alpha`` is the Beta(alpha, alpha) of mixup and CutMix.
    """

    method: str = "pgd-at"
    model: str = "digits-cnn"
    checkpoint: str | None = None
    normalize: str | None = "default"
    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "train"
    n_examples: int | None = None
    val_dataset: str | None = None
    val_split: str = "test"
    val_size: int = 256
    norm: str = "linf"
    eps: float = 0.1
    eps_warmup_epochs: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str | None = None
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    ema: float | None = None
    autocast: str | None = None
    channels_last: bool = False
    same_budget: bool = False
    attack_steps: int | None = None
    attack_step_size: float | None = None
    beta: float | None = None
    tricks: list[str] = field(default_factory=list)
    mask_ratio: float = 0.4
    mask_pattern: str = "random"
    stride: int = 2
    activation: str = "silu"
    reg_lambda: float = 0.1
    reg_p: float = 2.0
    mix: str | None = None
    mix_alpha: float = 1.0
    co_every: int = 0
    on_co: str = "continue"
    co_ratio: float = 1 / 3
    co_gap: float = 0.2
    co_min_best: float = 0.1
    co_patience: int = 2
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    eval_attacks: list[str] = field(default_factory=list)
    eval_n_examples: int | None = None
    db: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):
            self.eps = parse_eps(self.eps)
        self.tricks = list(dict.fromkeys(str(t).strip().lower() for t in self.tricks or []))
        self.eval_attacks = list(self.eval_attacks or [])
        self.milestones = [float(m) for m in self.milestones]
        self.validate()

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a one-line UsageError for any value out of range (names are checked too)."""
        from robustkit.defenses.adversarial_training import build_strategy
        from robustkit.training.mixing import make_mixer

        self.threat()
        build_strategy(self.method, self.threat(), **self.strategy_options())
        mixer = make_mixer(self.mix, 2, self.mix_alpha)
        self.mix = mixer.name if mixer else None
        for name, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--val-size", self.val_size, 0), ("--co-every", self.co_every, 0),
                                 ("--co-patience", self.co_patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr!r}.")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise UsageError(f"Unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}.")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UsageError(f"Unknown schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}.")
        if self.on_co not in ON_CO:
            raise UsageError(f"Unknown --on-co {self.on_co!r}; accepted: {', '.join(ON_CO)}.")
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise UsageError(f"--autocast must be bf16 or fp16, got {self.autocast!r}.")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UsageError(f"--ema is a decay in (0, 1), e.g. 0.999; got {self.ema!r}.")
        if not (isinstance(self.eps_warmup_epochs, int | float) and self.eps_warmup_epochs >= 0):
            raise UsageError(f"--eps-warmup-epochs must be >= 0, got {self.eps_warmup_epochs!r}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip!r}.")
        if self.n_examples is not None and self.n_examples < 1:
            raise UsageError(f"--n-examples must be at least 1, got {self.n_examples}.")
        if self.out is not None:
            check_dir(self.out, "--out")
        if self.eval_attacks:
            if self.out is None:
                raise UsageError("--eval evaluates the saved checkpoint; give --out as well.")
            from robustkit.evaluation.attack_spec import canonical_attack

            for name in self.eval_attacks:
                canonical_attack(name)  # unknown attacks fail before training, not after
        if not 0 < self.co_ratio < 1 or not 0 <= self.co_gap <= 1 or not 0 <= self.co_min_best <= 1:
            raise UsageError("co_ratio must be in (0, 1) and co_gap, co_min_best in [0, 1].")

    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    def trick_options(self) -> Any:
        from robustkit.defenses.fgsm_tricks import TrickOptions

        return TrickOptions(
            tuple(self.tricks), mask_ratio=self.mask_ratio, mask_pattern=self.mask_pattern, stride=self.stride,
            activation=self.activation, reg_lambda=self.reg_lambda, reg_p=self.reg_p,
        )  # fmt: skip

    def strategy_options(self) -> dict[str, Any]:
        return {
            "steps": self.attack_steps, "step_size": self.attack_step_size, "beta": self.beta,
            "tricks": self.trick_options(), "seed": self.seed,
        }  # fmt: skip

    def make_strategy(self) -> TrainingHooks:
        """The training strategy the loop calls (subclasses such as distillation wrap it)."""
        from robustkit.defenses.adversarial_training import build_strategy

        return build_strategy(self.method, self.threat(), **self.strategy_options())

    def resolved_schedule(self) -> str:
        from robustkit.defenses.adversarial_training import build_strategy

        if self.schedule is not None:
            return self.schedule
        return build_strategy(self.method, self.threat(), **self.strategy_options()).default_schedule

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types; ``eps`` as ``k/255`` text when exact."""
        d = dataclasses.asdict(self)
        d["eps"] = _eps_text(self.eps)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (YAML); unknown keys are a one-line error with a did-you-mean."""
        if not isinstance(data, dict):
            raise UsageError(f"A training config must be a mapping of option: value, got {type(data).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = [k for k in clean if k not in names]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"Unknown training option {unknown[0]!r}.{hint}")
        try:
            return cls(**clean)
        except TypeError as e:
            raise UsageError(f"Bad training config: {e}.") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike[str]) -> TrainConfig:
        """Read a config from YAML text or a ``.yaml``/``.yml`` file path."""
        text = str(text_or_path)
        path = Path(text)
        if isinstance(text_or_path, os.PathLike) or ("\n" not in text and path.suffix.lower() in (".yaml", ".yml")):
            if not path.is_file():
                raise UsageError(f"Config file not found: {path}.")
            text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"Cannot read the training config as YAML ({str(e).splitlines()[0]}).") from None
        return cls.from_dict(data)


# -- results and progress ------------------------------------------------------------------------


@dataclass
class TrainEvent:
    """What ``progress`` receives: ``kind`` is start, step, check, co, epoch or end."""

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """The trained model (final weights: EMA ones when enabled) and what happened."""

    config: TrainConfig
    model: ZooModel
    history: list[dict[str, Any]]
    checks: list[COCheck]
    co_detected: bool
    stopped_early: bool
    weights: Path | None = None
    sidecar: Path | None = None
    architecture: list[dict[str, Any]] = field(default_factory=list)
    eval_report: Any = None
    aux: nn.Module | None = None
    aux_weights: Path | None = None


# -- helpers ---------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point state (buffers copied as they are)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach(), 1 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


def _fingerprint(data: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(data.x.numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    return digest.hexdigest()


def build_training_model(config: TrainConfig, data: Dataset) -> ZooModel:
    """A fresh (or ``config.checkpoint``-initialized) ZooModel for ``data``: classes and input
    channels from the data, the normalization ``config.normalize`` asks for in front."""
    key = config.model if is_external(config.model) else MODELS.canonical(config.model)
    info = model_info(key)
    channels = int(data.x.shape[1])
    if config.checkpoint:
        zoo = load_model(key, config.checkpoint, normalize=config.normalize, num_classes=data.num_classes)
        return zoo.train()
    in_channels = channels if channels != info.input_size[0] else None
    net = build_model(key, num_classes=data.num_classes, in_channels=in_channels)
    layer, note = training_normalize(config.normalize, info.normalize, channels, key, data.name)
    if note:
        log.warning(note)
    return ZooModel(key, info, net, layer).train()


# -- checkpoints ----------------------------------------------------------------------------------


class _Checkpoints:
    """Per-epoch checkpoints under ``out/checkpoint``: a new folder per epoch, then ``state.json``
    is replaced atomically to point at it, then older folders are removed — a kill at any moment
    leaves a consistent latest checkpoint."""

    def __init__(self, out: Path):
        self.root = out / "checkpoint"
        self.state_path = self.root / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"Cannot read the training checkpoint {self.state_path} ({e}).") from None

    def save(
        self, epoch: int, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
        ema: EMA | None, healthy: dict[str, Any] | None, aux: nn.Module | None = None,
    ) -> None:  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:04d}"
        folder = self.root / name
        if folder.exists():
            shutil.rmtree(folder)
        tmp = self.root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_safetensors(model.state_dict(), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if ema is not None:
            save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
        if aux is not None:
            save_safetensors(aux.state_dict(), tmp / "aux.safetensors")
        if healthy is not None:
            save_safetensors(healthy["model"], tmp / "healthy.safetensors")
            torch.save(healthy["optimizer"], tmp / "healthy_optimizer.pt")
            if healthy.get("ema") is not None:
                save_safetensors(healthy["ema"], tmp / "healthy_ema.safetensors")
            if healthy.get("aux") is not None:
                save_safetensors(healthy["aux"], tmp / "healthy_aux.safetensors")
        os.replace(tmp, folder)
        write_text(self.state_path, json.dumps({**state, "dir": name}, indent=1))
        for old in self.root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
        aux: nn.Module | None = None,
    ) -> dict[str, Any] | None:  # fmt: skip
        """Load weights, optimizer and EMA into place; return the healthy snapshot, if saved."""
        folder = self.root / state["dir"]
        try:
            model.load_state_dict(load_state_dict(folder / "model.safetensors"))
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"The checkpoint in {folder} does not fit this model ({first}).") from None
        if aux is not None:
            if not (folder / "aux.safetensors").is_file():
                raise CheckpointError(f"{folder} has no aux.safetensors (the strategy's extra modules).")
            aux.load_state_dict(load_state_dict(folder / "aux.safetensors"))
        optimizer.load_state_dict(_torch_load(folder / "optimizer.pt"))
        if ema is not None:
            if not (folder / "ema.safetensors").is_file():
                raise CheckpointError(f"{folder} has no EMA weights but --ema is set; resume with the same options.")
            ema.load_state_dict(load_state_dict(folder / "ema.safetensors"))
        if (folder / "healthy.safetensors").is_file():
            return {
                "model": load_state_dict(folder / "healthy.safetensors"),
                "optimizer": _torch_load(folder / "healthy_optimizer.pt"),
                "ema": load_state_dict(folder / "healthy_ema.safetensors")
                if (folder / "healthy_ema.safetensors").is_file()
                else None,
                "aux": load_state_dict(folder / "healthy_aux.safetensors")
                if (folder / "healthy_aux.safetensors").is_file()
                else None,
                "best_pgd": state.get("healthy_best_pgd", 0.0),
            }
        return None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable checkpoint
        raise CheckpointError(f"Cannot read {path} safely ({type(e).__name__}: {e}).") from None


def _write_metrics(out: Path, history: list[dict[str, Any]], checks: list[COCheck], extra: dict[str, Any]) -> None:
    columns = list(METRIC_COLUMNS) + sorted({k for row in history for k in row} - set(METRIC_COLUMNS))
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in columns})
    os.replace(tmp, out / "metrics.csv")
    payload = {"epochs": history, "co_checks": [c.as_dict() for c in checks], **extra}
    write_text(out / "metrics.json", json.dumps(payload, indent=1))


# -- the loop --------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None) -> TrainResult:
    """Train ``config.model`` with ``config.method``; see the module docstring for the files.

    ``model`` replaces building from ``config.model`` (e.g. a ZooModel from ``load_model``).
    ``progress(event)`` receives :class:`TrainEvent` objects (steps, checks, epochs).
    """
    from robustkit.training.mixing import make_mixer

    config.validate()
    emit = progress or (lambda _e: None)
    device = resolve_device(config.device)
    if config.autocast == "fp16" and device.type != "cuda":
        raise UsageError("fp16 autocast needs a CUDA device; use --autocast bf16 on the CPU.")
    threat = config.threat()
    strategy = config.make_strategy()
    if config.same_budget:
        config = _same_budget(config, strategy)
    schedule = config.schedule or strategy.default_schedule

    out = Path(config.out).expanduser() if config.out else None
    ckpts = _Checkpoints(out) if out else None
    saved: dict[str, Any] | None = None
    if ckpts and ckpts.exists():
        if not config.resume:
            raise UsageError(
                f"{out} already holds a training run; pass --resume to continue it or choose another --out."
            )
        saved = ckpts.read_state()
        _check_resumable(saved.get("config", {}), config)
    elif config.resume:
        log.warning("--resume: %s holds no checkpoint; starting a new run.", out)

    data = load_dataset(config.dataset, data_dir=config.data_dir, split=config.split, n_examples=config.n_examples)
    val = None
    if config.val_size:
        val = load_held_out(config.val_dataset or config.dataset, data_dir=config.data_dir, split=config.val_split,
                            size=config.val_size)

    torch.manual_seed(config.seed)
    zoo = model if model is not None else build_training_model(config, data)
    if not isinstance(zoo, ZooModel):
        raise UsageError("train(model=...) takes a ZooModel (from load_model or build_training_model).")
    sample = data.x[:2]
    architecture = strategy.prepare_model(zoo, sample)
    check_model_fits(zoo, data, torch.device("cpu"))
    zoo.to(device)
    if config.channels_last:
        zoo.to(memory_format=torch.channels_last)
    zoo.train()
    # extra trained modules a strategy owns (distillation's projections): optimized with the model
    aux = strategy.aux
    trained: nn.Module = zoo
    if aux is not None:
        aux.to(device).train()
        trained = nn.ModuleList([zoo, aux])
    optimizer = make_optimizer(config.optimizer, trained, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    mixer = make_mixer(config.mix, data.num_classes, config.mix_alpha)
    soft_ok = mixer is None or strategy.soft_targets
    if not soft_ok:
        log.warning("%s trains on hard labels; with --mix it gets each mixed image's dominant label.", strategy.name)
    ema = EMA(zoo, config.ema) if config.ema else None
    detector = None
    if val is not None:
        detector = CODetector(threat, val.x.to(device), val.y.to(device), ratio=config.co_ratio, gap=config.co_gap,
                              min_best=config.co_min_best, patience=config.co_patience, seed=config.seed)
    scaler = torch.amp.GradScaler("cuda") if config.autocast == "fp16" else None

    n = len(data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    start_epoch, global_step, lr_scale, rollbacks, stopped = 0, 0, 1.0, 0, False
    history: list[dict[str, Any]] = []
    healthy: dict[str, Any] | None = None
    if saved is not None and ckpts is not None:
        healthy = ckpts.load(saved, zoo, optimizer, ema, aux)
        start_epoch = int(saved["epoch"])
        global_step = int(saved["global_step"])
        lr_scale = float(saved.get("lr_scale", 1.0))
        rollbacks = int(saved.get("rollbacks", 0))
        stopped = bool(saved.get("stopped", False))
        history = list(saved.get("history", []))
        if detector is not None:
            detector.load_state_dict(saved.get("detector", {}))
        log.info("Resuming %s from epoch %d.", out, start_epoch)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", config.to_yaml())

    emit(TrainEvent("start", start_epoch, config.epochs, 0, steps_per_epoch,
                    info={"method": strategy.name, "device": str(device), "n": n, "schedule": schedule}))

    def autocast_ctx() -> contextlib.AbstractContextManager:
        if not config.autocast:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if config.autocast == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)

    def snapshot(best: float) -> dict[str, Any]:
        return {
            "model": cpu_state(zoo.state_dict()),
            "optimizer": _clone_optimizer_state(optimizer.state_dict()),
            "ema": cpu_state(ema.state_dict()) if ema else None,
            "aux": cpu_state(aux.state_dict()) if aux is not None else None,
            "best_pgd": best,
        }

    def handle(check: COCheck, epoch: int) -> str:
        """React to one detector verdict; returns "stop", "rolled-back" or ""."""
        nonlocal healthy, lr_scale, rollbacks
        emit(TrainEvent("check", epoch, config.epochs, global_step, steps_per_epoch, info=check.as_dict()))
        if not check.flagged:
            if config.on_co == "rollback" and not check.suspect:
                healthy = snapshot(check.best_pgd)
            return ""
        log.warning("Catastrophic overfitting at epoch %d, step %d: %s.", epoch + 1, check.step, check.reason)
        emit(TrainEvent("co", epoch, config.epochs, global_step, steps_per_epoch, info=check.as_dict()))
        if config.on_co == "stop":
            return "stop"
        if config.on_co == "rollback":
            if healthy is None or rollbacks >= MAX_ROLLBACKS:
                log.warning("No rollback left (%d done); stopping.", rollbacks)
                return "stop"
            zoo.load_state_dict({k: v.to(device) for k, v in healthy["model"].items()})
            if aux is not None and healthy.get("aux") is not None:
                aux.load_state_dict({k: v.to(device) for k, v in healthy["aux"].items()})
            optimizer.load_state_dict(_clone_optimizer_state(healthy["optimizer"]))
            if ema is not None and healthy.get("ema") is not None:
                ema.load_state_dict(healthy["ema"])
            rollbacks += 1
            lr_scale *= 0.5
            assert detector is not None
            detector.reset_best(float(healthy["best_pgd"]))
            log.warning("Rolled back to the last healthy weights; learning rate halved (x%g).", lr_scale)
            return "rolled-back"
        return ""

    last_lr = config.lr * lr_scale
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(seed)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        attack_gen = torch.Generator(device=device).manual_seed(seed + 1)
        mix_gen = torch.Generator().manual_seed(seed + 2)
        zoo.train()
        if aux is not None:
            aux.train()
        t_start = time.perf_counter()
        check_seconds = 0.0
        loss_sum, correct, seen = 0.0, 0, 0
        parts_sum: dict[str, float] = {}
        epoch_checks: list[COCheck] = []
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = data.x[idx].to(device, non_blocking=True)
            y = data.y[idx].to(device, non_blocking=True)
            target: torch.Tensor = y
            if mixer is not None:
                x, target = mixer(x, y, mix_gen)
                y = target.argmax(1)  # the dominant label: train accuracy (and hard-label methods)
                if not soft_ok:
                    target = y
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            progress_epochs = epoch + b / steps_per_epoch
            last_lr = config.lr * lr_scale * lr_factor(
                schedule, progress_epochs, config.epochs, milestones=config.milestones, gamma=config.gamma,
                warmup_epochs=config.warmup_epochs,
            )
            for group in optimizer.param_groups:
                group["lr"] = last_lr
            if config.eps_warmup_epochs:
                ramp = min(1.0, (progress_epochs + 1 / steps_per_epoch) / config.eps_warmup_epochs)
                strategy.set_eps(config.eps * ramp)
            with autocast_ctx():
                result = strategy.step(zoo, x, target, attack_gen)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(result.loss).backward()
                scaler.unscale_(optimizer)
            else:
                result.loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(zoo)
            global_step += 1
            batch_loss = float(result.loss.detach())
            if not math.isfinite(batch_loss):
                log.warning("Non-finite loss at epoch %d, step %d.", epoch + 1, global_step)
            loss_sum += batch_loss * len(y)
            correct += int((result.logits.argmax(1) == y).sum())
            seen += len(y)
            for k, v in result.parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(y)
            emit(TrainEvent("step", epoch, config.epochs, b + 1, steps_per_epoch, batch_loss, {"lr": last_lr}))
            due = config.co_every and global_step % config.co_every == 0 and b + 1 < steps_per_epoch
            if detector is not None and due:
                t0 = time.perf_counter()
                check = detector.check(zoo, epoch + 1, global_step)
                epoch_checks.append(check)
                action = handle(check, epoch)
                zoo.train()
                check_seconds += time.perf_counter() - t0
                if action == "stop":
                    stopped = True
                    break
        train_seconds = time.perf_counter() - t_start - check_seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1, "steps": global_step, "lr": last_lr, "loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1), "clean_acc": float("nan"), "fgsm_acc": float("nan"),
            "pgd_acc": float("nan"), "co": False, "co_reason": "", "seconds": train_seconds,
            "eval_seconds": check_seconds, "rollbacks": rollbacks,
        }  # fmt: skip
        for k, v in parts_sum.items():
            row[f"loss_{k}"] = v / max(seen, 1)
        if detector is not None:
            t0 = time.perf_counter()
            check = detector.check(zoo, epoch + 1, global_step)
            epoch_checks.append(check)
            action = handle(check, epoch) if not stopped else ""
            stopped = stopped or action == "stop"
            row.update(clean_acc=check.clean_acc, fgsm_acc=check.fgsm_acc, pgd_acc=check.pgd_acc)
            row["eval_seconds"] = check_seconds + time.perf_counter() - t0
        flagged = [c for c in epoch_checks if c.flagged]
        row["co"] = bool(flagged)
        row["co_reason"] = flagged[0].reason if flagged else ""
        row["rollbacks"] = rollbacks
        history.append(row)
        emit(TrainEvent("epoch", epoch, config.epochs, steps_per_epoch, steps_per_epoch, row["loss"], info=row))
        if ckpts is not None and out is not None:
            state = {
                "epoch": epoch + 1, "global_step": global_step, "lr_scale": lr_scale, "rollbacks": rollbacks,
                "stopped": stopped, "history": history, "config": config.to_dict(),
                "detector": detector.state_dict() if detector else {},
                "healthy_best_pgd": healthy["best_pgd"] if healthy else None,
            }  # fmt: skip
            ckpts.save(epoch + 1, state, zoo, optimizer, ema, healthy if config.on_co == "rollback" else None, aux)
            _write_metrics(out, history, detector.history if detector else [], _metrics_extra(detector, stopped))

    if ema is not None:
        zoo.load_state_dict(ema.state_dict())
    zoo.eval()
    checks = detector.history if detector else []
    result = TrainResult(
        config=config, model=zoo, history=history, checks=checks, co_detected=any(c.flagged for c in checks),
        stopped_early=stopped, architecture=architecture, aux=aux.eval() if aux is not None else None,
    )  # fmt: skip
    if out is not None:
        _write_metrics(out, history, checks, _metrics_extra(detector, stopped))
        result.weights, result.sidecar = _save_final(out, config, zoo, data, val, architecture, strategy, schedule,
                                                     history, result)
        if config.eval_attacks:
            result.eval_report = _evaluate_final(config, result)
    emit(TrainEvent("end", len(history), config.epochs, steps_per_epoch, steps_per_epoch,
                    info={"co_detected": result.co_detected, "stopped_early": stopped}))
    return result


#: Methods whose losses are cross-entropies in the label, so mixed (soft) targets go in as they are.
def _same_budget(config: TrainConfig, strategy: TrainingHooks) -> TrainConfig:
    """``--same-budget``: the run shortened to the image passes of standard training, as the
    Fast AdvProp reference's ``exact_same_training_budget`` (epochs ÷ passes per image, rounded).
    The returned config is the run as it happens (``same_budget`` off), so a saved config reruns it."""
    passes = strategy.passes_per_image()
    if passes is None:
        raise UsageError(f"--same-budget needs a method that states its cost per image (advprop, fast-advprop), "
                         f"not {config.method}.")
    epochs = max(1, round(config.epochs / passes))
    log.info("--same-budget: %.3g passes per image, %d epochs -> %d.", passes, config.epochs, epochs)
    return dataclasses.replace(config, epochs=epochs, same_budget=False)


def _metrics_extra(detector: CODetector | None, stopped: bool) -> dict[str, Any]:
    return {"co_detected": bool(detector and detector.flagged), "stopped_early": stopped}


def _clone_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    def clone(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu").clone()
        if isinstance(v, dict):
            return {k: clone(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clone(x) for x in v]
        if isinstance(v, tuple):
            return tuple(clone(x) for x in v)
        return v

    return clone(state)


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = config.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed[:3])
        raise UsageError(
            f"--resume needs the options of the interrupted run; these differ: {shown}"
            f"{', ...' if len(changed) > 3 else ''}."
        )


def _save_final(
    out: Path, config: TrainConfig, zoo: ZooModel, data: Dataset, val: Dataset | None,
    architecture: list[dict[str, Any]], strategy: TrainingHooks, schedule: str, history: list[dict[str, Any]],
    result: TrainResult,
) -> tuple[Path, Path]:  # fmt: skip
    weights = out / "model.safetensors"
    save_safetensors(zoo.net.state_dict(), weights, metadata={"format": SIDECAR_FORMAT, "model": zoo.name})
    from robustkit.models import file_sha256

    side = {
        "format": SIDECAR_FORMAT,
        "model": zoo.name,
        "normalize": normalize_spec(zoo.normalization),
        "num_classes": data.num_classes,
        "in_channels": int(data.x.shape[1]),
        "input_size": list(data.x.shape[1:]),
        "architecture": architecture,
        "weights": "ema" if config.ema else "final",
        "sha256": file_sha256(weights),
        "recipe": {**strategy.config(), "schedule": schedule, "config": config.to_dict()},
        "data": {
            "dataset": data.name, "split": config.split, "n_examples": len(data), "sha256": _fingerprint(data),
            "val_dataset": val.name if val is not None else None, "val_split": config.val_split,
            "val_size": len(val) if val is not None else 0,
        },  # fmt: skip
        "seed": config.seed,
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
        "co_detected": result.co_detected,
        "stopped_early": result.stopped_early,
        "epochs_trained": len(history),
        "final_metrics": history[-1] if history else {},
    }
    if result.aux is not None:  # a strategy's extra trained modules (distillation's projections)
        name = strategy.aux_name
        aux_path = out / f"{name}.safetensors"
        save_safetensors(result.aux.state_dict(), aux_path, metadata={"format": SIDECAR_FORMAT, "aux": name})
        side["aux"] = {"file": aux_path.name, "sha256": file_sha256(aux_path)}
        result.aux_weights = aux_path
    path = sidecar_path(weights)
    write_text(path, json.dumps(side, indent=1, default=str))
    return weights, path


def _evaluate_final(config: TrainConfig, result: TrainResult) -> Any:
    """``--eval``: evaluate the saved checkpoint with ``run_grid`` (one cell: this model at this
    eps) and write its leaderboard rows; returns the list of cell reports."""
    from robustkit.evaluation.grid import EvalSpec, run_grid

    assert result.weights is not None
    side = read_sidecar(result.weights)
    assert side is not None
    spec = EvalSpec(
        model=[sidecar_model_name(side)],
        checkpoint=[str(result.weights)],
        normalize=side["normalize"],
        dataset=config.val_dataset or config.dataset,
        data_dir=config.data_dir,
        split=config.val_split,
        n_examples=config.eval_n_examples,
        attack=list(config.eval_attacks),
        norm=config.norm,
        eps=[config.eps],
        seed=config.seed,
        batch_size=max(config.batch_size, 256),
        device=config.device,
        dist_timeout=getattr(config, "dist_timeout", 600.0),  # DAT's --dist-timeout
    )
    return run_grid(spec, db=config.db)
