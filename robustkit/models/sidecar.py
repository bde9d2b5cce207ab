"""The training sidecar: ``model.json`` beside the weights ``robustkit train`` writes, so that
evaluation, surrogates and fine-tuning rebuild the model (architecture, transforms,
normalization) from the checkpoint alone; and the atomic writers those files use."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

from robustkit import __version__
from robustkit.errors import CheckpointError
from robustkit.models.build import ModelInfo, ZooModel, build_model, load_model, model_info
from robustkit.models.normalize import Normalize
from robustkit.registry import MODELS

SIDECAR_FORMAT = "robustkit-train/1"


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(cpu_state(state), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    return {
        "robustkit": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
        "platform": platform.platform(),
    }  # fmt: skip


def normalize_spec(layer: Normalize | None) -> str:
    if layer is None:
        return "none"
    def text(t: torch.Tensor) -> str:  # shortest text that gives back the same float32 values
        return ",".join(str(v) for v in t.detach().cpu().flatten().numpy().astype(np.float32))

    return f"{text(layer.mean)}:{text(layer.std)}"


def sidecar_path(checkpoint: str | os.PathLike[str]) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(checkpoint).with_suffix(".json")


def read_sidecar(checkpoint_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON sidecar ``robustkit train`` wrote next to ``checkpoint_path`` (``X.json`` or
    ``X.safetensors.json``), or None when there is none (a checkpoint from elsewhere).

    Keys for evaluation: ``model`` (the registry name trained), ``normalize`` (a spec that
    ``load_model(normalize=...)`` accepts: ``"none"`` or ``"m1,m2,m3:s1,s2,s3"``),
    ``num_classes``, ``in_channels``, ``architecture`` (model transforms to replay; see
    :func:`load_trained_model` and :func:`sidecar_model_name`), plus ``recipe``, ``data``,
    ``seed``, ``versions`` and ``final_metrics``.
    """
    p = Path(checkpoint_path)
    for candidate in (sidecar_path(p), p.with_name(p.name + ".json")):
        if candidate.is_file() and candidate != p:
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(data, dict) and str(data.get("format", "")).startswith("robustkit-train"):
                return data
    return None


def _needs_derived_name(side: dict[str, Any], info: ModelInfo) -> bool:
    return (bool(side.get("architecture")) or side.get("in_channels") != info.input_size[0]
            or side.get("num_classes") != info.num_classes)


def sidecar_model_name(side: dict[str, Any]) -> str:
    """A model name ``load_model`` can build for this sidecar: the trained registry name, or —
    when the training changed the architecture (stride/activation tricks, other input channels) —
    a derived name such as ``digits-cnn+stride2-1x8x8+silu`` registered in ``MODELS`` for this
    process, whose factory builds the base model and replays the transforms."""
    base = side["model"]
    info = model_info(base)
    if not _needs_derived_name(side, info):
        return base
    tags = []
    if side.get("in_channels") != info.input_size[0]:
        tags.append(f"in{side['in_channels']}")
    if side.get("num_classes") != info.num_classes:
        tags.append(f"{side['num_classes']}cls")
    for spec in side.get("architecture", []):
        if spec["name"] == "large-stride":
            size = "x".join(str(s) for s in spec.get("input_size") or [])
            tags.append(f"stride{spec['stride']}" + (f"-{size}" if size else ""))
        elif spec["name"] == "smooth-activation":
            tags.append(spec["activation"])
        else:
            tags.append(spec["name"])
    name = f"{base.replace(':', '-')}+{'+'.join(tags)}".lower()  # never looks like timm:/torchvision:
    if name not in MODELS:
        # lazy: robustkit.defenses imports robustkit.models (a cycle at module level)
        from robustkit.defenses.fgsm_tricks import apply_architecture

        specs = [dict(s) for s in side.get("architecture", [])]
        classes, channels = int(side["num_classes"]), int(side["in_channels"])
        input_size = tuple(side.get("input_size") or (channels, *info.input_size[1:]))

        def factory(num_classes: int = classes, in_channels: int = channels) -> nn.Module:
            net = build_model(base, num_classes=num_classes,
                              in_channels=in_channels if in_channels != info.input_size[0] else None)
            return apply_architecture(net, specs, torch.zeros(1, *input_size))

        factory.__doc__ = f"{base} as trained by robustkit train ({', '.join(tags)})"
        MODELS.add(name, ModelInfo(factory, info.normalize, input_size, classes, factory.__doc__))
    return name


def load_trained_model(checkpoint: str | os.PathLike[str]) -> ZooModel:
    """Rebuild a model ``robustkit train`` saved: architecture, transforms, weights and the
    normalization, all from the sidecar (no name or normalization to repeat)."""
    side = read_sidecar(checkpoint)
    if side is None:
        raise CheckpointError(f"{checkpoint} has no robustkit training sidecar ({sidecar_path(checkpoint).name}).")
    return load_model(sidecar_model_name(side), checkpoint, normalize=side["normalize"])


