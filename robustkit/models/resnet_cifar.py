"""CIFAR ResNet-18/34/50 (3x3 stem, no max-pool), the layout of Kuang Liu's pytorch-cifar.

Module names match ``pyautoattack/examples/resnet.py`` and RobustBench's ``ResNet`` exactly,
so their checkpoints (e.g. pyautoattack's ``examples/model_test.pt``) load strictly.
Default normalization is none: those checkpoints take raw [0, 1] inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.zoo import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a 1x1-conv projection shortcut when shapes change."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck block with 4x expansion."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of 64-128-256-512 planes, global pool, ``linear``."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool: the same as the original avg_pool2d(out, 4) on 32x32 inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 (11.2M parameters)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-34 (21.3M parameters)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


def resnet50(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-50 with bottleneck blocks (23.5M parameters)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


_CIFAR = (3, 32, 32)
register_model(
    "resnet18",
    resnet18,
    normalize=None,
    input_size=_CIFAR,
    aliases=("resnet-18",),
    description="CIFAR ResNet-18 (pytorch-cifar / pyautoattack / RobustBench layout)",
)
register_model(
    "resnet34",
    resnet34,
    normalize=None,
    input_size=_CIFAR,
    aliases=("resnet-34",),
    description="CIFAR ResNet-34 (pytorch-cifar / RobustBench layout)",
)
register_model(
    "resnet50",
    resnet50,
    normalize=None,
    input_size=_CIFAR,
    aliases=("resnet-50",),
    description="CIFAR ResNet-50, bottleneck blocks (pytorch-cifar / RobustBench layout)",
)
