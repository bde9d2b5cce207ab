"""StarNet: "Rewrite the Stars" (Ma et al., CVPR 2024, arXiv 2403.19967; code ma-xu/Rewrite-the-Stars).

Each block is depthwise 7x7 conv + BN, two 1x1 expansions ``f1``/``f2`` combined by the *star
operation* ``relu6(f1(x)) * f2(x)`` (element-wise product), a 1x1 projection ``g`` + BN, a second
depthwise 7x7 conv and the residual sum. A 3x3/2 stem (32 channels) and four stages, each opened
by a 3x3/2 conv + BN, give output stride 32. Module names follow the reference
(``stem.0.conv``, ``stages.i.0`` the downsampler, ``stages.i.j.f1.conv``, ``norm``, ``head``),
so its published ImageNet checkpoints fit ``starnet-s1`` .. ``starnet-s4``.

The CIFAR variant keeps the S1 widths but strides 1 in the stem and in the first stage's
downsampler (output stride 8: 32x32 -> 4x4, as CIFAR ResNets do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robustkit.errors import UsageError
from robustkit.models.robust_cnn import DropPath, drop_path_rates
from robustkit.models.zoo import register_model


class ConvBN(nn.Sequential):
    """Conv2d (``conv``) followed, when ``with_bn``, by BatchNorm (``bn``, weight 1, bias 0)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, with_bn: bool = True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups))
        if with_bn:
            self.add_module("bn", nn.BatchNorm2d(cout))
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)


class StarBlock(nn.Module):
    """dwconv(7x7)+BN -> relu6(f1) * f2 (the star) -> g(1x1)+BN -> dwconv2(7x7) -> + input."""

    def __init__(self, dim: int, mlp_ratio: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=True)
        self.f1 = ConvBN(dim, mlp_ratio * dim, 1, with_bn=False)
        self.f2 = ConvBN(dim, mlp_ratio * dim, 1, with_bn=False)
        self.g = ConvBN(mlp_ratio * dim, dim, 1, with_bn=True)
        self.dwconv2 = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=False)
        self.act = nn.ReLU6()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = self.act(self.f1(y)) * self.f2(y)  # the star operation
        return x + self.drop_path(self.dwconv2(self.g(y)))


class StarNet(nn.Module):
    """StarNet with stage widths ``base_dim * 2**i`` and ``depths`` blocks per stage.

    ``stem_stride`` (2 for ImageNet) and ``first_stage_stride`` (the first downsampler's, 2 for
    ImageNet) set the resolution for small inputs; ``drop_path_rate`` is the stochastic-depth rate
    of the last block (linear from 0; the reference trains S2/S3 with 0.01, S4 with 0.02).
    """

    def __init__(
        self,
        base_dim: int = 32,
        depths: tuple[int, ...] = (3, 3, 12, 5),
        mlp_ratio: int = 4,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_stride: int = 2,
        first_stage_stride: int = 2,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if stem_stride not in (1, 2) or first_stage_stride not in (1, 2):
            raise UsageError(f"StarNet strides must be 1 or 2, got stem {stem_stride}, stage {first_stage_stride}.")
        stem_width = 32
        self.stem = nn.Sequential(ConvBN(in_channels, stem_width, 3, stem_stride, 1), nn.ReLU6())
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        prev, start = stem_width, 0
        for i, depth in enumerate(depths):
            dim = base_dim * 2**i
            down = ConvBN(prev, dim, 3, first_stage_stride if i == 0 else 2, 1)
            blocks = [StarBlock(dim, mlp_ratio, rates[start + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(down, *blocks))
            prev, start = dim, start + depth
        self.norm = nn.BatchNorm2d(prev)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # the reference initializes only Linear layers
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(self.avgpool(self.norm(x)), 1))


#: size -> (base_dim, depths, mlp_ratio), as the reference's ``starnet_*`` functions
CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "s050": (16, (1, 1, 3, 1), 3),
    "s100": (20, (1, 2, 4, 1), 4),
    "s150": (24, (1, 2, 4, 2), 3),
    "s1": (24, (2, 2, 8, 3), 4),
    "s2": (32, (1, 2, 6, 2), 4),
    "s3": (32, (2, 2, 8, 4), 4),
    "s4": (32, (3, 3, 12, 5), 4),
}


def starnet(size: str, num_classes: int = 1000, in_channels: int = 3, **kwargs: object) -> StarNet:
    """StarNet of size ``s050``, ``s100``, ``s150``, ``s1``, ``s2``, ``s3`` or ``s4`` (reference widths)."""
    if size not in CONFIGS:
        raise UsageError(f"Unknown StarNet size {size!r}; accepted: {', '.join(CONFIGS)}.")
    base, depths, ratio = CONFIGS[size]
    return StarNet(base, depths, ratio, num_classes=num_classes, in_channels=in_channels, **kwargs)  # type: ignore[arg-type]


def _factory(size: str) -> Callable[..., StarNet]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> StarNet:
        return starnet(size, num_classes, in_channels)

    build.__doc__ = f"StarNet-{size.upper()} for 224x224 ImageNet inputs."
    return build


def starnet_cifar(num_classes: int = 10, in_channels: int = 3) -> StarNet:
    """StarNet-S1 widths for 32x32 inputs: stride-1 stem and first downsampler (output stride 8)."""
    return starnet("s1", num_classes, in_channels, stem_stride=1, first_stage_stride=1)


_PAPER_PARAMS = {"s1": "2.9M", "s2": "3.7M", "s3": "5.8M", "s4": "7.5M"}
for _size in CONFIGS:
    _params = f", {_PAPER_PARAMS[_size]} params" if _size in _PAPER_PARAMS else ""
    register_model(
        f"starnet-{_size}",
        _factory(_size),
        normalize="imagenet",
        input_size=(3, 224, 224),
        num_classes=1000,
        aliases=(f"starnet_{_size}",),
        description=f"StarNet-{_size.upper()} (Ma et al. 2024, star-operation blocks{_params})",
    )
register_model(
    "starnet-cifar",
    starnet_cifar,
    normalize="cifar10",
    input_size=(3, 32, 32),
    aliases=("starnet-s1-cifar",),
    description="StarNet-S1 for 32x32 inputs (stride-1 stem and first stage, output stride 8)",
)
