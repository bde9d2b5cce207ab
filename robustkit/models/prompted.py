"""EVP visual prompting (Wu et al., "Unleashing the Power of Visual Prompting At the Pixel Level",
arXiv 2212.10556; code UCSC-VLAA/EVP): a frozen classifier adapted to another task by a frame of
learnable pixels around the input image, shrunk to make room for it, plus the paper's label mapping.

:class:`PromptedModel` is a model like any other: it takes [0, 1] images of the target task (any
size; one channel is repeated when the backbone takes more), shrinks them to the backbone's input
size less the frame (``H - 2·prompt_size``), puts the learned frame around them, runs the frozen
backbone (its normalization layer included, as the reference normalizes image and prompt together)
and, when the label sets differ, reads each target class off its mapped source logit. Attacks
therefore perturb the target images and never the prompt.

Files: the prompt is ``frame`` (C × frame pixels, row-major order of the frame's pixels) and, when
there is one, ``label_map`` (target class -> source class) in a ``.safetensors`` file, with a JSON
sidecar next to it (``P.safetensors`` -> ``P.json``, format ``robustkit-prompt/1``) that records the
geometry and the backbone (registry name, checkpoint path and sha256, normalization), so
``load_prompted_model(P)`` rebuilds the prompted model without repeating them. Training:
:mod:`robustkit.training.prompt`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustkit.errors import CheckpointError, UsageError
from robustkit.models.build import load_model
from robustkit.models.checkpoint import file_sha256

PROMPT_FORMAT = "robustkit-prompt/1"
#: The reference geometry (EVP main.py): a 30-pixel frame around a 164-pixel image, 224-pixel input.
REFERENCE_INPUT, REFERENCE_PROMPT = 224, 30
LABEL_MAPS = ("auto", "frequency", "identity")


def default_prompt_size(side: int) -> int:
    """The paper's frame width scaled to the backbone's input side: 30 px at 224 px (4 at 32)."""
    return max(1, round(REFERENCE_PROMPT * side / REFERENCE_INPUT))


def check_prompt_size(prompt_size: int, input_size: tuple[int, int, int]) -> tuple[int, int]:
    """The shrunk image's (height, width) inside a frame of ``prompt_size`` pixels; a UsageError
    when the frame leaves no room for the image."""
    _, height, width = input_size
    if isinstance(prompt_size, bool) or not isinstance(prompt_size, int) or prompt_size < 1:
        raise UsageError(f"--prompt-size must be a positive number of pixels, got {prompt_size!r}.")
    largest = (min(height, width) - 1) // 2
    if prompt_size > largest:
        raise UsageError(
            f"--prompt-size {prompt_size} leaves no room for the image in the backbone's {height}x{width} input; "
            f"use at most {largest} (the paper's 30 px is for 224 px inputs; {default_prompt_size(min(height, width))} "
            f"is the same ratio here)."
        )
    return height - 2 * prompt_size, width - 2 * prompt_size


def frame_index(input_size: tuple[int, int, int], prompt_size: int) -> torch.Tensor:
    """Flat (row-major) indices of the frame's pixels in an ``H × W`` image."""
    _, height, width = input_size
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[prompt_size : height - prompt_size, prompt_size : width - prompt_size] = True
    return (~inside).flatten().nonzero().flatten()


class PromptedModel(nn.Module):
    """A frozen ``backbone`` behind a learnable pixel frame (and a label mapping); see the module doc.

    ``input_size`` is the backbone's (C, H, W); ``label_map[t]`` is the source class whose logit
    scores target class ``t`` (None: the logits as they are). Only ``frame`` is trainable; the
    backbone's parameters are frozen and it stays in eval mode (its BatchNorm statistics never move).
    """

    def __init__(self, backbone: nn.Module, *, input_size: tuple[int, int, int], prompt_size: int,
                 label_map: torch.Tensor | None = None):
        super().__init__()
        self.input_size = tuple(int(v) for v in input_size)
        self.prompt_size = int(prompt_size)
        self.inner_size = check_prompt_size(self.prompt_size, self.input_size)  # type: ignore[arg-type]
        self.backbone = backbone.requires_grad_(False).eval()
        index = frame_index(self.input_size, self.prompt_size)  # type: ignore[arg-type]
        self.register_buffer("frame_index", index, persistent=False)
        self.frame = nn.Parameter(torch.zeros(self.input_size[0], len(index)))  # the reference's zero init
        self.label_map: torch.Tensor | None
        self.register_buffer("label_map", None if label_map is None else torch.as_tensor(label_map).long())

    def train(self, mode: bool = True) -> PromptedModel:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    def trainable_parameters(self) -> int:
        """The number of trained values: the frame's pixels (the label mapping is computed, not trained)."""
        return self.frame.numel()

    def compose(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's input: ``x`` resized to the inner size, the frame around it. The inner
        region is exactly the resized image (the frame adds zeros there)."""
        channels, height, width = self.input_size
        if x.dim() != 4:
            raise UsageError(f"A prompted model takes N×C×H×W images, got shape {tuple(x.shape)}.")
        if x.shape[1] != channels:
            if x.shape[1] != 1:
                raise UsageError(f"The backbone takes {channels}-channel images; got {x.shape[1]} channels "
                                 "(only 1-channel images are expanded).")
            x = x.expand(-1, channels, -1, -1)
        if tuple(x.shape[-2:]) != self.inner_size:
            x = F.interpolate(x, size=self.inner_size, mode="bilinear", align_corners=False, antialias=True)
        p = self.prompt_size
        canvas = F.pad(x, (p, p, p, p))
        frame = self.frame.new_zeros(channels, height * width).index_copy(1, self.frame_index, self.frame)
        return canvas + frame.view(1, channels, height, width).to(canvas.dtype)

    def map_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Target-class logits: the mapped source logits (all of them without a mapping)."""
        return logits if self.label_map is None else logits[:, self.label_map]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map_labels(self.backbone(self.compose(x)))

    def canvas(self) -> torch.Tensor:
        """The prompt as an image (C × H × W): the frame, zeros where the image goes."""
        channels, height, width = self.input_size
        flat = self.frame.detach().new_zeros(channels, height * width)
        return flat.index_copy(1, self.frame_index, self.frame.detach()).view(channels, height, width)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, prompt_size={self.prompt_size}, inner_size={self.inner_size}, "
                f"trainable={self.trainable_parameters()}")


# -- label mapping -------------------------------------------------------------------------------


def resolve_label_map(kind: str, num_source: int, num_target: int) -> str:
    """``auto`` -> ``frequency`` when the class counts differ, ``identity`` when they agree (pass
    ``frequency`` when the label sets differ in meaning only, e.g. CIFAR-10 -> MNIST)."""
    if kind not in LABEL_MAPS:
        raise UsageError(f"Unknown --label-map {kind!r}; accepted: {', '.join(LABEL_MAPS)}.")
    if kind == "auto":
        kind = "identity" if num_source == num_target else "frequency"
    if num_target > num_source:
        raise UsageError(f"The backbone has {num_source} classes, fewer than the dataset's {num_target}; "
                         "a prompt can only map each target class to its own source class.")
    return kind


def frequency_label_map(predictions: torch.Tensor, labels: torch.Tensor, num_target: int,
                        num_source: int) -> torch.Tensor:
    """The paper's mapping (EVP ``util/get_index.py``): each target class takes the source class
    the frozen backbone predicts most often on its training images. Where two target classes share
    their most frequent source class (the reference then gives them identical logits), the pairs
    are assigned one-to-one, greedily by count — which is the per-class mode whenever modes differ."""
    if num_target > num_source:
        raise UsageError(f"Cannot map {num_target} target classes one-to-one onto {num_source} source classes.")
    counts = torch.zeros(num_target, num_source, dtype=torch.float64)
    counts.index_put_((labels.long().cpu(), predictions.long().cpu()),
                      torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    mapping = torch.full((num_target,), -1, dtype=torch.long)
    for _ in range(num_target):
        flat = int(counts.argmax())
        target, source = divmod(flat, num_source)
        mapping[target] = source
        counts[target, :] = -1.0
        counts[:, source] = -1.0
    return mapping


# -- files ---------------------------------------------------------------------------------------


def prompt_sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``prompt.safetensors`` -> ``prompt.json``."""
    return Path(path).with_suffix(".json")


def read_prompt_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar ``robustkit train prompt`` wrote next to ``path``; CheckpointError when the
    prompt file or its sidecar is missing or is not a robustkit prompt."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Prompt file not found: {p}.")
    side = prompt_sidecar_path(p)
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} has no sidecar {side.name}; "
                              "pass a prompt written by `robustkit train prompt`.") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read the prompt sidecar {side} ({e}).") from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("robustkit-prompt"):
        raise CheckpointError(f"{side} is not a robustkit prompt sidecar (format {PROMPT_FORMAT}).")
    return data


def normalize_spec(backbone: nn.Module) -> str:
    """The backbone's normalization as ``load_model(normalize=...)`` text: ``m1,..:s1,..`` or ``none``."""
    layer = getattr(backbone, "normalization", None)
    if layer is None:
        return "none"

    def text(t: torch.Tensor) -> str:
        return ",".join(repr(float(v)) for v in t.detach().cpu().flatten().float())

    return f"{text(layer.mean)}:{text(layer.std)}"


def save_prompt(model: PromptedModel, path: str | os.PathLike[str], sidecar: dict[str, Any]) -> tuple[Path, Path]:
    """Write the frame (and label map) as safetensors and ``sidecar`` (plus geometry, sha256) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"frame": model.frame.detach().cpu().contiguous().clone()}
    if model.label_map is not None:
        tensors["label_map"] = model.label_map.detach().cpu().contiguous().clone()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": PROMPT_FORMAT})
    os.replace(tmp, path)
    side = {
        **sidecar,
        "format": PROMPT_FORMAT,
        "input_size": list(model.input_size),
        "prompt_size": model.prompt_size,
        "inner_size": list(model.inner_size),
        "label_map": None if model.label_map is None else model.label_map.tolist(),
        "trainable_parameters": model.trainable_parameters(),
        "sha256": file_sha256(path),
    }
    side_path = prompt_sidecar_path(path)
    tmp = side_path.with_name(side_path.name + ".tmp")
    tmp.write_text(json.dumps(side, indent=1, default=str))
    os.replace(tmp, side_path)
    return path, side_path


def prompt_backbone(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """The backbone (registry name, checkpoint) a prompt was trained on, from its sidecar."""
    backbone = read_prompt_sidecar(path).get("backbone") or {}
    if not backbone.get("model"):
        raise CheckpointError(f"The sidecar of {path} names no backbone model; pass --model and --checkpoint.")
    return str(backbone["model"]), backbone.get("checkpoint")


def _check_backbone(backbone: nn.Module, recorded: dict[str, Any], path: Path) -> None:
    """A UsageError when ``backbone``'s checkpoint file is not the one the prompt was trained on."""
    checkpoint, sha = getattr(backbone, "checkpoint", None), recorded.get("sha256")
    if checkpoint and sha and Path(checkpoint).is_file() and file_sha256(checkpoint) != sha:
        raise UsageError(f"The prompt {path.name} was trained on other backbone weights than {checkpoint} "
                         f"(sha256 {sha[:12]}…); give the backbone it was trained on.")
    spec, trained = normalize_spec(backbone), recorded.get("normalize")
    if trained and spec != trained:
        raise UsageError(f"The prompt {path.name} was trained with the backbone normalized as {trained!r}, "
                         f"not {spec!r}; pass --normalize {trained}.")


def load_prompted_model(path: str | os.PathLike[str], backbone: nn.Module | None = None) -> PromptedModel:
    """The prompted model a ``robustkit train prompt`` file describes, in eval mode. Without
    ``backbone`` the sidecar's backbone is loaded (its checkpoint verified by sha256)."""
    path = Path(path)
    side = read_prompt_sidecar(path)
    recorded = side.get("backbone") or {}
    if backbone is None:
        name, checkpoint = prompt_backbone(path)
        if checkpoint and not Path(checkpoint).is_file():
            raise CheckpointError(f"The backbone checkpoint of {path.name} is missing ({checkpoint}); "
                                  "pass --model and --checkpoint.")
        backbone = load_model(name, checkpoint, normalize=recorded.get("normalize", "default"),
                              sha256=recorded.get("sha256") if checkpoint else None)
    else:
        _check_backbone(backbone, recorded, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Cannot read the prompt {path} as safetensors ({e}).") from None
    model = PromptedModel(backbone, input_size=tuple(side["input_size"]), prompt_size=int(side["prompt_size"]),
                          label_map=tensors.get("label_map"))
    frame = tensors.get("frame")
    if frame is None or frame.shape != model.frame.shape:
        got = None if frame is None else tuple(frame.shape)
        raise CheckpointError(f"{path} holds no frame of shape {tuple(model.frame.shape)} (got {got}).")
    with torch.no_grad():
        model.frame.copy_(frame)
    return model.eval()


def prompt_label(path: str | os.PathLike[str]) -> str:
    """How a prompted evaluation is named in the leaderboard: ``prompt@<sha256 prefix>``."""
    side = read_prompt_sidecar(path)
    return f"prompt@{str(side.get('sha256', ''))[:8] or Path(path).stem}"


def wrap_prompt(model: nn.Module, path: str | os.PathLike[str] | None) -> nn.Module:
    """``model`` behind the prompt in ``path`` (unchanged without one): what ``robustkit eval --prompt`` runs."""
    return model if not path else load_prompted_model(path, backbone=model)


def reference_lr(frame_pixels: int) -> float:
    """EVP's learning rate, 70 for its 30-px frame at 224 px (69,840 values), scaled by the square
    root of the frame's size so that each pixel moves as much per normalized step as there."""
    reference = 3 * (REFERENCE_INPUT**2 - (REFERENCE_INPUT - 2 * REFERENCE_PROMPT) ** 2)
    return 70.0 * math.sqrt(frame_pixels / reference)


__all__ = [
    "PROMPT_FORMAT", "PromptedModel", "check_prompt_size", "default_prompt_size", "frequency_label_map",
    "load_prompted_model", "prompt_backbone", "prompt_label", "read_prompt_sidecar", "reference_lr",
    "resolve_label_map", "save_prompt", "wrap_prompt",
]
