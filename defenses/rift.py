"""RiFT (Zhu et al., ICCV 2023, arXiv 2308.02533) in the defense registry, kind ``training``.

RiFT fine-tunes an adversarially trained model after the fact (:mod:`robustkit.training.rift`: module
robust criticality, fine-tuning of the least critical module, weight interpolation), so it is
not a per-batch strategy of the training loop; its entry names where it runs,
``robustkit train rift``, and building it as a loop strategy is a one-line error that says so.
"""

from __future__ import annotations

from typing import Any, ClassVar

from robustkit.errors import UsageError
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel


@DEFENSES.register("rift", aliases=("robust-critical-fine-tuning",))
class RiFT:
    """Robust critical fine-tuning; run by ``robustkit train rift`` / :func:`robustkit.training.rift.run_rift`."""

    kind: ClassVar[str] = "training"
    name = "rift"
    description = ("RiFT (Zhu et al. 2023): fine-tune the least robust-critical module of an adversarially "
                   "trained model, then interpolate (robustkit train rift)")

    def __init__(self, threat: ThreatModel, **_options: Any):
        raise UsageError("RiFT fine-tunes an already trained model; run `robustkit train rift --model M "
                         "--checkpoint W` instead of using it as a training method.")
