"""PubDef (Sitawarin et al., ICLR 2024, arXiv 2310.17645): train against transfer attacks from
public models.

The threat model is an attacker who crafts adversarial examples on publicly available
(surrogate) models with off-the-shelf transfer attacks. The defender picks a small pool of such
*sources* — (surrogate model, transfer attack) pairs — and trains on their transfer adversarial
examples plus the clean data; it never attacks its own model, so clean accuracy stays close to
standard training. Evaluate with ``robustkit eval --attack transfer --surrogate ...`` on
surrogates held out from training.

Loss, per batch (``w`` = ``clean_weight``, 0.5: the reference's ``--dataset-weights 1.0 1.0``)::

    loss = w · CE(f(x), y) + (1 - w) · transfer loss

Source selection (``selection``), the defender's mixed strategy over the pool:

``random`` (default)  every example gets the adversarial copy of one source drawn uniformly
                      (the reference's example scripts: ``--data-load-mode mix --train-loss ce``,
                      where ``StackDataset`` picks one source's copy per example at random).
``top1``              every example is crafted by every source; its transfer loss is the highest
                      of them (the reference's ``--worst-k-transfer-loss 1``: the attacker's best
                      response per example).
``exp``               the sources' mean losses are smoothed, ``m ← (1-α)·m + α·L`` (``exp_alpha``),
                      and the transfer loss is ``Σ_k (m_k / Σm) · L_k``: sources that hurt more
                      weigh more (the reference's ``--train-loss weighted-exp``; it has no default
                      α, 0.5 is ours).
``all``               the mean over all sources.

Differences from the reference: it saves a fixed number of adversarial copies per source once
(``save_adv_main.py``, 4 copies, PGD-10) and trains on those; here every batch is crafted afresh
on the surrogates (same distribution, a new copy per epoch, no disk). Crafting follows the
transfer semantics of :func:`~robustkit.attacks.transfer.craft_transfer`: the full budget on every
point, surrogate in eval mode, no gradient ever reaches a surrogate's parameters (they are frozen
once loaded). ``steps`` / ``step_size`` (``--attack-steps``/``--attack-step-size``) override the
source attacks' own defaults (PGD: 10 steps of 2.5·eps/steps from a random start). The ``exp``
smoothed losses and the per-source pick counts are buffers of the strategy's ``aux`` module
(:class:`SourceStats`), so they are in every epoch checkpoint and a resumed run continues them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.transfer import TRANSFER_SUITE, craft_transfer
from robustkit.errors import CheckpointError, UnknownNameError, UsageError
from robustkit.evaluation.attack_spec import build_attack, canonical_attack
from robustkit.evaluation.surrogates import load_surrogate, surrogate_labels
from robustkit.models import is_external
from robustkit.models.sidecar import read_sidecar
from robustkit.registry import DEFENSES, MODELS
from robustkit.threat import ThreatModel

from .adversarial_training import StepOutput, TrainingStrategy
from .fgsm_tricks import TrickOptions

SELECTIONS = ("random", "top1", "exp", "all")
TRANSFER = "transfer"  # in ``attacks``: the whole transfer suite of the engine


def source_attack_names(attacks: Sequence[str]) -> list[str]:
    """Canonical attack names, ``transfer`` expanded to the engine's transfer suite."""
    names: list[str] = []
    for a in attacks:
        for n in TRANSFER_SUITE if a.strip().lower() == TRANSFER else [a]:
            n = canonical_attack(n)
            if n not in names:
                names.append(n)
    if not names:
        raise UsageError("PubDef needs at least one transfer attack (e.g. pgd).")
    return names


@DEFENSES.register("pubdef")
class PubDef(TrainingStrategy):
    """PubDef: clean CE plus CE on transfer adversarial examples from a pool of (surrogate,
    attack) sources chosen by ``selection`` (module docstring). ``surrogates``: model names (or
    ``nn.Module`` objects), ``surrogate_checkpoints`` one per name (None: packaged weights)."""

    name = "pubdef"
    description = "PubDef (Sitawarin et al. 2023): clean + transfer adversarial examples from public models"
    default_schedule: ClassVar[str] = "multistep"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        surrogates: Sequence[str | nn.Module] = (),
        surrogate_checkpoints: Sequence[str | None] = (),
        attacks: Sequence[str] = ("pgd",),
        selection: str = "random",
        clean_weight: float = 0.5,
        exp_alpha: float = 0.5,
        steps: int | None = None,
        step_size: float | None = None,
        beta: float | None = None,
        tricks: TrickOptions | None = None,
        seed: int = 0,
    ):
        super().__init__(threat, steps=steps, step_size=step_size, beta=beta, tricks=tricks, seed=seed)
        self.attack_steps, self.attack_step_size = steps, step_size  # None: each attack's default
        self.seed = seed  # seeds the initialization of surrogates without weights
        if not surrogates:
            raise UsageError("pubdef trains on transfer attacks from public models; name them with "
                             "`robustkit train pubdef --surrogate NAME[,NAME...]`.")
        if surrogate_checkpoints and len(surrogate_checkpoints) != len(surrogates):
            raise UsageError(f"Give one --surrogate-checkpoint per surrogate, in the same order (an empty entry for "
                             f"none): {len(surrogates)} surrogate(s), {len(surrogate_checkpoints)} checkpoint(s).")
        if selection not in SELECTIONS:
            raise UsageError(f"Unknown source selection {selection!r}; accepted: {', '.join(SELECTIONS)}.")
        if not 0 <= clean_weight < 1:
            raise UsageError(f"--clean-weight is in [0, 1), got {clean_weight}.")
        if not 0 < exp_alpha <= 1:
            raise UsageError(f"--exp-alpha is in (0, 1], got {exp_alpha}.")
        self.surrogates = list(surrogates)
        self.checkpoints = list(surrogate_checkpoints) or [None] * len(self.surrogates)
        for name, ckpt in zip(self.surrogates, self.checkpoints, strict=True):
            _check_surrogate(name, ckpt)
        self.attack_names = source_attack_names(list(attacks))
        for n in self.attack_names:
            self._build_attack(n)  # bad names and options fail now, not at the first batch
        self.selection = selection
        self.clean_weight = float(clean_weight)
        self.exp_alpha = float(exp_alpha)
        self._models: list[tuple[str, nn.Module, str]] | None = None
        self._attacks: dict[str, Any] = {}
        self.aux = SourceStats(len(self.surrogates) * len(self.attack_names))

    @property
    def moving_loss(self) -> torch.Tensor:
        """``exp``: the smoothed mean loss of each source."""
        return self.aux.moving_loss

    @property
    def picks(self) -> torch.Tensor:
        """How often each source was trained on."""
        return self.aux.picks

    # -- the pool ------------------------------------------------------------------------
    def _build_attack(self, name: str) -> Any:

        options = {k: v for k, v in (("steps", self.attack_steps), ("step_size", self.attack_step_size))
                   if v is not None}
        return build_attack(name, self.threat, seed=0, **options)

    def surrogate_models(self) -> list[tuple[str, nn.Module, str]]:
        """``(label, model, sha256)`` per surrogate, loaded once, in eval mode, parameters frozen."""
        if self._models is None:

            names = [s if isinstance(s, str) else f"model{i}" for i, s in enumerate(self.surrogates)]
            labels = surrogate_labels(names, self.checkpoints) if all(isinstance(s, str) for s in self.surrogates) \
                else [(n, "") for n in names]
            models = []
            for i, ((label, sha), s, ckpt) in enumerate(zip(labels, self.surrogates, self.checkpoints, strict=True)):
                model = load_surrogate(s, ckpt, seed=self.seed + 1 + i) if isinstance(s, str) else s
                model.eval().requires_grad_(False)
                models.append((label, model, sha if ckpt else ""))
            self._models = models
        return self._models

    def sources(self) -> list[str]:
        """The pool's names, ``ATTACK@SURROGATE``, surrogates outer (the order of ``picks``)."""
        return [f"{a}@{label}" for label, _, _ in self.surrogate_models() for a in self.attack_names]

    def set_eps(self, eps: float) -> None:
        super().set_eps(eps)
        self._attacks = {}  # rebuilt at the new radius

    def craft(self, k: int, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Source ``k``'s transfer adversarial examples for ``(x, y)`` (detached)."""

        models = self.surrogate_models()
        _, model, _ = models[k // len(self.attack_names)]
        name = self.attack_names[k % len(self.attack_names)]
        if name not in self._attacks:
            self._attacks[name] = self._build_attack(name)
        return craft_transfer(self._attacks[name], model.to(x.device), x, y, seed=seed).x_adv.detach()

    # -- one batch -----------------------------------------------------------------------
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> StepOutput:
        k = len(self.picks)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        n = len(y)
        if self.selection == "random":
            choice = torch.randint(0, k, (n,), generator=generator, device=generator.device).to(x.device)
            x_adv = x.clone()
            for j in range(k):
                rows = (choice == j).nonzero().flatten()
                if len(rows):
                    x_adv[rows] = self.craft(j, x[rows], y[rows], seed + j)
            logits = model(torch.cat([x, x_adv])).float()
            clean = F.cross_entropy(logits[:n], y)
            transfer = F.cross_entropy(logits[n:], y)
            self.picks.add_(torch.bincount(choice, minlength=k).to(self.picks))
            adv_logits = logits[n:]
        else:
            advs = [self.craft(j, x, y, seed + j) for j in range(k)]
            logits = model(torch.cat([x, *advs])).float()
            clean = F.cross_entropy(logits[:n], y)
            per = F.cross_entropy(logits[n:], y.repeat(k), reduction="none").view(k, n)  # [source, example]
            if self.selection == "top1":
                worst = per.detach().argmax(0)
                transfer = per.gather(0, worst[None]).mean()
                self.picks.add_(torch.bincount(worst, minlength=k).to(self.picks))
                adv_logits = logits[n:].view(k, n, -1)[worst, torch.arange(n, device=x.device)]
            else:
                means = per.mean(1)
                if self.selection == "exp":
                    self.moving_loss.lerp_(means.detach().to(self.moving_loss), self.exp_alpha)
                    weights = (self.moving_loss / self.moving_loss.sum()).to(means)
                else:
                    weights = torch.full_like(means, 1.0 / k)
                transfer = (weights * means).sum()
                self.picks.add_(n)
                adv_logits = logits[n:n + n]
        loss = self.clean_weight * clean + (1 - self.clean_weight) * transfer
        parts = {"task": float(loss.detach()), "clean": float(clean.detach()), "transfer": float(transfer.detach())}
        reg = self.regularizer(model)
        if reg is not None:
            parts["reg"] = float(reg.detach())
            loss = loss + reg
        return StepOutput(loss, adv_logits.detach(), parts)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"method": self.name, "norm": self.threat.norm, "eps": self.threat.eps,
                               "surrogates": [s if isinstance(s, str) else type(s).__name__ for s in self.surrogates],
                               "surrogate_checkpoints": self.checkpoints, "attacks": self.attack_names,
                               "selection": self.selection, "clean_weight": self.clean_weight}
        if self.attack_steps is not None:
            cfg["steps"] = self.attack_steps
        if self.attack_step_size is not None:
            cfg["step_size"] = self.attack_step_size
        if self.selection == "exp":
            cfg["exp_alpha"] = self.exp_alpha
        if self._models is not None:
            cfg["sources"] = self.sources()
            cfg["surrogate_sha256"] = [sha for _, _, sha in self._models]
            cfg["source_picks"] = [int(c) for c in self.picks]
            if self.selection == "exp":
                cfg["source_weights"] = [float(w) for w in self.moving_loss / self.moving_loss.sum()]
        if self.tricks.tricks:
            cfg["tricks"] = list(self.tricks.tricks)
        return cfg


class SourceStats(nn.Module):
    """PubDef's per-source state as buffers (no parameters), saved with the model in every epoch
    checkpoint (``aux.safetensors``): the smoothed losses of ``exp`` and the pick counts."""

    def __init__(self, sources: int):
        super().__init__()
        self.register_buffer("moving_loss", torch.full((sources,), 1.0 / sources))
        self.register_buffer("picks", torch.zeros(sources, dtype=torch.long))


def _check_surrogate(name: str | nn.Module, checkpoint: str | None) -> None:
    """Fail early, in one sentence, on an unknown surrogate name or a missing checkpoint file."""
    if not isinstance(name, str):
        return
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise CheckpointError(f"Surrogate checkpoint file not found: {checkpoint}.")
    if is_external(name) or name in MODELS:
        return
    if checkpoint and read_sidecar(checkpoint) is not None:
        return  # a derived name (architecture tricks) that the sidecar registers when loaded
    try:
        MODELS.get(name)
    except UnknownNameError as e:
        raise UsageError(f"--surrogate: {e}") from None
