"""robustkit: adversarial robustness for PyTorch — attacks, defenses, evaluation and a leaderboard.

The public names load on first use (PEP 562), so the command line's help and option parsing
never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Attack": "robustkit.attack", "AttackResult": "robustkit.attack", "Dataset": "robustkit.data",
    "load_dataset": "robustkit.data", "UserError": "robustkit.errors", "EvalResult": "robustkit.evaluation.runner",
    "evaluate": "robustkit.evaluation.runner", "load_model": "robustkit.models", "ThreatModel": "robustkit.threat",
    "parse_eps": "robustkit.units",
}
__all__ = ["Attack", "AttackResult", "Dataset", "EvalResult", "ThreatModel", "UserError", "__version__", "evaluate",
           "load_dataset", "load_model", "parse_eps"]

if TYPE_CHECKING:
    from robustkit.attack import Attack, AttackResult
    from robustkit.data import Dataset, load_dataset
    from robustkit.errors import UserError
    from robustkit.evaluation.runner import EvalResult, evaluate
    from robustkit.models import load_model
    from robustkit.threat import ThreatModel
    from robustkit.units import parse_eps


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustkit' has no attribute {name!r}")
