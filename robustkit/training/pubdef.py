"""PubDef's training run (Sitawarin et al. 2023): a :class:`~robustkit.training.loop.TrainConfig`
with the source pool (surrogates x transfer attacks), trained by the one loop with the
:class:`~robustkit.defenses.pubdef.PubDef` strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustkit.errors import UsageError
from robustkit.evaluation.surrogates import surrogate_from_sidecar
from robustkit.training.loop import TrainConfig, TrainResult, flat_options, train


def _listify(value: Any, *, keep_empty: bool = False) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",")] if value.strip() else []
        return [p or None for p in parts] if keep_empty else [p for p in parts if p]
    return [None if v is None or (keep_empty and not str(v).strip()) else str(v).strip() for v in value]


@dataclass
class PubDefOptions:
    """PubDef's source pool and selection: ``surrogate`` names (comma text or a list),
    ``surrogate_checkpoint`` one per name (empty: none; the names come from the checkpoints'
    sidecars when left out), ``transfer_attacks`` (``transfer``: the engine's whole suite),
    ``selection``, ``clean_weight`` and ``exp_alpha`` (:mod:`robustkit.defenses.pubdef`)."""

    surrogate: list[str] = field(default_factory=list)
    surrogate_checkpoint: list[str | None] = field(default_factory=list)
    transfer_attacks: list[str] = field(default_factory=lambda: ["pgd"])
    selection: str = "random"
    clean_weight: float = 0.5
    exp_alpha: float = 0.5

    def __post_init__(self) -> None:
        self.surrogate = _listify(self.surrogate)
        self.surrogate_checkpoint = _listify(self.surrogate_checkpoint, keep_empty=True)
        self.transfer_attacks = _listify(self.transfer_attacks)
        if self.surrogate_checkpoint and not self.surrogate:
            self.surrogate = [surrogate_from_sidecar(c) for c in self.surrogate_checkpoint]

    def strategy_options(self) -> dict[str, Any]:
        """The :class:`~robustkit.defenses.pubdef.PubDef` constructor's options."""
        return {"surrogates": self.surrogate, "surrogate_checkpoints": self.surrogate_checkpoint,
                "attacks": self.transfer_attacks, "selection": self.selection, "clean_weight": self.clean_weight,
                "exp_alpha": self.exp_alpha}


@flat_options
@dataclass
class PubDefConfig(TrainConfig):
    """A :class:`~robustkit.training.loop.TrainConfig` for ``method="pubdef"`` with the source pool in
    ``pubdef`` (:class:`PubDefOptions`; also taken and read flat, e.g. ``PubDefConfig(surrogate=...)``)."""

    OPTION_GROUPS = ("trick", "pubdef")

    method: str = "pubdef"
    pubdef: PubDefOptions = field(default_factory=PubDefOptions)

    def validate(self) -> None:
        if self.method != "pubdef":
            raise UsageError(f"PubDefConfig trains pubdef, not {self.method!r}.")
        super().validate()

    def strategy_options(self) -> dict[str, Any]:
        return {**super().strategy_options(), **self.pubdef.strategy_options()}


def train_pubdef(config: PubDefConfig, **kwargs: Any) -> TrainResult:
    """:func:`robustkit.training.loop.train` with PubDef (same files: weights, sidecar, metrics)."""
    if not isinstance(config, PubDefConfig):
        raise UsageError("train_pubdef takes a PubDefConfig.")
    return train(config, **kwargs)
