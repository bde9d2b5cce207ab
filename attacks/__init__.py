"""Attacks, registered in ``robustkit.registry.ATTACKS`` (installed as ``robustkit.attacks``)."""

from .apgd import APGD, APGDDLR, APGDT
from .autoattack import AutoAttack
from .backends import PyAutoAttack, TorchAttacks
from .fab import FAB, FABT
from .losses import LOSSES, get_loss
from .pgd import FGSM, PGD
from .pma import PMA, PMAPlus
from .square import Square
from .transfer import DIFGSM, MDTIFGSM, MIFGSM, TIFGSM, TransferFGSM, Transferred, transfer_attack

__all__ = ["APGD", "APGDDLR", "APGDT", "DIFGSM", "FAB", "FABT", "FGSM", "LOSSES", "MDTIFGSM", "MIFGSM", "PGD",
           "PMA", "TIFGSM", "AutoAttack", "PMAPlus", "PyAutoAttack", "Square", "TorchAttacks", "TransferFGSM",
           "Transferred", "get_loss", "transfer_attack"]
