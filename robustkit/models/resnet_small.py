"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) in akamaster's layout.

16-32-64 channels, BatchNorm, option-A shortcuts (stride-2 subsample plus zero channel
padding, no weights) and a ``linear`` head, so akamaster/pytorch_resnet_cifar10's published
``resnet{20,32,44,56}-*.th`` load strictly. Default normalization is ``imagenet``: those
checkpoints were trained with the ImageNet mean/std (akamaster ``trainer.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.zoo import register_model


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the new channels (no weights)."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"subsample=2, pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the option-A shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-(6n+2) for CIFAR: three stages of ``n`` blocks at 16, 32 and 64 channels."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetSmall:
    """ResNet-20 (0.27M parameters)."""
    return ResNetSmall(3, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNetSmall:
    """ResNet-32 (0.46M parameters)."""
    return ResNetSmall(5, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> ResNetSmall:
    """ResNet-44 (0.66M parameters)."""
    return ResNetSmall(7, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetSmall:
    """ResNet-56 (0.85M parameters)."""
    return ResNetSmall(9, num_classes, in_channels)


for _depth, _factory in ((20, resnet20), (32, resnet32), (44, resnet44), (56, resnet56)):
    register_model(
        f"resnet{_depth}",
        _factory,
        normalize="imagenet",
        input_size=(3, 32, 32),
        aliases=(f"resnet-{_depth}",),
        description=f"CIFAR ResNet-{_depth}, option-A shortcuts (akamaster layout)",
    )
