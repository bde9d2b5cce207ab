"""Input normalization as the first layer of a model, so attacks work on [0, 1] pixels.

Normalization belongs to the model, never to the data pipeline: eps is then measured on
raw pixels and every attack sees the same input space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkit.errors import DataError, UsageError

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]

#: Named mean/std presets accepted by :func:`parse_normalize`.
PRESETS: dict[str, MeanStd] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_ACCEPTED = "cifar10, cifar100, imagenet, none, or 'm1,m2,m3:s1,s2,s3'"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers so they follow ``.to()``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise UsageError(
                f"Normalization needs one mean and one std per channel; got {len(mean)} means "
                f"and {len(std)} stds."
            )
        if any(s <= 0 for s in std):
            raise UsageError(f"Normalization std must be positive; got {tuple(std)}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:  # never broadcast 1 channel to 3 silently
            raise DataError(f"The model takes {self.channels}-channel images (N×{self.channels}×H×W), got shape "
                            f"{tuple(x.shape)}; robustkit never broadcasts grayscale to RGB: give data with "
                            f"{self.channels} channels.")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def _floats(text: str, what: str, spec: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"Cannot read the {what} of normalization {spec!r}; accepted: {_ACCEPTED}."
        ) from None
    return values


def parse_normalize(spec: str | None) -> MeanStd | None:
    """Turn a normalization spec into ``(mean, std)``, or ``None`` for no normalization.

    Accepts a preset name (``cifar10``, ``cifar100``, ``imagenet``), ``none``/``None``, or a
    literal ``m1,m2,m3:s1,s2,s3`` with any number of channels.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise UsageError(f"Normalization must be a name or 'mean:std' text; got {spec!r}.")
    text = spec.strip().lower()
    if text in ("none", ""):
        return None
    if text in PRESETS:
        return PRESETS[text]
    if ":" not in text:
        raise UsageError(f"Unknown normalization {spec!r}; accepted: {_ACCEPTED}.")
    mean_text, _, std_text = text.partition(":")
    mean = _floats(mean_text, "mean", spec)
    std = _floats(std_text, "std", spec)
    if len(mean) != len(std):
        raise UsageError(
            f"Normalization {spec!r} has {len(mean)} means but {len(std)} stds; give one of each "
            "per channel."
        )
    if any(s <= 0 for s in std):
        raise UsageError(f"Normalization {spec!r} has a std that is not positive.")
    return mean, std


def training_normalize(
    requested: str | None, default: str | None, channels: int, model: str, data_name: str
) -> tuple[Normalize | None, str | None]:
    """The Normalize layer a model trained on ``channels``-channel images gets, and a note when it is
    not what was asked for. ``requested`` is ``"default"`` (the model's ``default``) or an explicit
    spec. An explicit one must fit the channels. The model's default follows the data: a 3-channel
    preset on 1-channel images becomes its channel average, a 1-channel one is repeated for
    3-channel images (the note says so; ``--normalize`` chooses another)."""
    spec = default if requested == "default" else requested
    mean_std = parse_normalize(spec)
    if mean_std is None:
        return None, None
    mean, std = mean_std
    if len(mean) == channels:
        return Normalize(mean, std), None
    if requested != "default":
        raise UsageError(f"Normalization {spec!r} has {len(mean)} channels but {data_name} images have {channels}; "
                         "pass --normalize none or one that fits.")
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    elif len(mean) == 1:
        mean, std = mean * channels, std * channels
    else:
        return None, (f"{model}'s default normalization {spec!r} is for {len(mean)}-channel images and "
                      f"{data_name} has {channels}: training without normalization (--normalize sets one).")
    shown = ",".join(f"{v:.4g}" for v in mean) + ":" + ",".join(f"{v:.4g}" for v in std)
    return Normalize(mean, std), (
        f"{model}'s default normalization {spec!r} is for {len(mean_std[0])}-channel images and {data_name} has "
        f"{channels}: using {shown} (--normalize sets another)."
    )
