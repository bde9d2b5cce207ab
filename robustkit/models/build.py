"""Build and load zoo models by name: registry entry -> network -> weights -> Normalize wrapper."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from robustkit.errors import UsageError
from robustkit.models.checkpoint import apply_state_dict, file_sha256, load_state_dict, unwrap_state_dict
from robustkit.models.external import external_info, is_external
from robustkit.models.normalize import Normalize, parse_normalize
from robustkit.models.robustbench import is_robustbench, parse_ref, qualify, robustbench_info
from robustkit.models.robustbench_weights import load_robustbench, weights_path
from robustkit.models.zoo import ModelInfo, ZooModel
from robustkit.registry import MODELS

#: Weights robustkit ships inside the package, used when no checkpoint is given.
PACKAGED_WEIGHTS = {"digits-cnn": Path(__file__).parent / "weights" / "digits_cnn.safetensors"}

NormalizeSpec = str | tuple[Sequence[float], Sequence[float]] | None


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name`` (an alias, ``torchvision:NAME``, ``timm:NAME`` or
    ``robustbench:NAME`` too)."""
    if is_external(name):
        return external_info(name)
    if is_robustbench(name):
        return robustbench_info(name)
    entry = MODELS.get(name)
    if isinstance(entry, ModelInfo):
        return entry
    if callable(entry):  # a bare factory registered by a third-party entry point
        doc = (inspect.getdoc(entry) or "").split("\n")[0]
        return ModelInfo(entry, None, (3, 32, 32), 10, doc or f"third-party model {name}")
    raise TypeError(f"MODELS entry {name!r} is neither a ModelInfo nor a factory: {entry!r}")


def _canonical(name: str) -> str:
    if is_robustbench(name):
        return qualify(name)
    return name if is_external(name) else MODELS.canonical(name)


def _accepts(factory: object, param: str) -> bool:
    try:
        params = inspect.signature(factory).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    return param in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _positive(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{what} must be a positive integer; got {value!r}.")


def build_model(
    name: str, *, num_classes: int | None = None, in_channels: int | None = None
) -> nn.Module:
    """The bare network for ``name`` with fresh weights: logits out, no normalization layer."""
    _positive(num_classes, "num_classes")
    _positive(in_channels, "in_channels")
    info = model_info(name)
    if is_robustbench(name):  # the zoo's builders take no arguments
        if num_classes not in (None, info.num_classes) or in_channels not in (None, info.input_size[0]):
            raise UsageError(f"{name} is built as RobustBench defines it; drop num_classes/in_channels.")
        return info.factory()
    kwargs: dict[str, int] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        if not _accepts(info.factory, "in_channels"):
            raise UsageError(
                f"Model {name!r} has a fixed number of input channels; drop in_channels."
            )
        kwargs["in_channels"] = in_channels
    return info.factory(**kwargs)


def _normalize_layer(normalize: NormalizeSpec, info: ModelInfo, key: str) -> Normalize | None:
    """The Normalize layer ``normalize`` asks for (``"default"``: the entry's), or None."""
    spec = info.normalize if isinstance(normalize, str) and normalize == "default" else normalize
    if spec is None or isinstance(spec, str):
        mean_std = parse_normalize(spec)
    elif isinstance(spec, tuple | list) and len(spec) == 2:
        mean_std = tuple(float(v) for v in spec[0]), tuple(float(v) for v in spec[1])
    else:
        raise UsageError(
            "normalize must be 'default', 'none', a preset name, 'm1,m2,m3:s1,s2,s3' or a "
            f"(mean, std) pair; got {normalize!r}."
        )
    if mean_std is None:
        return None
    channels = info.input_size[0]
    if len(mean_std[0]) != channels:
        raise UsageError(
            f"Normalization {spec!r} has {len(mean_std[0])} channels but {key} takes "
            f"{channels}-channel inputs."
        )
    return Normalize(*mean_std)


def load_model(
    name: str,
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    *,
    normalize: NormalizeSpec = "default",
    sha256: str | None = None,
    num_classes: int | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int | None = None,
) -> ZooModel:
    """Build ``name``, load ``checkpoint`` safely into it, and put Normalize in front.

    ``normalize="default"`` uses the entry's normalization (what its published weights
    expect); ``None``/``"none"`` adds no layer; a preset name, ``"m1,m2,m3:s1,s2,s3"`` or a
    ``(mean, std)`` pair sets it explicitly. ``sha256`` verifies the checkpoint file first.
    ``digits-cnn`` without a checkpoint gets robustkit's packaged weights when present.
    ``seed`` seeds the initialization (what a model without weights keeps) from a generator of its
    own, leaving torch's global RNG as it was; None draws from the global RNG.
    The result is a :class:`ZooModel` in eval mode (``.name``, ``.info``, ``.net``).

    ``robustbench:[DATASET/THREAT_MODEL/]NAME`` builds RobustBench's zoo entry and, without a
    checkpoint, reads its weights from RobustBench's layout under ``model_dir`` (downloaded
    only with ``download=True``); see :func:`robustkit.models.robustbench_weights.load_robustbench`.
    """
    if is_robustbench(name):
        return load_robustbench(name, checkpoint, model_dir=model_dir, download=download,
                                normalize=normalize, sha256=sha256)
    if model_dir is not None or download:
        raise UsageError(f"model_dir and download locate RobustBench weights; {name!r} is not a robustbench: model.")
    key = _canonical(name)
    info = model_info(key)
    layer = _normalize_layer(normalize, info, key)
    net = _seeded_build(key, num_classes, seed)
    if checkpoint is None and key in PACKAGED_WEIGHTS and PACKAGED_WEIGHTS[key].is_file():
        checkpoint = PACKAGED_WEIGHTS[key]
    if sha256 is not None and (checkpoint is None or isinstance(checkpoint, Mapping)):
        raise UsageError("sha256 checks a checkpoint file; give the checkpoint path as well.")
    source: str | None = None
    if isinstance(checkpoint, Mapping):
        apply_state_dict(net, unwrap_state_dict(checkpoint), name=key)
        source = "<state dict>"
    elif checkpoint is not None:
        apply_state_dict(net, load_state_dict(checkpoint, sha256=sha256), name=key)
        source = os.fspath(checkpoint)
    return ZooModel(key, info, net, layer, checkpoint=source).eval()


def _seeded_build(key: str, num_classes: int | None, seed: int | None) -> nn.Module:
    """``build_model`` with its initialization drawn from ``seed`` (global CPU RNG forked and restored)."""
    if seed is None:
        return build_model(key, num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(key, num_classes=num_classes)


def weights_sha256(model: str, checkpoint: str | None = None, model_dir: str | None = None) -> str:
    """sha256 of the weights ``model`` is evaluated with: ``checkpoint``, else RobustBench's file in
    ``model_dir`` or the packaged weights; "" when there is no file (random weights)."""
    if not checkpoint and is_robustbench(model):  # the weights in RobustBench's layout
        checkpoint = str(weights_path(parse_ref(model), model_dir))
    if checkpoint:
        return file_sha256(checkpoint) if Path(checkpoint).is_file() else ""
    packaged = PACKAGED_WEIGHTS.get(model)
    return file_sha256(packaged) if packaged and packaged.is_file() else ""
