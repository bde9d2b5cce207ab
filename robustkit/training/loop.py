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
import difflib
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
from typing import Any, ClassVar, TypeVar

import torch
import yaml
from torch import nn

from robustkit.data import Dataset
from robustkit.defenses.adversarial_training import build_strategy
from robustkit.defenses.fgsm_tricks import TrickOptions
from robustkit.errors import CheckpointError, UsageError
from robustkit.evaluation.attack_spec import canonical_attack
from robustkit.evaluation.runner import check_model_fits
from robustkit.models import (
    Normalize,
    ZooModel,
    build_model,
    file_sha256,
    is_external,
    load_model,
    load_state_dict,
    model_info,
    parse_normalize,
)
from robustkit.models.sidecar import (
    SIDECAR_FORMAT,
    cpu_state,
    normalize_spec,
    save_safetensors,
    sidecar_path,
    versions,
    write_text,
)
from robustkit.paths import check_dir
from robustkit.registry import MODELS
from robustkit.threat import ThreatModel
from robustkit.training.co_detector import COCheck, CODetector
from robustkit.training.hooks import RunHooks, TrainingHooks
from robustkit.training.inputs import RunInputs
from robustkit.training.mixing import make_mixer
from robustkit.training.optim import OPTIMIZERS, SCHEDULES, lr_factor
from robustkit.units import parse_eps

log = logging.getLogger("robustkit.training.loop")

ON_CO = ("continue", "stop", "rollback")
AUTOCAST = ("bf16", "fp16")
#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {"resume", "epochs", "device", "eval_attacks", "eval_n_examples", "db", "out", "dist_timeout"}
)
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


C = TypeVar("C", bound=type)


def _group_class(cls: type, group: str) -> type:
    f = next(f for f in dataclasses.fields(cls) if f.name == group)
    assert callable(f.default_factory), f"option group {group} needs a default_factory"
    return f.default_factory  # type: ignore[return-value]


def flat_options(cls: C) -> C:
    """Class decorator (after ``@dataclass``): the generated ``__init__`` also takes every method
    option flat and puts it into its group (``TrainConfig(mask_ratio=0.5)`` sets ``trick``)."""
    generated = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        picked: dict[str, dict[str, Any]] = {}
        for name, group in cls.option_keys().items():  # type: ignore[attr-defined]
            if name in kwargs:
                picked.setdefault(group, {})[name] = kwargs.pop(name)
        for group, values in picked.items():
            base = kwargs.get(group) or _group_class(cls, group)()
            try:
                kwargs[group] = dataclasses.replace(base, **values)
            except TypeError as e:
                raise UsageError(f"Bad training config: {e}.") from None
        generated(self, *args, **kwargs)

    __init__.__doc__ = generated.__doc__
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@flat_options
@dataclass
class TrainConfig(RunInputs):
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

    Options of one method live in that method's own dataclass, held in a field named in
    :attr:`OPTION_GROUPS` (here ``trick``: the FGSM tricks' settings; DAT, distillation and PubDef
    add theirs). Their fields are accepted as keywords (``TrainConfig(mask_ratio=0.5)``), read as
    attributes (``config.mask_ratio``) and written flat in ``to_dict``/YAML, as before.
    """

    OPTION_GROUPS: ClassVar[tuple[str, ...]] = ("trick",)

    model: str = "digits-cnn"  # type: ignore[assignment]  # RunInputs: None
    method: str = "pgd-at"
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
    trick: TrickOptions = field(default_factory=TrickOptions)  # the tricks' settings (--mask-ratio, --stride, ...)
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
            for name in self.eval_attacks:
                canonical_attack(name)  # unknown attacks fail before training, not after
        if not 0 < self.co_ratio < 1 or not 0 <= self.co_gap <= 1 or not 0 <= self.co_min_best <= 1:
            raise UsageError("co_ratio must be in (0, 1) and co_gap, co_min_best in [0, 1].")

    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    def trick_options(self) -> TrickOptions:
        return dataclasses.replace(self.trick, tricks=tuple(self.tricks))

    def strategy_options(self) -> dict[str, Any]:
        return {
            "steps": self.attack_steps, "step_size": self.attack_step_size, "beta": self.beta,
            "tricks": self.trick_options(), "seed": self.seed,
        }  # fmt: skip

    def make_strategy(self) -> TrainingHooks:
        """The training strategy the loop calls (subclasses such as distillation wrap it)."""
        return build_strategy(self.method, self.threat(), **self.strategy_options())

    def resolved_schedule(self) -> str:
        if self.schedule is not None:
            return self.schedule
        return build_strategy(self.method, self.threat(), **self.strategy_options()).default_schedule

    # -- method option groups ---------------------------------------------------------------
    @classmethod
    def option_keys(cls) -> dict[str, str]:
        """``{flat option name: its group field}`` for every option of :attr:`OPTION_GROUPS`."""
        own = {f.name for f in dataclasses.fields(cls)}
        keys: dict[str, str] = {}
        for group in cls.OPTION_GROUPS:
            for f in dataclasses.fields(_group_class(cls, group)):
                if f.name not in own:
                    keys[f.name] = group
        return keys

    def __getattr__(self, name: str) -> Any:
        """A method option read flat (``config.mask_ratio``) comes from its group."""
        group = type(self).option_keys().get(name) if not name.startswith("__") else None
        if group is None or group not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[group], name)

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types, the method options flat; ``eps`` as ``k/255`` text when exact."""
        d = dataclasses.asdict(self)
        for name, group in type(self).option_keys().items():
            d[name] = d[group][name]
        for group in type(self).OPTION_GROUPS:
            d.pop(group)
        d["eps"] = _eps_text(self.eps)
        return {"method": d.pop("method"), **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (YAML); unknown keys are a one-line error with a did-you-mean."""
        if not isinstance(data, dict):
            raise UsageError(f"A training config must be a mapping of option: value, got {type(data).__name__}.")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in cls.OPTION_GROUPS] + list(cls.option_keys())
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = [k for k in clean if k not in names]
        if unknown:
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
    spec = info.normalize if config.normalize == "default" else config.normalize
    mean_std = parse_normalize(spec)
    layer = None
    if mean_std is not None:
        if len(mean_std[0]) != channels:
            raise UsageError(
                f"Normalization {spec!r} has {len(mean_std[0])} channels but {data.name} images have {channels}; "
                "pass --normalize none or one that fits."
            )
        layer = Normalize(*mean_std)
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


class EpochLoop:
    """The one training loop: per epoch the order and generator of ``hooks``, per batch optional
    mixing, the learning rate (schedule x rollback scale), the eps warm-up, the method's step
    under optional autocast, backward (GradScaler for fp16), clip, optimizer step and EMA. The
    sums of loss, correct labels and loss parts come back combined over all processes.

    :func:`train` runs it with checkpoints, resume, the CO detector and the final files; RiFT's
    fine-tuning and prompt training run it with their own :class:`RunHooks`.
    """

    def __init__(
        self, config: TrainConfig, model: nn.Module, strategy: TrainingHooks, optimizer: torch.optim.Optimizer,
        x: torch.Tensor, y: torch.Tensor, *, device: torch.device, hooks: RunHooks | None = None,
        schedule: str | None = None, peak_lr: float | None = None, trained: nn.Module | None = None,
        ema: EMA | None = None, mixer: Any = None, soft_ok: bool = True, emit: ProgressFn | None = None,
    ):  # fmt: skip
        self.config, self.model, self.strategy, self.optimizer = config, model, strategy, optimizer
        self.x, self.y, self.device = x, y, device
        self.hooks = hooks or RunHooks()
        self.schedule = schedule or config.schedule or strategy.default_schedule
        self.peak_lr = config.lr if peak_lr is None else peak_lr
        self.trained = trained if trained is not None else model
        self.ema, self.mixer, self.soft_ok = ema, mixer, soft_ok
        self.emit = emit or (lambda _e: None)
        self.batch_size = self.hooks.per_process_batch(config.batch_size)
        self.steps = self.hooks.steps_per_epoch(len(y), self.batch_size)
        self.scaler = torch.amp.GradScaler("cuda") if config.autocast == "fp16" else None
        self.global_step = 0
        self.lr_scale = 1.0
        self.last_lr = self.peak_lr * self.lr_scale

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.autocast:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _factor(self, progress: float) -> float:
        c = self.config
        return lr_factor(self.schedule, progress, c.epochs, milestones=c.milestones, gamma=c.gamma,
                         warmup_epochs=c.warmup_epochs)

    def run_epoch(self, epoch: int, after_step: Callable[[int], bool] | None = None) -> tuple[dict[str, float], bool]:
        """Train one epoch; ``after_step(b)`` may stop it early (returns True). Returns the sums
        (``loss``, ``correct``, ``seen``, ``labeled``, ``loss_<part>``) over all processes and
        whether ``after_step`` stopped the epoch."""
        config, hooks, model, optimizer = self.config, self.hooks, self.model, self.optimizer
        seed = _epoch_seed(config.seed, epoch)
        hooks.begin_epoch(epoch, seed)
        order = hooks.epoch_order(len(self.y), epoch, seed)
        generator = hooks.generator(seed, self.device)
        mix_gen = torch.Generator().manual_seed(seed + 2) if self.mixer is not None else None
        hooks.train_mode(model)
        aux = self.strategy.aux
        if aux is not None:
            aux.train()
        sums: dict[str, float] = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "labeled": 0.0}
        stopped = False
        for b in range(self.steps):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb, yb = hooks.load_batch(self.x, self.y, idx)
            x = xb.to(self.device, non_blocking=True)
            y = yb.to(self.device, non_blocking=True)
            target: torch.Tensor = y
            if self.mixer is not None:
                x, target = self.mixer(x, y, mix_gen)
                y = target.argmax(1)  # the dominant label: train accuracy (and hard-label methods)
                if not self.soft_ok:
                    target = y
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            progress_epochs = epoch + b / self.steps
            self.last_lr = self.peak_lr * self.lr_scale * hooks.lr_factor(self._factor, progress_epochs)
            for group in optimizer.param_groups:
                group["lr"] = self.last_lr
            if config.eps_warmup_epochs:
                ramp = min(1.0, (progress_epochs + 1 / self.steps) / config.eps_warmup_epochs)
                self.strategy.set_eps(config.eps * ramp)
            with self.autocast():
                result = hooks.step(self.strategy, model, x, target, generator, idx, seed)
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(result.loss).backward()
                self.scaler.unscale_(optimizer)
            else:
                result.loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trained.parameters(), config.grad_clip)
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            self.global_step += 1
            batch_loss = float(result.loss.detach())
            if not math.isfinite(batch_loss):
                log.warning("Non-finite loss at epoch %d, step %d.", epoch + 1, self.global_step)
            labeled = y >= 0  # DAT's unlabeled examples (label -1) train on pseudo-labels
            sums["loss"] += batch_loss * len(y)
            sums["correct"] += float(((result.logits.argmax(1) == y) & labeled).sum())
            sums["seen"] += len(y)
            sums["labeled"] += float(labeled.sum())
            for k, v in result.parts.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + v * len(y)
            self.emit(TrainEvent("step", epoch, config.epochs, b + 1, self.steps, batch_loss, {"lr": self.last_lr}))
            if after_step is not None and after_step(b):
                stopped = True
                break
        keys = sorted(sums)
        return dict(zip(keys, hooks.reduce([sums[k] for k in keys]), strict=True)), stopped


def _read_checkpoint(ckpts: _Checkpoints | None, config: TrainConfig, out: Path | None) -> dict[str, Any] | None:
    """The interrupted run's state to resume (None: start afresh); a one-line error when ``out``
    holds a run and ``--resume`` is not given, or when the options differ."""
    if ckpts is None or not ckpts.exists():
        if config.resume:
            log.warning("--resume: %s holds no checkpoint; starting a new run.", out)
        return None
    if not config.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out.")
    saved = ckpts.read_state()
    _check_resumable(saved.get("config", {}), config)
    return saved


def train(config: TrainConfig, *, progress: ProgressFn | None = None, model: ZooModel | None = None,
          hooks: RunHooks | None = None) -> TrainResult:
    """Train ``config.model`` with ``config.method``; see the module docstring for the files.

    ``model`` replaces building from ``config.model`` (e.g. a ZooModel from ``load_model``).
    ``progress(event)`` receives :class:`TrainEvent` objects (steps, checks, epochs). ``hooks``
    is how the run differs from the standard one (:class:`~robustkit.training.hooks.RunHooks`; DAT's
    :class:`~robustkit.training.dat.DistributedRun` under torchrun).
    """
    config.validate()
    run = hooks or RunHooks()
    emit = (progress or (lambda _e: None)) if run.primary else (lambda _e: None)
    device = run.device(config)
    if config.autocast == "fp16" and device.type != "cuda":
        raise run.error(UsageError("fp16 autocast needs a CUDA device; use --autocast bf16 on the CPU."))
    run.check(config)
    threat = config.threat()
    strategy = config.make_strategy()
    if config.same_budget:
        config = _same_budget(config, strategy)
    schedule = config.schedule or strategy.default_schedule

    out = Path(config.out).expanduser() if config.out else None
    ckpts = _Checkpoints(out) if out else None
    saved = run.shared(lambda: _read_checkpoint(ckpts, config, out))

    data, train_x, train_y = run.training_data(config)
    val = config.held_out() if run.primary else None

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
    optimizer = run.optimizer(config, trained)
    mixer = make_mixer(config.mix, data.num_classes, config.mix_alpha)
    soft_ok = mixer is None or strategy.soft_targets
    if not soft_ok:
        log.warning("%s trains on hard labels; with --mix it gets each mixed image's dominant label.", strategy.name)
    ema = EMA(zoo, config.ema) if config.ema else None
    detector = None
    if val is not None:
        detector = CODetector(threat, val.x.to(device), val.y.to(device), ratio=config.co_ratio, gap=config.co_gap,
                              min_best=config.co_min_best, patience=config.co_patience, seed=config.seed)
    loop = EpochLoop(config, zoo, strategy, optimizer, train_x, train_y, device=device, hooks=run, schedule=schedule,
                     peak_lr=run.peak_lr(config), trained=trained, ema=ema, mixer=mixer, soft_ok=soft_ok, emit=emit)

    n = len(train_y)
    steps_per_epoch = loop.steps
    start_epoch, rollbacks, stopped = 0, 0, False
    history: list[dict[str, Any]] = []
    healthy: dict[str, Any] | None = None
    if saved is not None and ckpts is not None:

        def load() -> dict[str, Any] | None:
            assert ckpts is not None and saved is not None
            return ckpts.load(saved, zoo, optimizer, ema, aux)

        healthy = run.resume(load, optimizer, ema)
        start_epoch = int(saved["epoch"])
        loop.global_step = int(saved["global_step"])
        loop.lr_scale = float(saved.get("lr_scale", 1.0))
        rollbacks = int(saved.get("rollbacks", 0))
        stopped = bool(saved.get("stopped", False))
        history = list(saved.get("history", []))
        if detector is not None:
            detector.load_state_dict(saved.get("detector", {}))
        log.info("Resuming %s from epoch %d.", out, start_epoch)
        run.checkpointed = start_epoch
    if out and run.primary:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", config.to_yaml())
    run.wrap(zoo, config)

    emit(TrainEvent("start", start_epoch, config.epochs, 0, steps_per_epoch,
                    info={"method": strategy.name, "device": str(device), "n": n, "schedule": schedule,
                          **run.start_info(config)}))

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
        nonlocal healthy, rollbacks
        emit(TrainEvent("check", epoch, config.epochs, loop.global_step, steps_per_epoch, info=check.as_dict()))
        if not check.flagged:
            if config.on_co == "rollback" and not check.suspect:
                healthy = snapshot(check.best_pgd)
            return ""
        log.warning("Catastrophic overfitting at epoch %d, step %d: %s.", epoch + 1, check.step, check.reason)
        emit(TrainEvent("co", epoch, config.epochs, loop.global_step, steps_per_epoch, info=check.as_dict()))
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
            loop.lr_scale *= 0.5
            assert detector is not None
            detector.reset_best(float(healthy["best_pgd"]))
            log.warning("Rolled back to the last healthy weights; learning rate halved (x%g).", loop.lr_scale)
            return "rolled-back"
        return ""

    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        run.epoch = epoch
        t_start = time.perf_counter()
        check_seconds = 0.0
        epoch_checks: list[COCheck] = []

        def after_step(b: int, epoch: int = epoch, epoch_checks: list[COCheck] = epoch_checks) -> bool:
            """The every-``co_every``-steps check (not after the epoch's last step: the epoch end checks)."""
            nonlocal check_seconds
            due = config.co_every and loop.global_step % config.co_every == 0 and b + 1 < steps_per_epoch
            if detector is None or not due:
                return False
            t0 = time.perf_counter()
            check = detector.check(zoo, epoch + 1, loop.global_step)
            epoch_checks.append(check)
            action = handle(check, epoch)
            run.train_mode(zoo)
            check_seconds += time.perf_counter() - t0
            return action == "stop"

        totals, stopped = loop.run_epoch(epoch, after_step)
        (train_seconds,) = run.reduce([time.perf_counter() - t_start - check_seconds], op="max")
        seen = max(totals["seen"], 1)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "steps": loop.global_step, "lr": loop.last_lr, "loss": totals["loss"] / seen,
            "train_acc": totals["correct"] / max(totals["labeled"], 1), "clean_acc": float("nan"),
            "fgsm_acc": float("nan"), "pgd_acc": float("nan"), "co": False, "co_reason": "", "seconds": train_seconds,
            "eval_seconds": check_seconds, "rollbacks": rollbacks,
        }  # fmt: skip
        for k in sorted(totals):
            if k.startswith("loss_"):
                row[k] = totals[k] / seen
        if detector is not None:
            t0 = time.perf_counter()
            check = detector.check(zoo, epoch + 1, loop.global_step)
            epoch_checks.append(check)
            action = handle(check, epoch) if not stopped else ""
            stopped = stopped or action == "stop"
            row.update(clean_acc=check.clean_acc, fgsm_acc=check.fgsm_acc, pgd_acc=check.pgd_acc)
            row["eval_seconds"] = check_seconds + time.perf_counter() - t0
        flagged = [c for c in epoch_checks if c.flagged]
        row["co"] = bool(flagged)
        row["co_reason"] = flagged[0].reason if flagged else ""
        row["rollbacks"] = rollbacks
        run.end_epoch(zoo, row, totals)
        if run.primary:
            history.append(row)
            if ckpts is not None and out is not None:
                state = {
                    "epoch": epoch + 1, "global_step": loop.global_step, "lr_scale": loop.lr_scale,
                    "rollbacks": rollbacks, "stopped": stopped, "history": history, "config": config.to_dict(),
                    "detector": detector.state_dict() if detector else {},
                    "healthy_best_pgd": healthy["best_pgd"] if healthy else None, **run.state_extra(),
                }  # fmt: skip
                ckpts.save(epoch + 1, state, zoo, optimizer, ema, healthy if config.on_co == "rollback" else None, aux)
                run.checkpointed = epoch + 1
                _write_metrics(out, history, detector.history if detector else [], _metrics_extra(detector, stopped))
        if run.shares_epochs:
            row, stopped = run.shared(lambda row=row, stopped=stopped: (row, stopped))
            if not run.primary:
                history.append(row)
            if out is not None:
                run.checkpointed = epoch + 1
        emit(TrainEvent("epoch", epoch, config.epochs, steps_per_epoch, steps_per_epoch, row["loss"], info=row))

    if ema is not None:
        zoo.load_state_dict(ema.state_dict())
    zoo.eval()
    checks = detector.history if detector else []
    result = TrainResult(
        config=config, model=zoo, history=history, checks=checks,
        co_detected=any(c.flagged for c in checks) or any(bool(r.get("co")) for r in history),
        stopped_early=stopped, architecture=architecture, aux=aux.eval() if aux is not None else None,
    )  # fmt: skip
    if out is not None:
        if run.primary:
            _write_metrics(out, history, checks, {"co_detected": result.co_detected, "stopped_early": stopped})
            result.weights, result.sidecar = _save_final(out, config, zoo, data, val, architecture, strategy,
                                                         schedule, history, result, run.sidecar_extra(config))
        if config.eval_attacks:
            run.evaluate(config, result, out)
    emit(TrainEvent("end", len(history), config.epochs, steps_per_epoch, steps_per_epoch,
                    info={"co_detected": result.co_detected, "stopped_early": stopped}))
    return result


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
    result: TrainResult, extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    weights = out / "model.safetensors"
    save_safetensors(zoo.net.state_dict(), weights, metadata={"format": SIDECAR_FORMAT, "model": zoo.name})
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
    side.update(extra or {})
    path = sidecar_path(weights)
    write_text(path, json.dumps(side, indent=1, default=str))
    return weights, path
