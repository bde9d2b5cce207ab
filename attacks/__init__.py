"""Attacks, registered in ``robustkit.registry.ATTACKS`` (installed as ``robustkit.attacks``)."""

from .losses import LOSSES, get_loss
from .pgd import FGSM, PGD

__all__ = ["FGSM", "LOSSES", "PGD", "get_loss"]
