"""RiFT's resumable stages: an interrupted ``robustkit train rift`` continues where it stopped.

Each stage's result goes to ``OUT/rift-state/`` as soon as it is done: the criticality table,
the fine-tuned weights with their history, and every interpolation point measured. A run given
``--resume`` reads them back instead of recomputing them (the stages are seeded, so the final
weights are those of an uninterrupted run), and the folder is removed once the model is written.
The state carries a fingerprint of everything that decides the result (options, data, the
adversarially trained weights): a resume with other options is refused, and a new run into a
folder that holds an interrupted one asks for ``--resume`` or another ``--output``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from robustkit.errors import UsageError
from robustkit.models.sidecar import save_safetensors, write_text

STATE_DIR = "rift-state"
# options that do not change what a stage computes
_NOT_IN_FINGERPRINT = ("out", "device", "resume", "criticality_only", "quiet")


def fingerprint(config: Any, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the options that decide the result and of ``tensors`` (data, AT weights)."""
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RiftState:
    """The stage results of one run in ``OUT/rift-state`` (nothing is kept without ``out``)."""

    def __init__(self, out: str | Path | None, key: str, *, resume: bool):
        self.dir = Path(out).expanduser() / STATE_DIR if out else None
        self.key = key
        if self.dir is None:
            return
        meta = self.dir / "state.json"
        if meta.exists():
            if not resume:
                raise UsageError(f"{out} holds an interrupted RiFT run ({self.dir}); pass --resume to continue it "
                                 "or choose another --output.")
            if json.loads(meta.read_text()).get("key") != key:
                raise UsageError(f"--resume: the options, data or checkpoint differ from those of the interrupted "
                                 f"run in {out}; rerun with the same ones or choose another --output.")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text(meta, json.dumps({"key": key}))

    def _read(self, name: str) -> Any:
        path = self.dir / name if self.dir else None
        return json.loads(path.read_text()) if path and path.exists() else None

    def _write(self, name: str, value: Any) -> None:
        if self.dir:
            write_text(self.dir / name, json.dumps(value, indent=1))

    def criticality(self) -> list[dict[str, Any]] | None:
        """The stored criticality rows (as ``Criticality`` fields), or None."""
        return self._read("criticality.json")

    def save_criticality(self, rows: list[dict[str, Any]]) -> None:
        self._write("criticality.json", rows)

    def fine_tuned(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None:
        """The fine-tuned weights and the fine-tuning history, or None."""
        history = self._read("fine_tune.json")
        if history is None:
            return None
        return load_file(str(self.dir / "fine_tuned.safetensors")), history

    def save_fine_tuned(self, state: dict[str, torch.Tensor], history: list[dict[str, Any]]) -> None:
        if self.dir:  # the weights first: the history is the stage's "done" mark
            save_safetensors(state, self.dir / "fine_tuned.safetensors")
            self._write("fine_tune.json", history)

    def measured(self, label: str) -> tuple[float, float] | None:
        """The stored (clean, robust) accuracy of an interpolation point, or None."""
        found = (self._read("interpolation.json") or {}).get(label)
        return tuple(found) if found is not None else None

    def save_measured(self, label: str, clean: float, robust: float) -> None:
        if self.dir:
            self._write("interpolation.json", {**(self._read("interpolation.json") or {}), label: [clean, robust]})

    def clear(self) -> None:
        """Remove the stage results (the run has written its model)."""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
