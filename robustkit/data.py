"""Datasets as in-memory tensors of [0, 1] NCHW images: torchvision sets from a local folder,
``npz:PATH`` files and scikit-learn's bundled ``digits`` (the embedded default: no download).

Selection is deterministic first-N (``n_examples``), as RobustBench and AutoAttack do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustkit.errors import DataError, UsageError
from robustkit.registry import DATASETS

SPLITS = ("train", "test")


@dataclass
class Dataset:
    """Images ``x`` (float32, N×C×H×W in [0, 1]) with integer labels ``y``."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(offset, x, y)`` for consecutive batches from ``start``."""
        for i in range(start, len(self), batch_size):
            yield i, self.x[i : i + batch_size], self.y[i : i + batch_size]


@dataclass(frozen=True)
class DatasetInfo:
    loader: Callable[[Path | None, str, bool], tuple[np.ndarray, np.ndarray]]
    num_classes: int
    expected_files: str  # what the loader looks for, for error messages
    description: str


def images_to_tensor(x: np.ndarray, source: str) -> torch.Tensor:
    """uint8 NHWC/NHW (0–255) or float NCHW in [0, 1] -> float32 NCHW; rejects NaN and range errors."""
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255)
        if t.dim() == 3:
            return t.unsqueeze(1)
        if t.dim() == 4:
            return t.permute(0, 3, 1, 2).contiguous()
        raise DataError(f"{source}: uint8 images must be N×H×W or N×H×W×C, got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{source}: images must be uint8 (0–255) or float in [0, 1], got dtype {x.dtype}.")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: float images must be N×C×H×W, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or infinite values.")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{source}: float images must lie in [0, 1], found values in [{x.min():.3g}, {x.max():.3g}].")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels(y: np.ndarray, n: int, source: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{source}: labels must be a vector of {n} integers, got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}.")
    if y.size and y.min() < 0:
        raise DataError(f"{source}: labels must be class indices 0, 1, 2, ..., found {int((y < 0).sum())} "
                        f"negative label(s) (smallest {int(y.min())}).")
    return torch.from_numpy(y.astype(np.int64))


def _digits(data_dir: Path | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    # heavy lazy: scikit-learn loads only for the digits dataset
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    cut = len(y) - 500  # fixed split: the last 500 images are the test set
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])


def _torchvision(cls_name: str) -> Callable[[Path | None, str, bool], tuple[np.ndarray, np.ndarray]]:
    def load(data_dir: Path | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        # heavy lazy: torchvision loads only for its datasets
        import torchvision.datasets as tvd

        if data_dir is None:
            raise UsageError(f"Dataset {cls_name.lower()} is read from a folder: pass --data-dir DIR (torchvision's "
                             f"files in DIR), add --download to fetch them there, or give --dataset npz:FILE "
                             f"(arrays x: uint8 N×H×W×C, y: labels).")
        cls = getattr(tvd, cls_name)
        kwargs = {"split": split} if cls_name == "SVHN" else {"train": split == "train"}
        ds = cls(str(data_dir), download=download, **kwargs)
        x = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
        if cls_name == "SVHN":  # stored N×C×H×W uint8
            x = x.transpose(0, 2, 3, 1)
        y = ds.labels if cls_name == "SVHN" else ds.targets
        return x, np.asarray(y.numpy() if torch.is_tensor(y) else y, dtype=np.int64)

    return load


DATASETS.add(
    "digits",
    DatasetInfo(
        _digits, 10, "(bundled with scikit-learn)", "scikit-learn's 8×8 digits; last 500 images are the test split"
    ),
)
DATASETS.add(
    "mnist",
    DatasetInfo(
        _torchvision("MNIST"), 10, "MNIST/raw/t10k-images-idx3-ubyte (and the other IDX files)", "MNIST via torchvision"
    ),
)
DATASETS.add(
    "cifar10",
    DatasetInfo(
        _torchvision("CIFAR10"), 10, "cifar-10-batches-py/test_batch (and data_batch_1..5)", "CIFAR-10 via torchvision"
    ),
)
DATASETS.add(
    "cifar100",
    DatasetInfo(_torchvision("CIFAR100"), 100, "cifar-100-python/test (and train)", "CIFAR-100 via torchvision"),
)
DATASETS.add(
    "svhn", DatasetInfo(_torchvision("SVHN"), 10, "test_32x32.mat (or train_32x32.mat)", "SVHN via torchvision")
)


def _load_npz(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            for xk, yk in (("x", "y"), (f"x_{split}", f"y_{split}")):
                if {xk, yk} <= keys:
                    x, y = f[xk], f[yk]
                    break
            else:
                raise DataError(
                    f"{path} must hold arrays 'x' and 'y' (or 'x_{split}' and 'y_{split}'); it has {sorted(keys)}."
                )
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read {path} as an npz archive ({e}).") from None
    xt = images_to_tensor(x, str(path))
    return xt, _labels(y, len(xt), str(path))


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str = "test",
    n_examples: int | None = None,
    download: bool = False,
) -> Dataset:
    """Load a dataset by name (see ``robustkit list datasets``) or ``npz:PATH``; first-N selection."""
    if split not in SPLITS:
        raise UsageError(f"Unknown split {split!r}; accepted: {', '.join(SPLITS)}.")
    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        x, y = _load_npz(path, split)
        num_classes = int(y.max()) + 1 if len(y) else 0
        canonical = name
    else:
        canonical = DATASETS.canonical(name)
        info: DatasetInfo = DATASETS.get(canonical)
        root = Path(data_dir).expanduser() if data_dir is not None else None
        try:
            xs, ys = info.loader(root, split, download)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise DataError(
                f"Dataset {canonical} ({split}) not found in {root}: expected {root}/{info.expected_files}; "
                f"pass --download on a connected machine or copy the files there ({type(e).__name__})."
            ) from None
        x = images_to_tensor(xs, canonical)
        y = _labels(ys, len(x), canonical)
        num_classes = info.num_classes
    if n_examples is not None:
        if n_examples < 1:
            raise UsageError(f"--n-examples must be at least 1, got {n_examples}.")
        if n_examples > len(y):
            raise DataError(f"--n-examples {n_examples} is larger than the {len(y)} {split} images of {canonical}.")
        x, y = x[:n_examples], y[:n_examples]
    return Dataset(canonical, x, y, num_classes)


def load_held_out(name: str, *, data_dir: str | Path | None, split: str, size: int) -> Dataset:
    """The first ``size`` images of a dataset (all of them when it has fewer), copied out of the
    full split: the held-out set of a training run."""
    full = load_dataset(name, data_dir=data_dir, split=split)
    k = min(size, len(full))
    return Dataset(full.name, full.x[:k].clone(), full.y[:k].clone(), full.num_classes)
