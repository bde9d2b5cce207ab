"""ResNet-2B and ResNet-4B of alpha-beta-CROWN (VNN-COMP 2021 ``cifar10_resnet`` benchmark).

No BatchNorm, convolutions with bias, a dense two-layer head; module names match
alpha-beta-CROWN's ``ResNet5``/``ResNet9`` (``CResNet5``/``CResNet7``) so its published
``resnet2b.pth``/``resnet4b.pth`` load strictly. Default normalization is ``cifar10``
(``models/cifar10_resnet/cifar_eval.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.zoo import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs (with bias, no BN) and a 1x1-conv shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class DenseResNet(nn.Module):
    """Stride-2 stem, ``stages`` stride-2 stages of two blocks, Linear-ReLU-Linear head.

    ``stages=1, in_planes=8`` is ResNet-2B (stage width 16); ``stages=2, in_planes=16`` is
    ResNet-4B (both stages 32 wide). Inputs must be 32x32 (the head is dense).
    """

    def __init__(
        self,
        stages: int,
        in_planes: int,
        num_classes: int = 10,
        in_channels: int = 3,
        input_hw: int = 32,
        hidden: int = 100,
    ):
        super().__init__()
        self.in_planes = in_planes
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, stride=2, padding=1, bias=True)
        width = in_planes * 2
        self.layer1 = self._make_layer(width, 2, 2)
        if stages == 2:
            self.layer2 = self._make_layer(width, 2, 2)
        side = input_hw // 2 ** (stages + 1)
        self.linear1 = nn.Linear(width * side * side, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer1(F.relu(self.conv1(x)))
        if hasattr(self, "layer2"):
            out = self.layer2(out)
        out = F.relu(self.linear1(out.flatten(1)))
        return self.linear2(out)


def resnet2b(num_classes: int = 10, in_channels: int = 3) -> DenseResNet:
    """alpha-beta-CROWN ``resnet2b()`` = ``CResNet5(in_planes=8, bn=False, dense head)``."""
    return DenseResNet(1, 8, num_classes, in_channels)


def resnet4b(num_classes: int = 10, in_channels: int = 3) -> DenseResNet:
    """alpha-beta-CROWN ``resnet4b()`` = ``CResNet7(in_planes=16, bn=False, dense head)``."""
    return DenseResNet(2, 16, num_classes, in_channels)


register_model(
    "resnet2b",
    resnet2b,
    normalize="cifar10",
    input_size=(3, 32, 32),
    aliases=("resnet-2b", "cresnet5"),
    description="ResNet-2B of alpha-beta-CROWN (no BN, dense head; verification benchmark)",
)
register_model(
    "resnet4b",
    resnet4b,
    normalize="cifar10",
    input_size=(3, 32, 32),
    aliases=("resnet-4b", "cresnet7"),
    description="ResNet-4B of alpha-beta-CROWN (no BN, dense head; verification benchmark)",
)
