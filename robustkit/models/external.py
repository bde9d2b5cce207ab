"""Architectures from torchvision and timm, named ``torchvision:NAME`` and ``timm:NAME``.

They are not registry entries (hundreds of names, timm optional) but are resolved by
``build_model``/``load_model``. Weights are never downloaded here (``weights=None``,
``pretrained=False``): pass a checkpoint file. Default normalization is ``imagenet``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

from robustkit.errors import DependencyError, UnknownNameError, UsageError
from robustkit.models.zoo import ModelInfo

PREFIXES = ("torchvision", "timm")


class UnknownExternalModelError(UnknownNameError):
    """A torchvision/timm architecture name the library does not know."""

    def __init__(self, library: str, name: str, known: list[str], listing: str):
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(f'{library}:{c}') for c in close)}?" if close else ""
        UsageError.__init__(
            self, f"Unknown {library} model {name!r}.{hint} See {listing} for the names."
        )


def is_external(name: str) -> bool:
    """True for ``torchvision:NAME`` and ``timm:NAME``."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix.lower() in PREFIXES


def _split(name: str) -> tuple[str, str]:
    prefix, _, arch = name.partition(":")
    arch = arch.strip()
    if not arch:
        raise UsageError(f"Model {name!r} names no architecture; write e.g. '{prefix}:resnet18'.")
    return prefix.lower(), arch


def _torchvision_factory(arch: str) -> Callable[..., nn.Module]:
    # heavy lazy: torchvision loads only for torchvision:NAME models
    import torchvision

    known = torchvision.models.list_models()
    if arch not in known:
        raise UnknownExternalModelError(
            "torchvision", arch, known, "torchvision.models.list_models()"
        )

    def build(num_classes: int = 1000) -> nn.Module:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

    return build


def _timm_factory(arch: str) -> Callable[..., nn.Module]:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise DependencyError("timm", "pip install timm") from None
    known = timm.list_models()
    if arch not in known:
        raise UnknownExternalModelError("timm", arch, known, "timm.list_models()")

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )

    return build


def external_info(name: str) -> ModelInfo:
    """The ModelInfo for ``torchvision:NAME``/``timm:NAME`` (ImageNet defaults)."""
    library, arch = _split(name)
    factory = _torchvision_factory(arch) if library == "torchvision" else _timm_factory(arch)
    return ModelInfo(
        factory=factory,
        normalize="imagenet",
        input_size=(3, 224, 224),
        num_classes=1000,
        description=f"{arch} from {library} (no pretrained weights)",
    )
