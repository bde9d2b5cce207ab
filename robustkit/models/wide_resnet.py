"""Wide ResNets WRN-28-10, WRN-34-10 and WRN-70-16 in the TRADES / RobustBench layout.

Module names follow RobustBench's ``WideResNet`` (``conv1``, ``block1..3.layer.N``, ``bn1``,
``fc``), so checkpoints such as Carmon2019Unlabeled or Zhang2019Theoretically fit. Default
normalization is none: those RobustBench models take raw [0, 1] inputs. (RobustBench's
WRN-70-16 models of Gowal et al. use the different ``DMWideResNet`` layout; ``wrn-70-16``
here is the classic layout at that size.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.zoo import register_model


class BasicBlock(nn.Module):
    """Pre-activation wide block; ``convShortcut`` is a 1x1 conv when width or stride change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in TRADES/RobustBench: the projection sees the activated input, identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks (the first may change width and stride)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width: 16 -> 16k -> 32k -> 64k channels, (depth - 4) / 6 blocks per stage."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        bias_last: bool = True,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes, bias=bias_last)
        self.nChannels = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wrn_28_10(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-10 (36.5M parameters)."""
    return WideResNet(28, 10, num_classes, in_channels)


def wrn_34_10(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-34-10 (46.2M parameters), the TRADES / Madry-style AT workhorse."""
    return WideResNet(34, 10, num_classes, in_channels)


def wrn_70_16(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-70-16 (267M parameters)."""
    return WideResNet(70, 16, num_classes, in_channels)


_CIFAR = (3, 32, 32)
register_model(
    "wrn-28-10",
    wrn_28_10,
    normalize=None,
    input_size=_CIFAR,
    aliases=("wrn28", "wrn-28"),
    description="WideResNet-28-10 (TRADES / RobustBench layout, raw [0, 1] inputs)",
)
register_model(
    "wrn-34-10",
    wrn_34_10,
    normalize=None,
    input_size=_CIFAR,
    aliases=("wrn34", "wrn-34"),
    description="WideResNet-34-10 (TRADES / RobustBench layout, raw [0, 1] inputs)",
)
register_model(
    "wrn-70-16",
    wrn_70_16,
    normalize=None,
    input_size=_CIFAR,
    aliases=("wrn70", "wrn-70"),
    description="WideResNet-70-16 (classic WideResNet layout, raw [0, 1] inputs)",
)
