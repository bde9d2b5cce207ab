"""Model zoo: registered architectures, the Normalize first layer and safe checkpoint IO.

``load_model("resnet20", "resnet20-12fca82f.th")`` builds the network, loads the weights
safely, and puts the normalization its weights expect in front, so models take [0, 1] pixels.
"""

from robustkit.models import (  # noqa: F401  (imported so that they register their architectures)
    abcrown_resnet,
    preact_resnet,
    resnet_cifar,
    resnet_small,
    robust_cnn,
    small_cnn,
    starnet,
    wide_resnet,
)
from robustkit.models.build import PACKAGED_WEIGHTS, build_model, load_model, model_info, weights_sha256
from robustkit.models.checkpoint import apply_state_dict, file_sha256, load_state_dict
from robustkit.models.external import is_external
from robustkit.models.normalize import PRESETS, Normalize, parse_normalize
from robustkit.models.zoo import ModelInfo, ZooModel, register_model

__all__ = [
    "PACKAGED_WEIGHTS",
    "PRESETS",
    "ModelInfo",
    "Normalize",
    "ZooModel",
    "apply_state_dict",
    "build_model",
    "file_sha256",
    "is_external",
    "load_model",
    "load_state_dict",
    "model_info",
    "parse_normalize",
    "register_model",
    "weights_sha256",
]
