"""What ``robustkit list`` shows: registered names, aliases and one-line descriptions."""

from __future__ import annotations

import inspect

from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry


def _first_line(obj: object) -> str:
    text = getattr(obj, "description", None) or inspect.getdoc(obj) or ""
    return text.strip().splitlines()[0] if text.strip() else ""


def catalog(what: str) -> list[tuple[str, list[str], str]]:
    """(name, aliases, description) for each entry of the registry ``what``."""
    import robustkit.attacks  # noqa: F401  (registers attacks)
    import robustkit.data  # noqa: F401
    import robustkit.defenses  # noqa: F401
    import robustkit.models  # noqa: F401

    registry: Registry = {"models": MODELS, "attacks": ATTACKS, "defenses": DEFENSES, "datasets": DATASETS}[what]
    rows = [(name, registry.aliases_of(name), _first_line(obj)) for name, obj in registry.items()]
    if what == "models":
        rows.append(("timm:NAME", [], "any timm model (pip install timm)"))
        rows.append(("torchvision:NAME", [], "any torchvision classification model"))
    if what == "datasets":
        rows.append(("npz:PATH", [], "arrays x (uint8 NHWC or float NCHW in [0, 1]) and y (int)"))
    return rows
