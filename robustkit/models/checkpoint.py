"""Safe checkpoint IO: safetensors or ``torch.load(weights_only=True)``, sha256, clear key errors.

Checkpoints come from strangers, so nothing is ever unpickled beyond plain tensors and
containers. Common wrappers (``{'state_dict': ...}``, DataParallel's ``module.`` prefix, ...)
are unwrapped so published files load as they are.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import string
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from robustkit.errors import CheckpointError, UsageError
from robustkit.models.normalize import Normalize
from robustkit.models.zoo import ZooModel

StateDict = dict[str, torch.Tensor]

#: Keys under which training scripts commonly nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
#: Prefixes stripped when every key carries them (DataParallel, torch.compile).
ALWAYS_STRIP = ("module.", "_orig_mod.")
#: Prefixes stripped only when that makes the keys fit the model.
FIT_STRIP = ("model.", "net.", "module.", "_orig_mod.", "1.")

_TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".tar")
_MAX_SHOWN = 3


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Raise CheckpointError unless the file's sha256 starts with ``expected`` (>= 8 hex digits)."""
    want = expected.strip().lower()
    if len(want) < 8 or any(c not in string.hexdigits for c in want):
        raise UsageError(
            f"sha256 {expected!r} is not a hex digest; give all 64 hex digits (or at least 8)."
        )
    actual = file_sha256(path)
    if not actual.startswith(want):
        raise CheckpointError(
            f"Checkpoint {path} has sha256 {actual}, expected {want}; the file is corrupt "
            "or not the one you meant."
        )


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CheckpointError(
                f"Checkpoint {path} is not a readable PyTorch file ({text})."
            ) from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"Checkpoint {path} holds non-tensor Python objects{what} and cannot be loaded "
            "safely; re-save only its state_dict() with torch.save or safetensors."
        ) from None
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is not a readable PyTorch or safetensors file ({exc!r})."
        ) from None


def _safetensors_load(path: Path) -> object:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is not a readable safetensors file ({exc})."
        ) from None


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: object, *, source: str = "checkpoint") -> StateDict:
    """Find the ``name -> tensor`` mapping inside a loaded checkpoint object.

    Handles ``{'state_dict'|'model_state_dict'|'model'|'net': ...}`` (nested too), a
    one-element list of dicts, and strips prefixes every key shares (``module.``,
    ``_orig_mod.``).
    """
    for _ in range(5):  # bounded unwrapping of nested containers
        if isinstance(obj, list | tuple) and len(obj) == 1:
            obj = obj[0]
            continue
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not _is_tensor_dict(obj):
        raise CheckpointError(
            f"{source} does not hold a state dict (a mapping of parameter names to tensors); "
            f"found {_describe(obj)}."
        )
    state = dict(obj)  # type: ignore[arg-type]
    stripped = True
    while stripped:
        stripped = False
        for prefix in ALWAYS_STRIP:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:_MAX_SHOWN])
        return f"a dict with keys {keys}" if obj else "an empty dict"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def read_checkpoint(path: str | os.PathLike[str], sha256: str | None = None) -> object:
    """Read a checkpoint file safely, as it was saved (tensors in plain containers), on the CPU.

    ``.safetensors`` files use safetensors; everything else goes through
    ``torch.load(map_location="cpu", weights_only=True)`` only, so no code is ever run.
    With ``sha256`` the file's digest is checked first.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"Checkpoint file not found: {p}.")
    if sha256 is not None:
        check_sha256(p, sha256)
    return _safetensors_load(p) if p.suffix.lower() == ".safetensors" else _torch_load(p)


def load_state_dict(path: str | os.PathLike[str], sha256: str | None = None) -> StateDict:
    """Read a checkpoint file safely (see :func:`read_checkpoint`) and return its plain state dict."""
    obj = read_checkpoint(path, sha256)
    return unwrap_state_dict(obj, source=f"Checkpoint {Path(path).expanduser()}")


def _normalize_keys(model: nn.Module) -> set[str]:
    """State-dict keys of Normalize layers: set by the caller, never by a checkpoint."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, Normalize):
            prefix = f"{name}." if name else ""
            keys.update(prefix + b for b, _ in module.named_buffers(recurse=False))
    return keys


def _fit_prefixes(state: StateDict, expected: set[str]) -> StateDict:
    """Strip prefixes such as ``model.`` when that makes more keys match the model."""
    best, best_hits = state, len(expected & state.keys())
    for prefix in FIT_STRIP:
        if not any(k.startswith(prefix) for k in state):
            continue
        candidate = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
        hits = len(expected & candidate.keys())
        if hits > best_hits:
            best, best_hits = candidate, hits
    return best


def _shown(items: list[str]) -> str:
    head = ", ".join(items[:_MAX_SHOWN])
    return head + (", ..." if len(items) > _MAX_SHOWN else "")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def apply_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    name: str | None = None,
    optional: Collection[str] = (),
) -> None:
    """Load ``state`` into ``model`` strictly, with one clear error if it does not fit.

    Normalize buffers are neither required nor overwritten (normalization is chosen when the
    model is built), and BatchNorm's ``num_batches_tracked`` may be absent (old checkpoints).
    Keys in ``optional`` may be absent too; the model then keeps the values it was built with.
    """
    label = name or getattr(model, "name", None) or type(model).__name__
    if isinstance(model, ZooModel):  # weights belong to the network behind the Normalize layer
        model = model.net
    own = model.state_dict()
    norm_keys = _normalize_keys(model)
    expected = set(own) - norm_keys
    state = _fit_prefixes(dict(state), expected)
    state = {k: v for k, v in state.items() if k not in norm_keys}
    if "normalize.mean" in state and not norm_keys:  # saved from a wrapper, loaded into a net
        state = {k: v for k, v in state.items() if not k.startswith("normalize.")}

    missing = [
        k
        for k in own
        if k in expected
        and k not in state
        and k not in optional
        and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{_plural(len(missing), 'missing key')} ({_shown(missing)})")
        if unexpected:
            parts.append(f"{_plural(len(unexpected), 'unexpected key')} ({_shown(unexpected)})")
        if mismatched:
            parts.append(
                f"{_plural(len(mismatched), 'shape-mismatched key')} "
                f"(checkpoint vs model: {_shown(mismatched)})"
            )
        raise CheckpointError(f"Checkpoint does not fit {label}: {', '.join(parts)}.")
    model.load_state_dict(state, strict=False)
