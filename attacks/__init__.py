"""Attacks, registered in ``robustkit.registry.ATTACKS`` (installed as ``robustkit.attacks``)."""

from .alma import ALMA
from .apgd import APGD, APGDDLR, APGDT
from .autoattack import AutoAttack
from .backends import PyAutoAttack, TorchAttacks
from .cw import CarliniWagnerL2
from .ddn import DDN
from .deepfool import DeepFool
from .fab import FAB, FABT
from .fmn import FMN
from .losses import LOSSES, get_loss
from .pgd import FGSM, PGD
from .pma import PMA, PMAPlus
from .square import Square
from .transfer import DIFGSM, MDTIFGSM, MIFGSM, TIFGSM, TransferFGSM, Transferred, transfer_attack

__all__ = ["ALMA", "APGD", "APGDDLR", "APGDT", "DDN", "DIFGSM", "FAB", "FABT", "FGSM", "FMN", "LOSSES", "MDTIFGSM",
           "MIFGSM", "PGD", "PMA", "TIFGSM", "AutoAttack", "CarliniWagnerL2", "DeepFool", "PMAPlus", "PyAutoAttack",
           "Square", "TorchAttacks", "TransferFGSM", "Transferred", "get_loss", "transfer_attack"]
