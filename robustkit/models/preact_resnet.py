"""Pre-activation ResNet-18, the architecture of "Fast is better than free" and Rice et al.

Module names follow RobustBench's ``PreActResNet``/``PreActBlock`` so converted checkpoints
(Wong2020Fast, Rice2020Overfitting, ...) load. Default normalization is ``cifar10``: those
models normalize with the CIFAR-10 mean/std (RobustBench keeps it inside as ``mu``/``sigma``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.zoo import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the projection shortcut (1x1 conv) is applied to the raw input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a 3x3 stem; ``bn_before_fc`` adds the final BN-ReLU (``bn``)."""

    def __init__(
        self,
        num_blocks: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        bn_before_fc: bool = False,
    ):
        super().__init__()
        self.in_planes = 64
        self.bn_before_fc = bn_before_fc
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preactresnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """PreActResNet-18 as RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2])``."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)


register_model(
    "preactresnet18",
    preactresnet18,
    normalize="cifar10",
    input_size=(3, 32, 32),
    aliases=("preact-resnet18", "preactresnet-18", "parn18"),
    description="PreActResNet-18 (Wong et al. 2020, Rice et al. 2020; RobustBench layout)",
)
