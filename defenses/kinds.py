"""Looking up a defense of one kind (training, inference, architecture, data) with one-line errors."""

from __future__ import annotations

from typing import Any

from robustkit.errors import UsageError
from robustkit.registry import DEFENSES


def defenses_of_kind(kind: str) -> list[str]:
    """Names of the registered defenses of ``kind``."""
    return [n for n, obj in DEFENSES.items() if getattr(obj, "kind", None) == kind]


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def defense_of_kind(name: str, kind: str, used_by: str) -> tuple[str, Any]:
    """The canonical name and object of defense ``name``; a one-line error when it is of another kind
    (``used_by`` names the command that takes ``kind`` defenses)."""
    key = DEFENSES.canonical(name)
    obj = DEFENSES.get(key)
    actual = getattr(obj, "kind", None)
    if actual != kind:
        hint = f"; train with `robustkit train {key}`" if actual == "training" else ""
        raise UsageError(f"{key!r} is {_a(str(actual))} defense, not {_a(kind)} defense; "
                         f"{used_by} takes {', '.join(defenses_of_kind(kind))}{hint}.")
    return key, obj
