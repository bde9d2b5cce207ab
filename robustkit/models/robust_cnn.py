"""Robust-ResNet: the ResNet-style CNNs of "Can CNNs Be More Robust Than Transformers?"
(Wang et al., ICLR 2023, arXiv 2206.03452; reference code UCSC-VLAA/RobustCNN).

The paper turns a ResNet into a CNN as robust as a ViT with three switches, all options of
:class:`RobustResNet`:

* **patchify stem** (``patch_size``): a non-overlapping ``p x p`` stride-``p`` convolution
  instead of the 7x7/2 conv + max-pool stem (``patch_size=None``);
* **large depthwise kernels** (``kernel_size``): the depthwise convolution of each block is
  ``k x k`` (the paper goes up to 11x11; 3 is the ResNet size); ``block`` picks where the
  depthwise convolution sits (the repo's DW, Inverted-DW, Up-Inverted-DW — moved up, as in
  ConvNeXt — and Down-Inverted-DW blocks);
* **fewer activation and normalization layers** (``reduce_act_norm``): one BatchNorm and one
  ReLU per block (the reference layout) instead of BatchNorm after every convolution and a ReLU
  after the first two (plus after the residual sum in the bottleneck block, as ResNet does).

With ``reduce_act_norm=True`` the module names equal the reference code's
(``stem``, ``stages.i.blocks.j.pwconv1`` ..., ``head.fc``), so its published ImageNet weights
fit the four ``robust-resnet-*-small`` entries. Stage strides follow from the stem: the last
``log2(output_stride / stem_stride)`` stages downsample (the Down-Inverted block strides at the
end of a stage, so its strided stages sit one earlier), which gives the reference's
``stride_stage=(3,)`` (``(2,)`` for Down-Inverted) for a 16x16 patch and ResNet's strides for the
classic stem. CIFAR sizes use a 4x4 patch and output stride 8 (32x32 -> 8x8 tokens -> 4x4).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from robustkit.errors import UsageError
from robustkit.models.zoo import register_model

BLOCKS = ("dw", "inverted", "up-inverted", "down-inverted")
CLASSIC_STEMS = ("imagenet", "cifar")

# Per block kind: its three convolutions (name, in, out, kind of conv) in order, and where the
# single norm / activation of the reference layout sit ("add": after the residual sum).
# Channels: "in" block input, "dim" stage width, "hid" mlp_ratio * dim.
_CONVS = {
    "dw": (("pwconv1", "in", "dim", "pw"), ("conv_dw", "dim", "dim", "dw"), ("pwconv2", "dim", "hid", "pw")),
    "inverted": (("pwconv1", "in", "hid", "pw"), ("conv_dw", "hid", "hid", "dw"), ("pwconv2", "hid", "dim", "pw")),
    "up-inverted": (("conv_dw", "in", "dim", "dw"), ("pwconv1", "dim", "hid", "pw"), ("pwconv2", "hid", "dim", "pw")),
    "down-inverted": (("pwconv1", "in", "hid", "pw"), ("pwconv2", "hid", "dim", "pw"), ("conv_dw", "dim", "dim", "dw")),
}
_REDUCED_NORM = {"dw": (0, "norm1"), "inverted": (0, "norm1"), "up-inverted": (0, "norm1"),
                 "down-inverted": (0, "norm2")}  # fmt: skip
_REDUCED_ACT = {"dw": ("add", "act3"), "inverted": (0, "act1"), "up-inverted": (1, "act2"),
                "down-inverted": (0, "act2")}  # fmt: skip


def drop_path_rates(end: float, n: int) -> list[float]:
    """``n`` evenly spaced stochastic-depth rates from 0 to ``end`` (plain floats: works on meta)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class RobustBlock(nn.Module):
    """One residual block: three convolutions (two 1x1, one ``k x k`` depthwise) in the order of
    ``kind``, layer scale ``gamma``, an optional ``downsample`` shortcut; norms and activations as
    ``reduce_act_norm`` says (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        indim: int,
        dim: int,
        *,
        stride: int = 1,
        kernel_size: int = 11,
        depthwise: bool = True,
        mlp_ratio: float = 4.0,
        reduce_act_norm: bool = True,
        layer_scale_init: float = 1e-6,
        downsample: nn.Module | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        width = {"in": indim, "dim": dim, "hid": int(mlp_ratio * dim)}
        self._steps: list[str] = []
        self._after_add: list[str] = []
        if reduce_act_norm:
            norms = dict([_REDUCED_NORM[kind]])
            acts = dict([_REDUCED_ACT[kind]])
        else:  # BN after every conv, ReLU after the first two (and after the sum in the bottleneck)
            norms = {0: "norm1", 1: "norm2", 2: "norm3"}
            acts = {0: "act1", 1: "act2", **({"add": "act3"} if kind == "dw" else {})}
        for i, (name, cin, cout, conv_kind) in enumerate(_CONVS[kind]):
            c_in, c_out = width[cin], width[cout]
            if conv_kind == "dw":
                conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2,
                                 groups=c_in if depthwise else 1, bias=True)
            else:
                conv = nn.Conv2d(c_in, c_out, 1, bias=True)
            self.add_module(name, conv)
            self._steps.append(name)
            if i in norms:
                self.add_module(norms[i], nn.BatchNorm2d(c_out))
                self._steps.append(norms[i])
            if i in acts:
                self.add_module(acts[i], nn.ReLU(inplace=True))
                self._steps.append(acts[i])
        out = width[_CONVS[kind][-1][2]]
        self.gamma = nn.Parameter(torch.full((out,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = downsample
        if "add" in acts:
            self.add_module(acts["add"], nn.ReLU(inplace=True))
            self._after_add.append(acts["add"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        for name in self._steps:
            x = self._modules[name](x)  # type: ignore[misc]
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        x = self.drop_path(x) + shortcut
        for name in self._after_add:
            x = self._modules[name](x)  # type: ignore[misc]
        return x


class Stage(nn.Module):
    """``depth`` blocks; the stride sits on the first block (the last for ``down-inverted``)."""

    def __init__(self, kind: str, in_chs: int, dim: int, *, stride: int, depth: int, mlp_ratio: float,
                 drop_paths: list[float], **block_args: object):
        super().__init__()
        out_chs = dim if kind != "dw" else int(mlp_ratio * dim)
        strided = depth - 1 if kind == "down-inverted" else 0
        blocks = []
        for j in range(depth):
            s = stride if j == strided else 1
            downsample = None
            if in_chs != out_chs or s > 1:
                downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=s, bias=True), nn.BatchNorm2d(out_chs))
            blocks.append(RobustBlock(kind, in_chs, dim, stride=s, mlp_ratio=mlp_ratio, downsample=downsample,
                                      drop_path=drop_paths[j], **block_args))  # type: ignore[arg-type]
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _classic_stem(kind: str, in_channels: int, width: int) -> tuple[nn.Module, int]:
    if kind == "imagenet":  # ResNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool
        layers = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        return nn.Sequential(*layers), 4
    layers = [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True)]  # CIFAR ResNets: 3x3/1 conv, BN, ReLU
    return nn.Sequential(*layers), 1


def stage_strides(block: str, stem_stride: int, output_stride: int, n_stages: int = 4) -> tuple[int, ...]:
    """Per-stage strides that take ``stem_stride`` to ``output_stride`` (last stages stride 2)."""
    ratio = output_stride / stem_stride
    n = round(math.log2(ratio)) if ratio >= 1 else -1
    limit = n_stages - 1 if block == "down-inverted" else n_stages
    if n < 0 or 2**n != ratio or n > limit:
        raise UsageError(
            f"output_stride {output_stride} must be the stem stride {stem_stride} times a power of two up to "
            f"2**{limit} for {block} blocks."
        )
    first = n_stages - n - (1 if block == "down-inverted" else 0)
    return tuple(2 if first <= i < first + n else 1 for i in range(n_stages))


class RobustResNet(nn.Module):
    """Robust-ResNet with the paper's three switches as options (see the module docstring).

    ``block``: one of ``dw``, ``inverted``, ``up-inverted``, ``down-inverted``. ``patch_size``:
    the patchify stem's patch (``None``: the classic stem, ``classic_stem`` ``imagenet`` or
    ``cifar``). ``kernel_size``: the depthwise kernel (odd). ``depthwise=False`` makes that conv
    dense (with ``block="dw"``, ``kernel_size=3``, the classic stem and ``reduce_act_norm=False``
    this is ResNet-50 v1.5 plus conv biases). ``layer_scale_init=0`` drops layer scale.
    """

    def __init__(
        self,
        block: str = "dw",
        depths: tuple[int, ...] = (3, 4, 12, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        patch_size: int | None = 16,
        classic_stem: str = "imagenet",
        kernel_size: int = 11,
        depthwise: bool = True,
        reduce_act_norm: bool = True,
        output_stride: int = 32,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise UsageError(f"Unknown Robust-ResNet block {block!r}; accepted: {', '.join(BLOCKS)}.")
        if len(depths) != len(dims) or not depths:
            raise UsageError(f"depths and dims need one entry per stage; got {depths} and {dims}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UsageError(f"kernel_size must be an odd positive integer, got {kernel_size}.")
        if patch_size is not None and patch_size < 1:
            raise UsageError(f"patch_size must be a positive integer or None, got {patch_size}.")
        if patch_size is None and classic_stem not in CLASSIC_STEMS:
            raise UsageError(f"classic_stem must be one of {', '.join(CLASSIC_STEMS)}, got {classic_stem!r}.")
        self.block = block
        self.patch_size = patch_size
        self.kernel_size = kernel_size
        self.reduce_act_norm = reduce_act_norm
        if patch_size is not None:
            self.stem: nn.Module = nn.Conv2d(in_channels, dims[0], patch_size, stride=patch_size, bias=True)
            stem_stride = patch_size
        else:
            self.stem, stem_stride = _classic_stem(classic_stem, in_channels, dims[0])
        strides = stage_strides(block, stem_stride, output_stride, len(depths))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        stages, prev, start = [], dims[0], 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(Stage(block, prev, dim, stride=strides[i], depth=depth, mlp_ratio=mlp_ratio,
                                drop_paths=rates[start:start + depth], kernel_size=kernel_size, depthwise=depthwise,
                                reduce_act_norm=reduce_act_norm, layer_scale_init=layer_scale_init))
            start += depth
            prev = int(mlp_ratio * dim) if block == "dw" else dim
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head = nn.Sequential(OrderedDict([
            ("global_pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)), ("drop", nn.Dropout(drop_rate)),
            ("fc", nn.Linear(prev, num_classes)),
        ]))  # fmt: skip
        for m in self.modules():  # the reference's ResNet init (nothing to draw on the meta device)
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# -- the reference's four ImageNet models ("small": DeiT-S budget, 224x224, patch 16) ---------------


def robust_resnet_dw_small(num_classes: int = 1000, in_channels: int = 3) -> RobustResNet:
    """Robust-ResNet-DW-Small: bottleneck DW blocks, 11x11 kernels, 16x16 patch (38.6M params)."""
    return RobustResNet("dw", (3, 4, 12, 3), num_classes=num_classes, in_channels=in_channels, kernel_size=11)


def robust_resnet_inverted_dw_small(num_classes: int = 1000, in_channels: int = 3) -> RobustResNet:
    """Robust-ResNet-Inverted-DW-Small: inverted bottleneck, 7x7 kernels (33.6M params)."""
    return RobustResNet("inverted", (3, 4, 14, 3), num_classes=num_classes, in_channels=in_channels, kernel_size=7)


def robust_resnet_up_inverted_dw_small(num_classes: int = 1000, in_channels: int = 3) -> RobustResNet:
    """Robust-ResNet-Up-Inverted-DW-Small: depthwise conv moved up, 11x11 kernels (34.4M params)."""
    return RobustResNet("up-inverted", (3, 4, 14, 3), num_classes=num_classes, in_channels=in_channels,
                        kernel_size=11)


def robust_resnet_down_inverted_dw_small(num_classes: int = 1000, in_channels: int = 3) -> RobustResNet:
    """Robust-ResNet-Down-Inverted-DW-Small: depthwise conv moved down, 11x11 kernels (24.3M params)."""
    return RobustResNet("down-inverted", (3, 4, 15, 3), num_classes=num_classes, in_channels=in_channels,
                        kernel_size=11)


# -- CIFAR sizes: 4x4 patch, output stride 8 (32x32 -> 8x8 -> 4x4) ------------------------------------


def robust_resnet_dw_small_cifar(num_classes: int = 10, in_channels: int = 3) -> RobustResNet:
    """Robust-ResNet-DW-Small at CIFAR size: the same blocks and 11x11 kernels, a 4x4 patch."""
    return RobustResNet("dw", (3, 4, 12, 3), num_classes=num_classes, in_channels=in_channels, kernel_size=11,
                        patch_size=4, output_stride=8)


CIFAR_DEPTHS, CIFAR_DIMS = (2, 2, 2, 2), (32, 64, 128, 256)


def robust_resnet_cifar(num_classes: int = 10, in_channels: int = 3) -> RobustResNet:
    """A small Robust-ResNet-DW for 32x32 inputs (quick to train): all three switches on."""
    return RobustResNet("dw", CIFAR_DEPTHS, CIFAR_DIMS, num_classes=num_classes, in_channels=in_channels,
                        kernel_size=11, patch_size=4, output_stride=8)


def robust_resnet_cifar_baseline(num_classes: int = 10, in_channels: int = 3) -> RobustResNet:
    """``robust-resnet-cifar`` with the three switches off: 3x3/1 stem, 3x3 depthwise kernels,
    BN after every conv and three ReLUs per block (the paper's ResNet-DW starting point)."""
    return RobustResNet("dw", CIFAR_DEPTHS, CIFAR_DIMS, num_classes=num_classes, in_channels=in_channels,
                        kernel_size=3, patch_size=None, classic_stem="cifar", reduce_act_norm=False, output_stride=8)


_IMAGENET = (3, 224, 224)
_CIFAR = (3, 32, 32)
for _name, _factory in (
    ("robust-resnet-dw-small", robust_resnet_dw_small),
    ("robust-resnet-inverted-dw-small", robust_resnet_inverted_dw_small),
    ("robust-resnet-up-inverted-dw-small", robust_resnet_up_inverted_dw_small),
    ("robust-resnet-down-inverted-dw-small", robust_resnet_down_inverted_dw_small),
):
    register_model(
        _name,
        _factory,
        normalize="imagenet",
        input_size=_IMAGENET,
        num_classes=1000,
        aliases=(_name.replace("-", "_"),),
        description=f"{(_factory.__doc__ or '').split(':')[0]} (Wang et al. 2023, UCSC-VLAA/RobustCNN layout)",
    )
register_model(
    "robust-resnet-dw-small-cifar",
    robust_resnet_dw_small_cifar,
    normalize="cifar10",
    input_size=_CIFAR,
    description="Robust-ResNet-DW-Small for 32x32 inputs (4x4 patch, 11x11 depthwise, one BN/ReLU per block)",
)
register_model(
    "robust-resnet-cifar",
    robust_resnet_cifar,
    normalize="cifar10",
    input_size=_CIFAR,
    description="Small Robust-ResNet-DW for 32x32 inputs: patchify 4x4, 11x11 depthwise, one BN/ReLU per block",
)
register_model(
    "robust-resnet-cifar-baseline",
    robust_resnet_cifar_baseline,
    normalize="cifar10",
    input_size=_CIFAR,
    description="robust-resnet-cifar with the switches off: 3x3 stem, 3x3 depthwise, BN+ReLU after each conv",
)
