"""Surrogate (public) models for transfer attacks: loading, row labels and names from sidecars.

Shared by ``robustkit eval --surrogate`` (:mod:`robustkit.evaluation.grid`) and PubDef's training
sources (:mod:`robustkit.defenses.pubdef`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustkit.errors import UnknownNameError, UsageError
from robustkit.models import load_model, weights_sha256
from robustkit.models.sidecar import load_trained_model, read_sidecar, sidecar_model_name


def surrogate_from_sidecar(checkpoint: str | None) -> str:
    """The model name a surrogate checkpoint's training sidecar records (so --surrogate can be left out)."""
    side = read_sidecar(checkpoint) if checkpoint else None
    if side is None:
        raise UsageError(f"Name the surrogate of {checkpoint or 'an empty --surrogate-checkpoint entry'} with "
                         "--surrogate (its checkpoint has no robustkit training sidecar).")
    return sidecar_model_name(side)


def surrogate_labels(names: Sequence[str], checkpoints: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """``(label, sha256)`` per surrogate: the label names its rows (``pgd@LABEL``) and is the model
    name, or ``NAME#SHA8`` (its checkpoint's sha256) when two surrogates share a name; the same
    weights given twice are an error."""
    ckpts = list(checkpoints) or [None] * len(names)
    shas = [weights_sha256(n, c) for n, c in zip(names, ckpts, strict=True)]
    out = []
    for i, name in enumerate(names):
        twins = [j for j, other in enumerate(names) if other == name]
        if any(shas[j] == shas[i] for j in twins if j != i):
            raise UsageError(f"The surrogate {name} is given twice with the same weights.")
        out.append((name if len(twins) == 1 else f"{name}#{shas[i][:8]}", shas[i]))
    return out


def load_surrogate(name: str, checkpoint: str | None = None, *, seed: int | None = None) -> torch.nn.Module:
    """A surrogate: a ``robustkit train`` checkpoint brings its own normalization (sidecar).
    ``seed`` seeds the initialization of a surrogate without weights (as for the evaluated model),
    so that a rerun, or a resumed run, attacks from the same network."""
    side = read_sidecar(checkpoint) if checkpoint else None
    if side is not None and name in (side.get("model"), sidecar_model_name(side)):
        return load_trained_model(checkpoint)
    try:
        return load_model(name, checkpoint, seed=seed)
    except UnknownNameError as e:
        raise UsageError(f"--surrogate: {e}") from None
