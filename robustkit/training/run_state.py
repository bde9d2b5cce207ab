"""What a multi-stage run keeps to resume: RiFT's stages and prompt training's epochs.

A run writes each finished piece (JSON values, tensors) to ``OUT/<folder>/`` as soon as it has
it, and removes the folder once its outputs are written. A run given ``--resume`` reads the
pieces back instead of recomputing them: the pieces are seeded, or carry their generators'
states, so it ends with the result of an uninterrupted run. The folder holds the run's options
and a fingerprint of everything that decides the result (options, data, the starting weights):
a resume with other options is refused naming them, as ``robustkit train --resume`` does
(:func:`~robustkit.training.checkpoints.check_resumable`), one with other data or weights is
refused too, and a new run into a folder that holds an interrupted one asks for ``--resume`` or
another ``--output``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from robustkit.errors import UsageError
from robustkit.models.sidecar import save_safetensors, write_text
from robustkit.training.checkpoints import check_resumable

# options that do not change what a run computes
_NOT_IN_FINGERPRINT = frozenset({"out", "device", "resume", "criticality_only", "quiet"})


def _options(config: Any) -> dict[str, Any]:
    """The options (a dataclass) that decide the result, as JSON values."""
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
    return json.loads(json.dumps(options, default=str))


def fingerprint(config: Any, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the options (a dataclass) that decide the result and of ``tensors`` (data, weights)."""
    digest = hashlib.sha256(json.dumps(_options(config), sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RunState:
    """The finished pieces of one run in ``OUT/folder`` (nothing is kept, or hashed, without
    ``out``); ``inputs`` gives the tensors the fingerprint covers (data, starting weights)."""

    def __init__(self, out: str | Path | None, folder: str, config: Any,
                 inputs: Callable[[], dict[str, torch.Tensor]], *, resume: bool, what: str):
        self.dir = Path(out).expanduser() / folder if out else None
        if self.dir is None:
            return
        key = fingerprint(config, inputs())
        meta = self.dir / "state.json"
        if meta.exists():
            if not resume:
                raise UsageError(f"{out} holds an interrupted {what} ({self.dir}); pass --resume to continue it "
                                 "or choose another --output.")
            saved = json.loads(meta.read_text())
            if "options" in saved:
                check_resumable(saved["options"], _options(config), frozenset())
            if saved.get("key") != key:
                raise UsageError(f"--resume: the options, data or weights differ from those of the interrupted "
                                 f"{what} in {out}; rerun with the same ones or choose another --output.")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text(meta, json.dumps({"key": key, "options": _options(config)}))

    def value(self, name: str) -> Any:
        """The JSON value stored as ``name``, or None."""
        path = self.dir / f"{name}.json" if self.dir else None
        return json.loads(path.read_text()) if path and path.exists() else None

    def keep_value(self, name: str, value: Any) -> None:
        if self.dir:
            write_text(self.dir / f"{name}.json", json.dumps(value, indent=1))

    def tensors(self, name: str) -> tuple[dict[str, torch.Tensor], Any] | None:
        """The tensors stored as ``name`` and the JSON value stored with them, or None."""
        path = self.dir / f"{name}.safetensors" if self.dir else None
        if not path or not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            value = json.loads(f.metadata()["value"])
        return load_file(str(path)), value

    def keep_tensors(self, name: str, tensors: dict[str, torch.Tensor], value: Any) -> None:
        """Store ``tensors`` and ``value`` together in one file (replaced at once: never half written)."""
        if self.dir:
            save_safetensors(tensors, self.dir / f"{name}.safetensors", metadata={"value": json.dumps(value)})

    def clear(self) -> None:
        """Remove the pieces (the run has written its outputs)."""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
