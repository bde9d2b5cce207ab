"""robustkit: adversarial robustness for PyTorch — attacks, defenses, evaluation and a leaderboard."""

__version__ = "0.1.0"

from robustkit.attack import Attack, AttackResult  # noqa: E402
from robustkit.data import Dataset, load_dataset  # noqa: E402
from robustkit.errors import UserError  # noqa: E402
from robustkit.evaluation.runner import EvalResult, evaluate  # noqa: E402
from robustkit.models import load_model  # noqa: E402
from robustkit.threat import ThreatModel, parse_eps  # noqa: E402

__all__ = ["Attack", "AttackResult", "Dataset", "EvalResult", "ThreatModel", "UserError", "__version__", "evaluate",
           "load_dataset", "load_model", "parse_eps"]
