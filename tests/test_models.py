"""Model zoo: every architecture builds, checkpoints load safely or fail clearly, and the real
published checkpoints reach their measured accuracy (../shared/data/models/MODELS.md)."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustkit.errors import CheckpointError, DependencyError, UnknownNameError, UsageError
from robustkit.models import (
    PACKAGED_WEIGHTS,
    ModelInfo,
    Normalize,
    ZooModel,
    apply_state_dict,
    build_model,
    file_sha256,
    load_model,
    load_state_dict,
    model_info,
    parse_normalize,
)
from robustkit.registry import MODELS

from conftest import cifar10_test, mnist_test, pyautoattack_checkpoint, shared_file

# Building WRN-70-16 (267M parameters) takes seconds; build it on the meta device, no forward.
BUILD_ONLY = {"wrn-70-16"}


class NotATensor:
    """A custom class: pickles of it must never be loaded."""

    value = 1


# --------------------------------------------------------------------------- registry


def test_registry_has_the_zoo():
    names = MODELS.names()
    assert len(names) >= 10
    for expected in ("resnet18", "preactresnet18", "wrn-28-10", "resnet20", "digits-cnn"):
        assert expected in names
    assert all(isinstance(info, ModelInfo) for _, info in MODELS.items())


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_gives_logits(name):
    info = model_info(name)
    torch.manual_seed(0)
    if name in BUILD_ONLY:
        with torch.device("meta"):
            net = build_model(name)
        assert sum(p.numel() for p in net.parameters()) > 200_000_000
        return
    net = build_model(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *info.input_size))
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()


def test_num_classes_and_in_channels_overrides():
    net = build_model("resnet20", num_classes=100, in_channels=1).eval()
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(UsageError, match="positive integer"):
        build_model("resnet20", num_classes=0)


def test_aliases_and_unknown_names():
    assert model_info("wrn28") is model_info("wrn-28-10")
    assert model_info("WRN34") is model_info("wrn-34-10")
    assert model_info("wrn70") is model_info("wrn-70-16")
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet20'"):
        build_model("resnet200")


def test_torchvision_models_by_name():
    net = build_model("torchvision:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model_info("torchvision:resnet18").normalize == "imagenet"
    with pytest.raises(UnknownNameError, match="Did you mean 'torchvision:resnet18'"):
        build_model("torchvision:resnet19")
    with pytest.raises(UsageError, match="fixed number of input channels"):
        build_model("torchvision:resnet18", in_channels=1)


def test_timm_missing_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(DependencyError, match="pip install timm"):
        build_model("timm:resnet18")


# --------------------------------------------------------------------------- normalization


def test_normalize_layer():
    layer = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.rand(2, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25], 1)
    assert torch.allclose(layer(x), expected)
    assert {n for n, _ in layer.named_buffers()} == {"mean", "std"}


@pytest.mark.parametrize(
    "spec, mean, std",
    [
        ("cifar10", (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
        ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("0.1307:0.3081", (0.1307,), (0.3081,)),
        (" 0.5,0.5,0.5 : 0.2, 0.2,0.2", (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)),
        ("1,2,3,4:5,6,7,8", (1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)),
    ],
)
def test_parse_normalize(spec, mean, std):
    assert parse_normalize(spec) == (mean, std)


def test_parse_normalize_none():
    assert parse_normalize(None) is None
    assert parse_normalize("none") is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cifar11", "Unknown normalization 'cifar11'"),
        ("0.5,0.5:0.2", "2 means but 1 stds"),
        ("a,b,c:1,1,1", "Cannot read the mean"),
        ("0.5:0", "not positive"),
    ],
)
def test_parse_normalize_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_normalize(spec)


def test_load_model_normalization_choices():
    default = load_model("resnet20")
    assert isinstance(default, ZooModel) and default.name == "resnet20"
    assert default.info is model_info("resnet20") and not default.training
    assert torch.allclose(default.normalization.mean.flatten(), torch.tensor((0.485, 0.456, 0.406)))
    assert load_model("resnet20", normalize=None).normalization is None
    assert load_model("resnet20", normalize="none").normalization is None
    cifar = load_model("resnet20", normalize="cifar10").normalization
    assert cifar.std.flatten()[0].item() == pytest.approx(0.2471)
    assert load_model("mnist-cnn-a").normalization is None
    with pytest.raises(UsageError, match="3 channels but mnist-cnn-a takes 1-channel"):
        load_model("mnist-cnn-a", normalize="cifar10")


def test_seeded_random_weights_are_reproducible_and_leave_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = (load_model("resnet20", seed=seed).state_dict() for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture()
def small_state():
    torch.manual_seed(0)
    return build_model("resnet20").state_dict()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


def test_sha256_check(tmp_path, small_state):
    path = tmp_path / "w.pt"
    torch.save(small_state, path)
    digest = file_sha256(path)
    assert len(load_state_dict(path, sha256=digest)) == len(small_state)
    assert len(load_state_dict(path, sha256=digest[:8].upper())) == len(small_state)
    with pytest.raises(CheckpointError, match=f"has sha256 {digest}, expected 0{{64}}"):
        load_state_dict(path, sha256="0" * 64)
    with pytest.raises(UsageError, match="not a hex digest"):
        load_state_dict(path, sha256="xyz")


@pytest.mark.parametrize(
    "obj, found",
    [
        (torch.zeros(3, 4), "a single tensor of shape (3, 4)"),
        ([1, 2, 3], "a list of 3 items"),
        ({"epoch": 3, "acc": 0.9}, "a dict with keys 'epoch', 'acc'"),
        ({}, "an empty dict"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, found):
    path = tmp_path / "bad.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict") as err:
        load_state_dict(path)
    assert found in str(err.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="holds non-tensor Python objects.*NotATensor"):
        load_state_dict(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": NotATensor()}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_state_dict(plain)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch"):
        load_state_dict(path)
    bad = tmp_path / "junk.safetensors"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_state_dict(bad)


def test_safetensors_round_trip(tmp_path, small_state):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_state.items()}, str(path))
    loaded = load_state_dict(path)
    assert loaded.keys() == small_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in small_state.items())
    x = torch.rand(2, 3, 32, 32)
    reference = load_model("resnet20", normalize=None)
    apply_state_dict(reference.net, small_state)
    assert torch.equal(load_model("resnet20", path, normalize=None)(x), reference(x))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "best_prec1": 91.0},
        lambda s: {"model": s, "epoch": 3},
        lambda s: {"model_state_dict": s},
        lambda s: {"net": {f"_orig_mod.{k}": v for k, v in s.items()}},
        lambda s: {"state_dict": [OrderedDict(s)], "acc": torch.tensor(630)},
        lambda s: {f"model.{k}": v for k, v in s.items()},
    ],
    ids=["module", "model", "model_state_dict", "net+orig_mod", "one-elem-list", "model."],
)
def test_wrappers_and_prefixes(tmp_path, small_state, wrap):
    path = tmp_path / "w.pth"
    torch.save(wrap(small_state), path)
    model = load_model("resnet20", path)
    for k, v in small_state.items():
        assert torch.equal(model.net.state_dict()[k], v)


def test_wrapper_state_dict_reloads(tmp_path):
    """A state dict saved from the ZooModel (normalize.*, net.*) loads back into the net."""
    torch.manual_seed(1)
    model = load_model("resnet20")
    path = tmp_path / "zoo.safetensors"
    save_file(model.state_dict(), str(path))
    again = load_model("resnet20", path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))


def test_mismatched_keys_are_named_and_counted(small_state):
    state = dict(small_state)
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "linear.bias"):
        del state[key]
    state["extra.weight"] = torch.zeros(1)
    state["extra.bias"] = torch.zeros(1)
    state["linear.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(build_model("resnet20"), state, name="resnet20")
    message = str(err.value)
    assert message.startswith("Checkpoint does not fit resnet20: 4 missing keys (")
    assert "conv1.weight, bn1.weight, bn1.bias, ..." in message
    assert "2 unexpected keys (extra.weight, extra.bias)" in message
    assert "1 shape-mismatched key" in message and "linear.weight (100, 64) vs (10, 64)" in message


def test_wrong_architecture_fails_clearly(tmp_path, small_state):
    path = tmp_path / "w.pt"
    torch.save(small_state, path)
    with pytest.raises(CheckpointError, match=r"does not fit resnet32: \d+ missing keys"):
        load_model("resnet32", path)


def test_normalize_buffers_are_not_missing(small_state):
    model = load_model("resnet20", normalize="cifar10")
    apply_state_dict(model, small_state)  # loads into model.net; Normalize is not required
    assert model.normalization.mean.flatten()[0].item() == pytest.approx(0.4914)
    assert torch.equal(model.net.conv1.weight, small_state["conv1.weight"])


def test_sha256_needs_a_checkpoint():
    with pytest.raises(UsageError, match="give the checkpoint path"):
        load_model("resnet20", sha256="0" * 64)


def test_digits_cnn_packaged_weights(tmp_path, monkeypatch):
    torch.manual_seed(2)
    net = build_model("digits-cnn")
    path = tmp_path / "digits_cnn.safetensors"
    save_file(net.state_dict(), str(path))
    monkeypatch.setitem(PACKAGED_WEIGHTS, "digits-cnn", path)
    model = load_model("digits-cnn")
    assert model.checkpoint == str(path)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), net.eval()(x))
    monkeypatch.setitem(PACKAGED_WEIGHTS, "digits-cnn", tmp_path / "absent.safetensors")
    assert load_model("digits-cnn").checkpoint is None


# --------------------------------------------------------------------------- real checkpoints

# (registry name, file in ../shared/data/models, sha256 prefix, dataset, measured clean %)
REAL = [
    ("resnet20", "resnet20-12fca82f.th", "12fca82f", "cifar10", 91.5),
    ("resnet32", "resnet32-d509ac18.th", "d509ac18", "cifar10", 92.8),
    ("resnet44", "resnet44-014dd654.th", "014dd654", "cifar10", 93.3),
    ("resnet2b", "abcrown_resnet2b.pth", "ef824b47", "cifar10", 70.3),
    ("resnet4b", "abcrown_resnet4b.pth", "6158f966", "cifar10", 77.1),
    ("cifar-conv-small", "abcrown_cifar_conv_small_pgd.pth", "01adb410", "cifar10", 63.0),
    ("mnist-cnn-a", "abcrown_mnist_cnn_a_adv.pth", "3a1dbfc6", "mnist", 95.6),
    ("mnist-madry-tiny", "abcrown_mnist_madry_tiny_adv.pth", "171ffe80", "mnist", 97.2),
]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean top-1 accuracy in percent (channels_last: about 20% less CPU for the ResNets)."""
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 250):
            correct += (model(x[i : i + 250]).argmax(1) == y[i : i + 250]).sum().item()
    return 100.0 * correct / len(x)


@pytest.mark.parametrize("name, filename, sha, dataset, expected", REAL, ids=[r[1] for r in REAL])
def test_published_checkpoint_accuracy(name, filename, sha, dataset, expected):
    path = shared_file(f"models/{filename}")
    x, y = cifar10_test(1000) if dataset == "cifar10" else mnist_test(1000)
    model = load_model(name, path, sha256=sha)
    acc = _accuracy(model, x, y)
    print(f"\n{filename} as {name}: clean accuracy {acc:.1f}% (MODELS.md: {expected}%)")
    assert abs(acc - expected) <= 1.0


def test_pyautoattack_model_test_accuracy():
    path = pyautoattack_checkpoint()
    x, y = cifar10_test(1000)
    model = load_model("resnet18", path)
    assert model.normalization is None
    acc = _accuracy(model, x, y)
    print(f"\npyautoattack examples/model_test.pt as resnet18: clean accuracy {acc:.1f}% (93.7%)")
    assert abs(acc - 93.7) <= 1.0


class _FixedSize(nn.Module):
    """Checks its input size with an assert, as timm's patch embeddings do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 224, f"Input width ({x.shape[-1]}) doesn't match model (224)."
        return x.flatten(1)[:, :10]


def test_a_model_that_asserts_its_input_size_is_a_clear_error() -> None:
    from robustkit.data import load_dataset
    from robustkit.evaluation.runner import check_model_fits

    with pytest.raises(UsageError, match=r"cannot take digits images of shape \(1, 8, 8\): Input width \(8\)"):
        check_model_fits(_FixedSize(), load_dataset("digits", n_examples=4), torch.device("cpu"))


def test_training_normalization_follows_the_datas_channels() -> None:
    """A model's default normalization that does not fit the data's channels follows the data
    (with a note); an explicit one that does not fit is an error; one that fits is used as is."""
    from robustkit.models.normalize import PRESETS, training_normalize

    layer, note = training_normalize("default", "imagenet", 1, "resnet20", "digits")
    mean, std = PRESETS["imagenet"]
    assert layer is not None and layer.channels == 1
    assert layer.mean.item() == pytest.approx(sum(mean) / 3) and layer.std.item() == pytest.approx(sum(std) / 3)
    assert note is not None and "resnet20" in note and "digits has 1" in note
    layer, note = training_normalize("default", "0.5:0.25", 3, "mnist-cnn-a", "cifar10")
    assert layer is not None and layer.channels == 3 and note is not None
    layer, note = training_normalize("default", "cifar10", 3, "resnet20", "cifar10")
    assert layer is not None and layer.channels == 3 and note is None
    assert training_normalize("none", "cifar10", 1, "resnet20", "digits") == (None, None)
    with pytest.raises(UsageError, match="3 channels but digits images have 1"):
        training_normalize("cifar10", "cifar10", 1, "resnet20", "digits")
