"""Output locations checked before any work: a folder option that names a file, or sits under a
file, or cannot be created, is one sentence, and the file is left untouched."""

from __future__ import annotations

from pathlib import Path

from robustkit.errors import UsageError


def check_dir(path: str | Path, option: str) -> Path:
    """``path`` as a folder that exists or can be made: no existing file at it or above it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is an existing file; give a folder (the file is left untouched).")
    _check_parents(path, option)
    return path


def make_dir(path: str | Path, option: str) -> Path:
    """Create the folder ``path`` (and its parents), or say in one sentence why it cannot be."""
    path = check_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"Cannot create the folder {path} for {option}: {e.strerror or e}.") from None
    return path


def check_file(path: str | Path, option: str) -> Path:
    """``path`` as a file that exists or can be written: not a folder, and its folder is possible."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name.")
    _check_parents(path, option)
    return path


def _check_parents(path: Path, option: str) -> None:
    for parent in path.parents:  # the nearest existing folder above must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder.")
            return
