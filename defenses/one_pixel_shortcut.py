"""One-Pixel Shortcut (OPS): unlearnable training data made by changing one pixel per image
(Wu, Chen, Xie and Huang, "One-Pixel Shortcut: on the Learning Preference of Deep Neural
Networks", ICLR 2023, arXiv:2205.12141; code github.com/cychomatica/One-Pixel-Shotcut).

Every training image of class ``k`` gets the same pixel position ``(row, col)`` set to the same
colour, a corner of the colour cube (each channel 0 or 1). A network trained on such data learns
the pixel instead of the content and does poorly on clean test images. The search is model-free
and follows ``pixel_search`` in the reference's ``perturb.py``:

* for each class, each position ``p`` and each of the ``2**C`` corner colours ``c``, let
  ``d = |c - x[:, :, p]|`` over the class's images *and* channels; the score is
  ``mean(d) / std(d)`` (population std): deviate far from the original pixels, and stably so;
* classes are searched in label order; a (position, colour) pair taken by an earlier class is
  excluded for later ones (the same position with another colour stays allowed);
* the best-scoring pair wins; ties go to the first in (row, col, colour) order, colour index
  ``sum(c[i] * 2**(C-1-i))`` (channel 0 is the most significant bit, as in the reference).

Where ``d`` is constant over a class (a pixel that is black in every image of the class, common
in MNIST borders) ``std(d) = 0``: the score is ``+inf`` when ``mean(d) > 0`` (a perfectly stable
deviation) and 0 when the colour equals the pixel; the reference divides by zero there. Classes
without images are searched last and take the first free pair (their pattern is never applied).

The search needs two passes over the data and per-class sums only (``mean`` and ``std`` of ``d``
follow from the per-channel class means and squared deviations, since ``|c - x|`` is ``x`` or
``1 - x`` for a corner colour): 50,000 CIFAR-sized images take about 12 s on one CPU thread.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from robustkit.data import Dataset
from robustkit.errors import DataError, UsageError
from robustkit.registry import DEFENSES

PATTERN_FORMAT = "robustkit-ops/1"
#: The search visits ``2**C`` colours per position; more channels than this are refused.
MAX_CHANNELS = 8
#: A deviation std at or below this counts as zero (8-bit data never comes close).
STD_TOL = 1e-12


@dataclass(frozen=True)
class OPSPattern:
    """The per-class pixel: ``positions[k] = (row, col)``, ``colors[k]`` (one 0.0/1.0 per
    channel), the search ``scores[k]`` (``inf`` for a constant deviation) and ``counts[k]``
    (images of class ``k`` the search saw); ``image_shape`` is ``(C, H, W)``."""

    positions: tuple[tuple[int, int], ...]
    colors: tuple[tuple[float, ...], ...]
    scores: tuple[float, ...]
    counts: tuple[int, ...]
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.positions)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; an infinite score is written as the string ``"inf"``."""
        rows = zip(self.positions, self.colors, self.scores, self.counts, strict=True)
        classes = [
            {"label": k, "row": r, "col": c, "color": list(col), "score": s if math.isfinite(s) else "inf", "count": n}
            for k, ((r, c), col, s, n) in enumerate(rows)
        ]
        return {
            "format": PATTERN_FORMAT,
            "method": "one-pixel-shortcut",
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "classes": classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPSPattern:
        """Inverse of :meth:`to_dict`; anything malformed is a one-line DataError."""
        try:
            if data.get("format") != PATTERN_FORMAT:
                raise DataError(f"Not an OPS pattern (format {data.get('format')!r}, expected {PATTERN_FORMAT!r}).")
            shape = tuple(int(v) for v in data["image_shape"])
            rows = sorted(data["classes"], key=lambda e: int(e["label"]))
            if len(shape) != 3 or [int(e["label"]) for e in rows] != list(range(len(rows))) or not rows:
                raise DataError("An OPS pattern needs image_shape [C, H, W] and one entry per label 0..K-1.")
            pattern = cls(
                positions=tuple((int(e["row"]), int(e["col"])) for e in rows),
                colors=tuple(tuple(float(v) for v in e["color"]) for e in rows),
                scores=tuple(float(e["score"]) for e in rows),
                counts=tuple(int(e.get("count", 0)) for e in rows),
                image_shape=shape,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"Malformed OPS pattern ({type(e).__name__}: {e}).") from None
        pattern.check()
        return pattern

    def check(self) -> None:
        """Raise a DataError if a position lies outside the image or a colour is not a corner."""
        c, h, w = self.image_shape
        k = len(self.positions)
        if not k or not len(self.colors) == len(self.scores) == len(self.counts) == k:
            raise DataError("An OPS pattern needs one position, colour, score and count per class.")
        for k, ((r, col), colour) in enumerate(zip(self.positions, self.colors, strict=True)):
            if not (0 <= r < h and 0 <= col < w):
                raise DataError(f"OPS pattern: class {k}'s pixel ({r}, {col}) lies outside the {h}×{w} image.")
            if len(colour) != c or any(v not in (0.0, 1.0) for v in colour):
                raise DataError(f"OPS pattern: class {k}'s colour {list(colour)} is not {c} values of 0 or 1.")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the pattern as JSON (see :meth:`to_dict`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OPSPattern:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"OPS pattern file not found: {path}.")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"Cannot read {path} as JSON ({e}).") from None
        if not isinstance(data, dict):
            raise DataError(f"{path} does not hold an OPS pattern (a JSON object).")
        return cls.from_dict(data)


# -- checks ---------------------------------------------------------------------------------


def _check_images(x: Any) -> None:
    if not torch.is_tensor(x):
        raise UsageError(f"OPS needs images as a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 4:
        raise DataError(f"OPS needs images of shape N×C×H×W, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise DataError(f"OPS needs float images in [0, 1], got dtype {x.dtype}.")
    if 0 in x.shape[1:]:
        raise DataError(f"OPS needs images with at least one channel and pixel, got shape {tuple(x.shape)}.")
    if x.shape[1] > MAX_CHANNELS:
        raise DataError(
            f"OPS searches 2**C corner colours; images with {x.shape[1]} > {MAX_CHANNELS} channels are not supported."
        )
    if x.numel():
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise DataError("OPS images contain NaN or infinite values.")
        if lo < 0 or hi > 1:
            raise DataError(f"OPS needs images in [0, 1], found values in [{lo.item():.3g}, {hi.item():.3g}].")


def _check_labels(y: Any, n: int, num_classes: int) -> None:
    if not torch.is_tensor(y):
        raise UsageError(f"OPS needs labels as a torch.Tensor, got {type(y).__name__}.")
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"OPS needs one label per image: a vector of {n} integers, got shape {tuple(y.shape)}.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"OPS labels must be integers, got dtype {y.dtype}.")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"OPS labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
            f"found [{int(y.min())}, {int(y.max())}]."
        )


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}.")


# -- search and apply ------------------------------------------------------------------------


def corner_colors(channels: int) -> torch.Tensor:
    """The ``2**C`` corners of the colour cube as a ``(2**C, C)`` 0/1 tensor; row ``i`` holds
    the bits of ``i`` with channel 0 the most significant (the reference's order)."""
    idx = torch.arange(2**channels).unsqueeze(1)
    shifts = torch.arange(channels - 1, -1, -1)
    return ((idx >> shifts) & 1).to(torch.float64)


def _class_moments(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: image count ``(K,)``, pixel mean ``(K, C*H*W)`` and the sum of squared
    deviations from it ``(K, C*H*W)``, in float64 (two passes, no cancellation)."""
    n = len(y)
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    counts = torch.bincount(y.to(torch.int64).cpu(), minlength=num_classes).to(torch.float64)
    total = torch.zeros(num_classes, d, dtype=torch.float64)
    for i in range(0, n, chunk_size):
        yi = y[i : i + chunk_size].to(torch.int64).cpu()
        total.index_add_(0, yi, flat[i : i + chunk_size].to("cpu", torch.float64))
    mean = total / counts.clamp_min(1).unsqueeze(1)
    m2 = torch.zeros_like(total)
    for i in range(0, n, chunk_size):
        yi = y[i : i + chunk_size].to(torch.int64).cpu()
        dev = flat[i : i + chunk_size].to("cpu", torch.float64) - mean[yi]
        m2.index_add_(0, yi, dev.square_())
    return counts, mean, m2


def class_scores(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, chunk_size: int = 2048) -> torch.Tensor:
    """The OPS objective for every class, position and corner colour: a float64 tensor
    ``(K, H, W, 2**C)`` of ``mean(d) / std(d)`` with ``d = |colour - x[:, :, row, col]|`` over
    the class's images and channels (``inf``/0 where ``std(d) = 0``; 0 for empty classes)."""
    _check_num_classes(num_classes)
    _check_images(x)
    _check_labels(y, len(x), num_classes)
    if not len(y):
        raise DataError("OPS needs at least one image to search the class pixels on.")
    n, c, h, w = x.shape
    counts, mean, m2 = _class_moments(x, y, num_classes, chunk_size)
    mean = mean.view(num_classes, c, h, w)
    var_within = (m2 / counts.clamp_min(1).view(-1, 1)).view(num_classes, c, h, w)
    bits = corner_colors(c).view(-1, 1, c, 1, 1)  # (B, 1, C, 1, 1)
    # E|b - x| per channel: mean of x where b = 0, 1 - mean where b = 1.
    dev_mean = torch.where(bits.bool(), 1 - mean.unsqueeze(0), mean.unsqueeze(0))  # (B, K, C, H, W)
    m = dev_mean.mean(dim=2)  # (B, K, H, W): mean over images and channels
    # Var over (images, channels) = mean over channels of (within-channel var + (channel mean - m)^2).
    var = (var_within.unsqueeze(0) + (dev_mean - m.unsqueeze(2)).square()).mean(dim=2)
    std = var.clamp_min(0).sqrt()
    zero = std <= STD_TOL
    flat_score = torch.where(m > STD_TOL, torch.tensor(math.inf, dtype=m.dtype), torch.tensor(0.0, dtype=m.dtype))
    score = torch.where(zero, flat_score, m / torch.where(zero, torch.ones_like(std), std))
    score[:, counts == 0] = 0.0
    return score.permute(1, 2, 3, 0).contiguous()  # (K, H, W, B)


def search_pixels(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, chunk_size: int = 2048) -> OPSPattern:
    """Find each class's OPS pixel and colour in ``x`` (N×C×H×W in [0, 1]) with labels ``y``.

    Classes are searched in label order and a (position, colour) pair already taken is excluded,
    as in the reference; ``chunk_size`` bounds the memory of the two passes over ``x``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UsageError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    scores = class_scores(x, y, num_classes, chunk_size=chunk_size)
    _, c, h, w = x.shape
    n_colors = 2**c
    if num_classes > h * w * n_colors:
        raise DataError(f"OPS has only {h * w * n_colors} (pixel, colour) pairs for {num_classes} classes.")
    counts = torch.bincount(y.to(torch.int64).cpu(), minlength=num_classes)
    flat = scores.view(num_classes, -1)  # index = (row * W + col) * 2**C + colour
    colors = corner_colors(c)
    taken = torch.zeros(flat.shape[1], dtype=torch.bool)
    picks: dict[int, int] = {}
    order = [k for k in range(num_classes) if counts[k] > 0] + [k for k in range(num_classes) if counts[k] == 0]
    for k in order:
        s = flat[k].masked_fill(taken, -math.inf)
        best = int(torch.argmax(s))  # the first maximum
        taken[best] = True
        picks[k] = best
    positions, cols, scs = [], [], []
    for k in range(num_classes):
        pos, colour = divmod(picks[k], n_colors)
        positions.append(divmod(pos, w))
        cols.append(tuple(float(v) for v in colors[colour]))
        scs.append(float(flat[k, picks[k]]))
    return OPSPattern(
        positions=tuple(positions),
        colors=tuple(cols),
        scores=tuple(scs),
        counts=tuple(int(v) for v in counts),
        image_shape=(c, h, w),
    )


def apply(x: torch.Tensor, y: torch.Tensor, pattern: OPSPattern) -> torch.Tensor:
    """A copy of ``x`` with each image's class pixel set to its class colour (all channels of
    one position); ``x`` itself is not modified."""
    _check_images(x)
    if tuple(x.shape[1:]) != tuple(pattern.image_shape):
        raise DataError(
            f"The OPS pattern is for images of shape {tuple(pattern.image_shape)}, got {tuple(x.shape[1:])}."
        )
    _check_labels(y, len(x), pattern.num_classes)
    pattern.check()
    out = x.clone()
    if not len(x):
        return out
    idx = y.to(device=x.device, dtype=torch.int64)
    rows = torch.tensor([p[0] for p in pattern.positions], device=x.device)[idx]
    cols = torch.tensor([p[1] for p in pattern.positions], device=x.device)[idx]
    colors = torch.tensor(pattern.colors, dtype=x.dtype, device=x.device)[idx]  # (N, C)
    out[torch.arange(len(x), device=x.device), :, rows, cols] = colors
    return out


# -- saving ---------------------------------------------------------------------------------


def save_npz(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` as an ``npz:PATH`` file robustkit reads back: ``x`` as uint8 (NHW for
    one channel, NHWC otherwise) when every value is a multiple of 1/255, else float32 NCHW;
    ``y`` as int64. (The npz loader infers ``num_classes`` as ``max(y) + 1``.)"""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"The poisoned data set is written as .npz; got {path.name!r}.")
    x = dataset.x.detach().cpu()
    scaled = x.to(torch.float64) * 255
    rounded = scaled.round()
    if x.numel() and bool(((scaled - rounded).abs() <= 1e-3).all()):
        arr = rounded.to(torch.uint8).numpy()
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    else:
        arr = x.to(torch.float32).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=np.ascontiguousarray(arr), y=dataset.y.detach().cpu().numpy().astype(np.int64))
    return path


# -- the registered data defense ---------------------------------------------------------------


@DEFENSES.register("ops", aliases=("one-pixel-shortcut",))
@dataclass
class OnePixelShortcut:
    """One-Pixel Shortcut (Wu et al., ICLR 2023): unlearnable data, one class-wise pixel per image.

    ``transform(dataset)`` searches the pattern on ``dataset`` (unless one was given or fitted
    before) and returns the poisoned copy; ``pattern`` can be saved as JSON and reused.
    """

    kind: ClassVar[str] = "data"
    description: ClassVar[str] = "One-Pixel Shortcut: unlearnable data, one class-wise pixel per image (data)"
    pattern: OPSPattern | None = None
    chunk_size: int = 2048

    @classmethod
    def from_pattern_file(cls, path: str | os.PathLike[str]) -> OnePixelShortcut:
        return cls(pattern=OPSPattern.load(path))

    def fit(self, dataset: Dataset) -> OPSPattern:
        """Search (and keep) the pattern for ``dataset``."""
        self.pattern = search_pixels(dataset.x, dataset.y, dataset.num_classes, chunk_size=self.chunk_size)
        return self.pattern

    def transform(self, dataset: Dataset) -> Dataset:
        """The unlearnable copy of ``dataset`` (named ``<name>+ops``); fits first if needed."""
        if self.pattern is None:
            self.fit(dataset)
        assert self.pattern is not None
        if self.pattern.num_classes != dataset.num_classes:
            raise DataError(
                f"The OPS pattern has {self.pattern.num_classes} classes but {dataset.name} has {dataset.num_classes}."
            )
        x = apply(dataset.x, dataset.y, self.pattern)
        return Dataset(f"{dataset.name}+ops", x, dataset.y.clone(), dataset.num_classes)

    def save_pattern(self, path: str | os.PathLike[str]) -> Path:
        if self.pattern is None:
            raise UsageError("No OPS pattern yet; call fit() or transform() first.")
        return self.pattern.save(path)

    def save(self, dataset: Dataset, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Transform ``dataset`` and write ``out_dir/ops.npz`` (the poisoned data, readable as
        ``npz:out_dir/ops.npz``) and ``out_dir/ops_pattern.json``; returns both paths."""
        poisoned = self.transform(dataset)
        out = Path(out_dir)
        return save_npz(poisoned, out / "ops.npz"), self.save_pattern(out / "ops_pattern.json")
