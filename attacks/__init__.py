"""Attacks, registered in ``robustkit.registry.ATTACKS`` (installed as ``robustkit.attacks``)."""

from .apgd import APGD, APGDDLR, APGDT
from .fab import FAB, FABT
from .losses import LOSSES, get_loss
from .pgd import FGSM, PGD
from .pma import PMA, PMAPlus
from .square import Square
from .transfer import DIFGSM, MDTIFGSM, MIFGSM, TIFGSM, TransferFGSM, Transferred, transfer_attack

__all__ = ["DIFGSM", "FGSM", "LOSSES", "MDTIFGSM", "MIFGSM", "PGD", "TIFGSM", "TransferFGSM",
           "get_loss", "transfer_attack"]
__all__ += ["APGD", "APGDDLR", "APGDT", "PMA", "PMAPlus"]
__all__ += ["FAB", "FABT", "Square", "Transferred"]
