"""The training configuration: :class:`TrainConfig` (everything that defines a run of the one loop;
round-trips through YAML) and :func:`flat_options`, which lets a method's own options dataclass
(an option group) be given, read and written flat."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from robustkit.defenses.adversarial_training import build_strategy
from robustkit.defenses.fgsm_tricks import TrickOptions
from robustkit.errors import UsageError
from robustkit.evaluation.attack_spec import canonical_attack
from robustkit.paths import check_dir
from robustkit.threat import ThreatModel
from robustkit.training.hooks import TrainingHooks
from robustkit.training.inputs import RunInputs
from robustkit.training.mixing import make_mixer
from robustkit.training.optim import OPTIMIZERS, SCHEDULES
from robustkit.units import parse_eps

ON_CO = ("continue", "stop", "rollback")
AUTOCAST = ("bf16", "fp16")

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
