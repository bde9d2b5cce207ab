"""Defenses, registered in ``robustkit.registry.DEFENSES`` with a ``kind`` (installed as
``robustkit.defenses``): ``training`` strategies for ``robustkit.train`` and ``architecture``
transforms (the FGSM-AT tricks that change the model)."""

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
from .fgsm_tricks import TRICKS, LargeStride, MaskInit, SmoothActivation, TrickOptions, pixel_mask

__all__ = [
    "FGSMAT",
    "FGSMRS",
    "MART",
    "PGDAT",
    "TRADES",
    "TRICKS",
    "LargeStride",
    "MaskInit",
    "SmoothActivation",
    "Standard",
    "StepOutput",
    "TrainingStrategy",
    "TrickOptions",
    "build_strategy",
    "pixel_mask",
    "training_methods",
]
