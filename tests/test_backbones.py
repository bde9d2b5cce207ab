"""Backbones: Robust-ResNet (Wang et al. 2023) and StarNet (Ma et al. 2024) match their reference
sizes and layouts, each Robust-ResNet switch changes the network as the paper says, every model
family in ``robustkit.models`` (and a ``timm:`` model) takes a real ``pgd-at`` training step, and a
trained backbone round-trips through its checkpoint and ``robustkit eval``.

Fast: one thread, scikit-learn's 8x8 ``digits`` (real images), parameter counts on the meta device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.errors import UsageError
from robustkit.models import ZooModel, build_model, load_model, model_info
from robustkit.models.robust_cnn import RobustBlock, RobustResNet, stage_strides
from robustkit.models.sidecar import load_trained_model
from robustkit.models.starnet import StarBlock, starnet
from robustkit.registry import MODELS
from robustkit.training.loop import TrainConfig, build_training_model, train

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_params(name: str) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return n_params(build_model(name))


# -- sizes against the papers' / reference code's numbers ---------------------------------------------


@pytest.mark.parametrize("name,millions", [("starnet-s1", 2.9), ("starnet-s2", 3.7), ("starnet-s3", 5.8),
                                           ("starnet-s4", 7.5)])  # fmt: skip
def test_starnet_sizes_match_the_published_table(name: str, millions: float) -> None:
    """Params column of the Rewrite-the-Stars README (imagenet/README.md), given to 0.1M."""
    assert abs(meta_params(name) / 1e6 - millions) <= 0.05


@pytest.mark.parametrize("name,millions", [
    ("robust-resnet-dw-small", 38.6),
    ("robust-resnet-inverted-dw-small", 33.6),
    ("robust-resnet-up-inverted-dw-small", 34.4),
    # The reference docstring says 24.3M, but its own config (depths 3-4-15-3, dims 96-768, 4x inverted
    # bottleneck) has 34.3M: eight dim^2 per block gives 33.3M in the blocks alone; the "2" is a typo.
    ("robust-resnet-down-inverted-dw-small", 34.3),
])  # fmt: skip
def test_robust_resnet_sizes_match_the_reference(name: str, millions: float) -> None:
    """Parameter counts in the docstrings of UCSC-VLAA/RobustCNN timm/models/robust_resnet.py."""
    assert abs(meta_params(name) / 1e6 - millions) <= 0.05


def test_all_switches_off_is_resnet50() -> None:
    """Bottleneck block, dense 3x3, classic stem, BN+ReLU everywhere, no layer scale: torchvision's
    ResNet-50 v1.5 layer for layer, plus the conv biases the reference keeps."""
    import torchvision

    with torch.device("meta"):
        ours = RobustResNet("dw", (3, 4, 6, 3), (64, 128, 256, 512), patch_size=None, kernel_size=3,
                            depthwise=False, reduce_act_norm=False, layer_scale_init=0)
    ref = torchvision.models.resnet50()  # on the CPU: its normal_ init on meta imports torch._dynamo (seconds)

    def conv_shapes(m: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(c.weight.shape) for c in m.modules() if isinstance(c, nn.Conv2d)]

    def conv_strides(m: nn.Module) -> list[tuple[int, ...]]:
        return [c.stride for c in m.modules() if isinstance(c, nn.Conv2d)]

    assert conv_shapes(ours) == conv_shapes(ref)
    assert conv_strides(ours) == conv_strides(ref)
    count = lambda m, t: sum(isinstance(x, t) for x in m.modules())  # noqa: E731
    assert count(ours, nn.BatchNorm2d) == count(ref, nn.BatchNorm2d) == 53
    biases = sum(c.bias.numel() for c in ours.modules() if isinstance(c, nn.Conv2d) and c.bias is not None)
    assert n_params(ours) == n_params(ref) + biases


# -- the three switches ---------------------------------------------------------------------------------


def small(block: str = "dw", **kw: object) -> RobustResNet:
    """A tiny CIFAR-size Robust-ResNet (switches on unless ``kw`` turns them off)."""
    args = dict(num_classes=10, patch_size=4, kernel_size=11, output_stride=8)
    args.update(kw)
    return RobustResNet(block, (1, 2, 1, 1), (8, 16, 16, 32), **args)  # type: ignore[arg-type]


def stage_inputs(net: RobustResNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Spatial size entering each stage (recorded by forward hooks)."""
    sizes: list[tuple[int, ...]] = []
    hooks = [s.register_forward_pre_hook(lambda _m, a: sizes.append(tuple(a[0].shape[2:]))) for s in net.stages]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def test_patchify_stem_switch() -> None:
    x = torch.rand(2, 3, 32, 32)
    on, off = small(), small(patch_size=None, classic_stem="cifar")
    assert isinstance(on.stem, nn.Conv2d) and on.stem.kernel_size == on.stem.stride == (4, 4)
    assert on.stem.padding == (0, 0)  # non-overlapping patches
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (4, 4) for m in off.modules())
    assert stage_inputs(on, x) == [(8, 8), (8, 8), (8, 8), (8, 8)]  # stride 4 stem, stage 4 strides 2
    assert stage_inputs(off, x) == [(32, 32), (32, 32), (16, 16), (8, 8)]  # ResNet strides
    for net in (on, off):
        assert net.eval()(x).shape == (2, 10)
    big = RobustResNet("dw", (1, 1, 1, 1), (8, 16, 16, 32), patch_size=8, num_classes=5)
    assert stage_inputs(big, torch.rand(1, 3, 64, 64)) == [(8, 8), (8, 8), (8, 8), (4, 4)]  # stages 3, 4 stride


@pytest.mark.parametrize("block", ["dw", "inverted", "up-inverted", "down-inverted"])
@pytest.mark.parametrize("kernel", [3, 7, 11])
def test_depthwise_kernel_switch(block: str, kernel: int) -> None:
    net = small(block, kernel_size=kernel)
    dws = [b.conv_dw for b in net.modules() if isinstance(b, RobustBlock)]
    assert len(dws) == 5
    for conv in dws:
        assert conv.kernel_size == (kernel, kernel) and conv.padding == (kernel // 2, kernel // 2)
        assert conv.groups == conv.in_channels  # depthwise
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def relu_calls(net: nn.Module, x: torch.Tensor) -> int:
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in net.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return len(calls)


@pytest.mark.parametrize("block,full_acts", [("dw", 3), ("inverted", 2), ("up-inverted", 2), ("down-inverted", 2)])
def test_fewer_activation_and_norm_layers_switch(block: str, full_acts: int) -> None:
    reduced, full = small(block), small(block, reduce_act_norm=False)
    for net, norms, acts in ((reduced, 1, 1), (full, 3, full_acts)):
        for b in (m for m in net.modules() if isinstance(m, RobustBlock)):
            own = [m for name, m in b.named_modules() if name and not name.startswith("downsample")]
            assert sum(isinstance(m, nn.BatchNorm2d) for m in own) == norms
            assert sum(isinstance(m, nn.ReLU) for m in own) == acts
    x = torch.rand(2, 3, 32, 32)
    assert relu_calls(reduced, x) == 5 and relu_calls(full, x) == 5 * full_acts  # 5 blocks, patchify stem
    # The reference layout: the bottleneck's one ReLU follows the residual sum (``act3``).
    if block == "dw":
        assert reduced.stages[0].blocks[0]._after_add == ["act3"]


def test_stage_strides_and_bad_options() -> None:
    assert stage_strides("dw", 16, 32) == (1, 1, 1, 2)  # reference stride_stage=(3,)
    assert stage_strides("down-inverted", 16, 32) == (1, 1, 2, 1)  # reference stride_stage=(2,)
    assert stage_strides("dw", 4, 32) == (1, 2, 2, 2)  # ResNet
    assert stage_strides("dw", 8, 32) == (1, 1, 2, 2)
    with pytest.raises(UsageError, match="output_stride"):
        stage_strides("dw", 3, 32)
    with pytest.raises(UsageError, match="odd"):
        small(kernel_size=4)
    with pytest.raises(UsageError, match="accepted: dw, inverted"):
        RobustResNet("convnext")


def test_registered_cifar_pair_differs_only_in_the_switches() -> None:
    on, off = build_model("robust-resnet-cifar"), build_model("robust-resnet-cifar-baseline")
    assert (on.patch_size, on.kernel_size, on.reduce_act_norm) == (4, 11, True)
    assert (off.patch_size, off.kernel_size, off.reduce_act_norm) == (None, 3, False)
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert widths(on) == widths(off)


# -- StarNet ------------------------------------------------------------------------------------------


def test_star_block_multiplies_two_branches() -> None:
    torch.manual_seed(0)
    block = StarBlock(8, mlp_ratio=3).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = block.dwconv(x)
        manual = x + block.dwconv2(block.g(F.relu6(block.f1(y)) * block.f2(y)))
        torch.testing.assert_close(block(x), manual)
        assert block.f1.conv.out_channels == block.f2.conv.out_channels == 24
        nn.init.zeros_(block.f2.conv.weight)
        nn.init.zeros_(block.f2.conv.bias)  # a zero factor silences the whole product branch
        expected = x + block.dwconv2(block.g(torch.zeros(2, 24, 6, 6)))
        torch.testing.assert_close(block(x), expected)


def test_starnet_sizes_and_cifar_resolution() -> None:
    def final_map(net: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
        seen: list[tuple[int, ...]] = []
        hook = net.norm.register_forward_hook(lambda _m, _a, out: seen.append(tuple(out.shape[2:])))
        with torch.no_grad():
            out = net.eval()(x)
        hook.remove()
        assert out.shape == (x.shape[0], net.head.out_features)
        return seen[0]

    assert final_map(build_model("starnet-cifar"), torch.rand(1, 3, 32, 32)) == (4, 4)  # output stride 8
    assert final_map(starnet("s050", num_classes=7), torch.rand(1, 3, 64, 64)) == (2, 2)  # output stride 32
    gray = build_model("starnet-cifar", in_channels=1, num_classes=10)
    assert final_map(gray, torch.rand(2, 1, 8, 8)) == (1, 1)
    with pytest.raises(UsageError, match="accepted: s050"):
        starnet("s5")


# -- one pgd-at step for every family -------------------------------------------------------------------

#: The representative of each model module: its smallest or most common member.
REPRESENTATIVES = {
    "robustkit.models.abcrown_resnet": "resnet2b",
    "robustkit.models.preact_resnet": "preactresnet18",
    "robustkit.models.resnet_cifar": "resnet18",
    "robustkit.models.resnet_small": "resnet20",
    "robustkit.models.robust_cnn": "robust-resnet-cifar",
    "robustkit.models.small_cnn": "digits-cnn",
    "robustkit.models.starnet": "starnet-cifar",
    "robustkit.models.wide_resnet": "wrn-28-10",
}


def families() -> dict[str, str]:
    """Every ``robustkit.models`` module that registers models -> one of its models (the listed
    representative, else the member with the fewest parameters)."""
    members: dict[str, list[str]] = {}
    for name in MODELS.names():
        module = model_info(name).factory.__module__
        if module.startswith("robustkit.models."):
            members.setdefault(module, []).append(name)
    return {m: REPRESENTATIVES.get(m) or min(names, key=meta_params) for m, names in sorted(members.items())}


FAMILY_MODELS = [*families().values(), "timm:resnet18"]


def test_the_new_families_are_covered() -> None:
    covered = families()
    assert covered["robustkit.models.robust_cnn"] == "robust-resnet-cifar"
    assert covered["robustkit.models.starnet"] == "starnet-cifar"
    assert len(covered) >= 8


def digits_npz(tmp_path: Path, shape: tuple[int, int, int], n: int = 8) -> str:
    """The first ``n`` digits training images (real 8x8 scans) as ``shape`` float images: channels
    repeated, resized only when the model needs another size."""
    d = load_dataset("digits", split="train", n_examples=n)
    c, h, w = shape
    x = d.x if (h, w) == (8, 8) else F.interpolate(d.x, size=(h, w), mode="bilinear", align_corners=False)
    path = tmp_path / f"digits_{c}x{h}x{w}.npz"
    np.savez(path, x=x.repeat(1, c, 1, 1).clamp(0, 1).numpy(), y=d.y.numpy())
    return f"npz:{path}"


def pgd_config(dataset: str, model: str, **kw: object) -> TrainConfig:
    base = dict(method="pgd-at", model=model, dataset=dataset, n_examples=8, batch_size=8, epochs=1, val_size=0,
                attack_steps=2, eps=0.1, lr=0.05, momentum=0.0, weight_decay=0.0, schedule="constant", device="cpu")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def training_setup(name: str, tmp_path: Path) -> tuple[TrainConfig, ZooModel]:
    """Config and fresh model on digits' own 8x8 images when the network pools globally (cheap),
    else on digits resized to the model's input size."""
    c, h, w = (3, 32, 32) if name.startswith("timm:") else model_info(name).input_size
    for shape in ((c, 8, 8), (c, h, w)):
        cfg = pgd_config(digits_npz(tmp_path, shape), name)
        data = load_dataset(cfg.dataset, split="train", n_examples=cfg.n_examples)
        torch.manual_seed(0)
        zoo = build_training_model(cfg, data)
        try:
            with torch.no_grad():
                zoo.eval()(data.x[:2])
            return cfg, zoo
        except RuntimeError:  # a fixed-size head (alpha-beta-CROWN, MNIST CNNs)
            continue
    raise AssertionError(f"{name} takes neither 8x8 nor {h}x{w} inputs")


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_one_pgd_at_step_trains_every_family(name: str, tmp_path: Path) -> None:
    cfg, zoo = training_setup(name, tmp_path)
    before = {k: p.detach().clone() for k, p in zoo.named_parameters()}
    result = train(cfg, model=zoo)
    (row,) = result.history
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    changed = [k for k, p in result.model.named_parameters() if not torch.equal(p.detach(), before[k])]
    weights = [k for k in before if k.endswith("weight")]
    assert weights[0] in changed and weights[-1] in changed  # the first and the last layer learn
    # No weight decay or momentum: a tensor moves only where its gradient is non-zero. Residual
    # branches whose last BN starts at zero (timm's zero_init_last) stay still on the first step.
    assert len(changed) >= len(before) / 3, sorted(set(before) - set(changed))[:10]


# -- checkpoint round trip and the eval CLI -------------------------------------------------------------


def test_trained_backbone_round_trips_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = digits_npz(tmp_path, (3, 8, 8), n=16)
    cfg = pgd_config(dataset, "starnet-cifar", n_examples=16, out=str(tmp_path / "run"))
    result = train(cfg)
    assert result.weights is not None and result.weights.is_file()
    data = load_dataset(dataset, split="test")
    with torch.no_grad():
        expected = result.model.eval()(data.x)
        torch.testing.assert_close(load_model("starnet-cifar", result.weights)(data.x), expected)
        torch.testing.assert_close(load_trained_model(result.weights)(data.x), expected)
    clean = (expected.argmax(1) == data.y).float().mean().item()

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "starnet-cifar", "--checkpoint", str(result.weights), "--dataset", dataset,
              "--attack", "pgd", "--attack-kwargs", "steps=3", "--eps", "0.1", "--device", "cpu",
              "--db", str(tmp_path / "board.db"), "--json", "--quiet"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    (row,) = json.loads(out)
    assert row["model"] == "starnet-cifar" and row["n_examples"] == 16
    assert row["clean_acc"] == pytest.approx(clean)
    assert 0 <= row["robust_acc"] <= row["clean_acc"]
