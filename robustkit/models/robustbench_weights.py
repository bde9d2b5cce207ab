"""RobustBench weights on disk: its layout, its download (only when asked), and safe loading.

RobustBench keeps a zoo model's weights at ``<model_dir>/<dataset>/<threat_model>/<name>.pt``
(``robustbench.utils.load_model`` writes them there). robustkit reads the same files, but only
through ``torch.load(weights_only=True)``, and unwraps them as RobustBench does: a bare state
dict or ``{'state_dict': ...}`` (``{'last': ...}`` for two entries), ``module.``/``model.``
prefixes, and normalization constants (``mu``/``sigma``, ``mean``/``std``) that the architecture
sets itself and many checkpoints leave out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from robustkit.errors import CheckpointError, UsageError
from robustkit.models.checkpoint import apply_state_dict, read_checkpoint, unwrap_state_dict
from robustkit.models.robustbench import ZooRef, robustbench_info, weight_files, zoo_entry
from robustkit.models.robustbench_import import import_robustbench
from robustkit.models.zoo import ZooModel

#: RobustBench's own default ``model_dir``.
DEFAULT_MODEL_DIR = "./models"
#: Buffer names RobustBench architectures use for in-model normalization (see
#: ``robustbench.utils._safe_load_state_dict``); checkpoints may leave them out.
NORMALIZATION_BUFFERS = ("mu", "sigma", "mean", "std")
#: Entries whose files hold ``{'last': ..., 'best': ...}``; RobustBench takes ``last``.
_LAST = ("Kireev2021Effectiveness", "Andriushchenko2020Understanding")


def weights_path(ref: ZooRef, model_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where RobustBench keeps the weights of ``ref``: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    return Path(model_dir or DEFAULT_MODEL_DIR).expanduser() / ref.dataset / ref.threat_model / f"{ref.name}.pt"


def fetch_hint(ref: ZooRef) -> str:
    """How to get the file on a connected machine, with RobustBench itself."""
    code = (
        f"from robustbench import load_model; load_model({ref.name!r}, model_dir='models', "
        f"dataset={ref.dataset!r}, threat_model={ref.threat_model!r})"
    )
    layout = weights_path(ref, "models").as_posix()
    return f'on a connected machine run `python -c "{code}"` and copy {layout} there'


def _download(ref: ZooRef, entry: dict, path: Path) -> None:
    """Fetch the weights with RobustBench's own downloader (Google Drive through gdown)."""
    import_robustbench()
    # optional extra (robustbench)
    from robustbench.utils import download_gdrive_new

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_gdrive_new(entry["gdrive_id"], path)
    except Exception as exc:  # gdown raises its own types; any failure leaves no usable file
        path.unlink(missing_ok=True)
        raise CheckpointError(
            f"Downloading the RobustBench weights of {ref.name} to {path} failed ({exc}); {fetch_hint(ref)}."
        ) from None
    if not path.is_file():
        raise CheckpointError(
            f"Downloading the RobustBench weights of {ref.name} left no file at {path}; {fetch_hint(ref)}."
        )


def _build(ref: ZooRef, entry: dict) -> nn.Module:
    """The zoo's network with fresh weights; a clear error when building needs the network."""
    try:
        return entry["model"]()
    except OSError as exc:  # a builder that fetches pretrained weights (timm / torchvision hubs)
        raise CheckpointError(
            f"Building RobustBench's {ref.name} fetches weights from a model hub, which failed "
            f"({exc}); build it once on a connected machine to fill the hub's cache."
        ) from None


def _fit_model_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Add ``model.`` to every key when that fits better (RobustBench's ImageNet wrappers)."""
    prefixed = {f"model.{k}": v for k, v in state.items()}
    return prefixed if len(expected & prefixed.keys()) > len(expected & state.keys()) else state


def robustbench_state(obj: object, ref: ZooRef, net: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The state dict for ``net`` inside a loaded RobustBench checkpoint object."""
    if isinstance(obj, Mapping) and "last" in obj and any(ref.name.startswith(p) for p in _LAST):
        obj = obj["last"]
    state = unwrap_state_dict(obj, source=source)
    return _fit_model_prefix(state, set(net.state_dict()))


def normalization_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the normalization constants the architecture sets itself."""
    return {k for k, _ in net.named_buffers() if k.rpartition(".")[2] in NORMALIZATION_BUFFERS}


def check_normalize(name: str, normalize: object) -> None:
    """Zoo models normalize inside: only ``default``/``none`` are accepted, never a second normalization."""
    if not (normalize is None or (isinstance(normalize, str) and normalize.strip().lower() in ("default", "none"))):
        raise UsageError(
            f"{name} normalizes its [0, 1] inputs inside the model, as RobustBench evaluates it; "
            f"drop --normalize {normalize} (it would normalize twice)."
        )


def locate_weights(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    fetch: bool = True,
) -> Path:
    """The weights file of a ``robustbench:`` model: ``checkpoint``, else its place in RobustBench's
    layout, downloaded there when ``download`` and ``fetch``; a clear error when it is not there.
    ``fetch=False`` only checks (an evaluation does so before loading any data)."""
    ref, entry = zoo_entry(name)
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    files = weight_files(entry)
    if files > 1:
        raise UsageError(
            f"RobustBench's {ref.name} is an ensemble of {files} weight files, which robustkit "
            "does not load yet; use robustbench.utils.load_model for it."
        )
    if files == 0:
        raise UsageError(
            f"RobustBench {ref.name} has no weights in RobustBench's layout (it comes from a "
            "model hub); pass --checkpoint FILE."
        )
    path = weights_path(ref, model_dir)
    if not path.is_file() and download and fetch:
        _download(ref, entry, path)
    if not path.is_file() and not download:
        raise CheckpointError(
            f"RobustBench weights of {ref.name} not found: expected {path}; add --download, or {fetch_hint(ref)}."
        )
    return path


def load_robustbench(
    name: str,
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    normalize: object = "default",
    sha256: str | None = None,
) -> ZooModel:
    """Build a ``robustbench:`` zoo model and load its weights safely.

    Weights come from ``checkpoint`` (a file or a state dict) when given, else from
    RobustBench's layout under ``model_dir`` (default ``./models``, as in RobustBench); they are
    downloaded only with ``download=True``. The model takes [0, 1] pixels: it normalizes inside
    where its architecture does, so ``normalize`` must be ``"default"`` or ``"none"``.
    """
    check_normalize(name, normalize)
    ref, entry = zoo_entry(name)
    if isinstance(checkpoint, Mapping):
        if sha256 is not None:
            raise UsageError("sha256 checks a checkpoint file; give the checkpoint path as well.")
        obj: object = checkpoint
        source = "<state dict>"
    else:
        path = locate_weights(name, checkpoint, model_dir=model_dir, download=download)
        obj, source = read_checkpoint(path, sha256), str(path)
    net = _build(ref, entry)
    state = robustbench_state(obj, ref, net, "The state dict" if source == "<state dict>" else f"Checkpoint {source}")
    apply_state_dict(net, state, name=ref.key, optional=normalization_keys(net))
    return ZooModel(ref.key, robustbench_info(ref.key), net, None, checkpoint=source).eval()
