"""What ``robustkit list`` shows: registered names, aliases and one-line descriptions."""

from __future__ import annotations

import inspect

from robustkit.errors import UsageError
from robustkit.registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry


def _first_line(obj: object) -> str:
    text = getattr(obj, "description", None) or inspect.getdoc(obj) or ""
    return text.strip().splitlines()[0] if text.strip() else ""


def catalog(
    what: str, *, source: str = "robustkit", dataset: str | None = None, threat_model: str | None = None
) -> list[tuple[str, list[str], str]]:
    """(name, aliases, description) for each entry of the registry ``what``; with
    ``source="robustbench"``, RobustBench's model zoo (optionally one dataset / threat model)."""
    if source == "robustbench":
        if what != "models":
            raise UsageError(f"--source robustbench lists models, not {what}.")
        # lazy: RobustBench's zoo only for --source robustbench (optional extra)
        from robustkit.models.robustbench import zoo_catalog

        return zoo_catalog(dataset, threat_model)
    if dataset or threat_model:
        raise UsageError("--dataset and --threat-model select RobustBench's zoo; add --source robustbench.")
    # lazy registry: importing the plug-ins registers them (and loads torch) only when listed
    import robustkit.attacks  # noqa: F401  (registers attacks)
    import robustkit.data  # noqa: F401
    import robustkit.defenses  # noqa: F401
    import robustkit.models  # noqa: F401

    registry: Registry = {"models": MODELS, "attacks": ATTACKS, "defenses": DEFENSES, "datasets": DATASETS}[what]
    rows = [(name, registry.aliases_of(name), _first_line(obj)) for name, obj in registry.items()]
    if what == "models":
        rows.append(("timm:NAME", [], "any timm model (pip install timm)"))
        rows.append(("torchvision:NAME", [], "any torchvision classification model"))
        rows.append(("robustbench:NAME", [], "a RobustBench model-zoo entry (pip install 'robustkit[robustbench]'; "
                                             "robustkit list models --source robustbench)"))
    if what == "datasets":
        rows.append(("npz:PATH", [], "arrays x (uint8 NHWC or float NCHW in [0, 1]) and y (int)"))
    return rows
