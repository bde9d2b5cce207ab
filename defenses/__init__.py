"""Defenses, registered in ``robustkit.registry.DEFENSES`` with a ``kind`` (installed as
``robustkit.defenses``): ``training`` strategies for ``robustkit.training.loop``, ``architecture``
transforms (the FGSM-AT tricks that change the model, AdvProp's dual BatchNorm), ``inference``
model wrappers (AAA) and ``data`` transforms (One-Pixel Shortcut, ``robustkit poison``)."""

from .aaa import AAA, expected_calibration_error
from .adversarial_training import (
    FGSMAT,
    FGSMRS,
    MART,
    PGDAT,
    TRADES,
    Standard,
    StepOutput,
    TrainingStrategy,
    build_strategy,
    training_methods,
)
from .advprop import AdvProp, DualBatchNorm, DualBN, FastAdvProp, auxiliary_bn, plain_state_dict
from .dat import DAT, DATFGSM, UNLABELED
from .fgsm_tricks import TRICKS, LargeStride, MaskInit, SmoothActivation, TrickOptions, pixel_mask
from .one_pixel_shortcut import OnePixelShortcut, OPSPattern
from .pubdef import PubDef
from .rift import RiFT

__all__ = [
    "AAA",
    "expected_calibration_error",
    "AdvProp",
    "DualBN",
    "DualBatchNorm",
    "FastAdvProp",
    "auxiliary_bn",
    "plain_state_dict",
    "DAT",
    "DATFGSM",
    "UNLABELED",
    "FGSMAT",
    "FGSMRS",
    "MART",
    "PGDAT",
    "TRADES",
    "TRICKS",
    "LargeStride",
    "MaskInit",
    "OPSPattern",
    "OnePixelShortcut",
    "PubDef",
    "RiFT",
    "SmoothActivation",
    "Standard",
    "StepOutput",
    "TrainingStrategy",
    "TrickOptions",
    "build_strategy",
    "pixel_mask",
    "training_methods",
]
