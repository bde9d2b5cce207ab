"""robustkit: adversarial robustness for PyTorch — attacks, defenses, evaluation and a leaderboard."""

__version__ = "0.1.0"

from .attack import Attack, AttackResult  # noqa: E402
from .errors import UserError  # noqa: E402
from .threat import ThreatModel, parse_eps  # noqa: E402

__all__ = ["Attack", "AttackResult", "ThreatModel", "UserError", "parse_eps", "__version__"]
