"""Per-epoch checkpoints of the one loop (atomic folders + ``state.json``), their resume check,
the metrics files and the EMA of the weights."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.errors import CheckpointError, UsageError
from robustkit.models import load_state_dict
from robustkit.models.sidecar import save_safetensors, write_text
from robustkit.training.co_detector import COCheck

#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {"resume", "epochs", "device", "eval_attacks", "eval_n_examples", "db", "out", "dist_timeout"}
)
METRIC_COLUMNS = (
    "epoch", "steps", "lr", "loss", "train_acc", "clean_acc", "fgsm_acc", "pgd_acc", "co", "co_reason",
    "seconds", "eval_seconds", "rollbacks",
)  # fmt: skip


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


def check_resumable(saved: dict[str, Any], now: dict[str, Any], may_differ: frozenset[str] = RESUMABLE_CHANGES) -> None:
    """A one-line UsageError naming the options (other than ``may_differ``) that a resumed run
    changed against the interrupted one (``saved``)."""
    changed = sorted(k for k in set(saved) | set(now) if k not in may_differ and saved.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed[:3])
        raise UsageError(
            f"--resume needs the options of the interrupted run; these differ: {shown}"
            f"{', ...' if len(changed) > 3 else ''}."
        )
