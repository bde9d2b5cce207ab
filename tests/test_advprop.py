"""AdvProp and Fast AdvProp: the dual-BatchNorm transform (routing, export, replay on loading),
the two training strategies end to end through ``robustkit train``/``robustkit eval``, Fast
AdvProp's gradient reuse and its cost in forward/backward passes.

Fast: scikit-learn's 8x8 ``digits``, ResNet-20 (the smallest registered model with BatchNorm)
or a three-layer toy, one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.defenses import build_strategy
from robustkit.defenses.advprop import (
    DualBN,
    FastAdvProp,
    auxiliary_bn,
    dual_layers,
    noisy_pass_grads,
    plain_state_dict,
    strip_dual_bn,
    to_dual_bn,
    use_bn,
)
from robustkit.errors import UsageError
from robustkit.models import build_model
from robustkit.models.sidecar import load_trained_model, read_sidecar
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel
from robustkit.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def toy() -> nn.Module:
    """Conv + BatchNorm2d, then Linear + BatchNorm1d: both BatchNorm kinds, with non-trivial
    statistics and affine parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net


def digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits", split="train", n_examples=n)
    return d.x, d.y


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, in_channels=1)


def to_dual_bn_model(net: nn.Module) -> nn.Module:
    to_dual_bn(net)
    return net


def bn_stats(model: nn.Module, branch: str) -> list[torch.Tensor]:
    return [getattr(m, branch).running_mean.clone() for m in dual_layers(model)]


# -- the dual-BN transform ------------------------------------------------------------------------


def test_dual_bn_is_a_registered_architecture_transform() -> None:
    assert getattr(DEFENSES.get("dual-bn"), "kind", None) == "architecture"
    for name in ("advprop", "fast-advprop"):
        assert getattr(DEFENSES.get(name), "kind", None) == "training"


def test_conversion_keeps_outputs_identical() -> None:
    x, _ = digits(16)
    net = toy()
    ref_eval, ref_train = net.eval()(x), net.train()(x)  # train mode: batch statistics, same affine
    dual = toy()
    transform = DualBN()
    transform.apply(dual)
    assert transform.converted == 2 and len(dual_layers(dual)) == 2
    assert to_dual_bn(dual) == 0  # idempotent
    for layer in dual_layers(dual):
        for name in ("weight", "bias", "running_mean", "running_var"):
            torch.testing.assert_close(getattr(layer.aux, name), getattr(layer.main, name), rtol=0, atol=0)
    torch.testing.assert_close(dual.eval()(x), ref_eval, rtol=0, atol=0)
    with auxiliary_bn(dual):
        torch.testing.assert_close(dual.eval()(x), ref_eval, rtol=0, atol=0)
        torch.testing.assert_close(dual.train()(x), ref_train, rtol=0, atol=0)
    torch.testing.assert_close(dual.train()(x), ref_train, rtol=0, atol=0)
    keys = dual.state_dict().keys()
    assert "1.main.running_mean" in keys and "1.aux.running_mean" in keys and "1.running_mean" not in keys


def test_routing_updates_only_the_chosen_batchnorm() -> None:
    x, _ = digits(32)
    dual = to_dual_bn_model(toy())
    dual.train()
    main0, aux0 = bn_stats(dual, "main"), bn_stats(dual, "aux")
    with auxiliary_bn(dual):
        assert all(m.branch == "aux" for m in dual_layers(dual))
        dual(x)
    assert all(m.branch == "main" for m in dual_layers(dual))  # routing restored
    main1, aux1 = bn_stats(dual, "main"), bn_stats(dual, "aux")
    assert all(torch.equal(a, b) for a, b in zip(main0, main1, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(aux0, aux1, strict=True))
    dual(x + 0.5)  # default routing: the main BNs only
    main2, aux2 = bn_stats(dual, "main"), bn_stats(dual, "aux")
    assert all(not torch.equal(a, b) for a, b in zip(main1, main2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(aux1, aux2, strict=True))


def test_eval_uses_the_main_batchnorm() -> None:
    x, _ = digits(32)
    dual = to_dual_bn_model(toy()).train()
    with auxiliary_bn(dual):
        for _ in range(5):
            dual(x * 0.2 + 0.7)  # the auxiliary BNs learn very different statistics
    plain = strip_dual_bn(to_dual_bn_model(toy()))  # the original network, main BN weights
    dual.eval()
    torch.testing.assert_close(dual(x), plain.eval()(x), rtol=0, atol=0)
    with auxiliary_bn(dual):
        assert not torch.allclose(dual(x), plain(x))


def test_plain_export_loads_into_the_unmodified_architecture() -> None:
    x, _ = digits(32)
    dual = resnet20()
    DualBN().apply(dual)
    dual.train()
    dual(x)
    with auxiliary_bn(dual):
        dual(1 - x)
    state = plain_state_dict(dual)
    assert not any(".aux." in k or ".main." in k for k in state)
    fresh = resnet20()
    fresh.load_state_dict(state, strict=True)  # the deployable model: original keys, no extras
    torch.testing.assert_close(fresh.eval()(x), dual.eval()(x), rtol=0, atol=0)


def test_routing_needs_dual_layers_and_advprop_needs_batchnorm() -> None:
    with pytest.raises(UsageError, match="dual-bn"), auxiliary_bn(nn.Linear(2, 2)):
        pass
    with pytest.raises(UsageError, match="branch"), use_bn(to_dual_bn_model(toy()), "both"):
        pass
    with pytest.raises(UsageError, match="BatchNorm"):
        train(TrainConfig(method="advprop", model="digits-cnn", n_examples=64, epochs=1, val_size=0, device="cpu"))
    with pytest.raises(UsageError, match="adv_fraction"):
        FastAdvProp(ThreatModel("linf", 0.1), adv_fraction=1.0)


# -- the strategies -------------------------------------------------------------------------------


class Counter:
    """Samples through forward and backward passes of a model, and which BatchNorm each forward used."""

    def __init__(self, model: nn.Module):
        self.forward = self.backward = 0
        self.branches: list[str] = []
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        first = dual_layers(model)[0]
        model.register_forward_hook(lambda _m, args, _o: self._fwd(len(args[0])))
        head.register_full_backward_hook(lambda _m, _gi, go: self._bwd(len(go[0])))
        first.register_forward_hook(lambda m, _a, _o: self.branches.append(m.branch))

    def _fwd(self, n: int) -> None:
        self.forward += n

    def _bwd(self, n: int) -> None:
        self.backward += n


def one_step(method: str, **options) -> tuple[Counter, torch.Tensor]:
    x, y = digits(64)
    model = resnet20().train()
    strategy = build_strategy(method, ThreatModel("linf", 0.1), **options)
    specs = strategy.prepare_model(model, x[:2])
    if method != "standard":
        assert specs == [{"name": "dual-bn"}]
    else:
        DualBN().apply(model)  # only so that the counter can watch a BatchNorm
    counter = Counter(model)
    out = strategy.step(model, x, y, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and out.logits.shape == (64, 10)
    return counter, out.loss


def test_fast_advprop_costs_fewer_passes_than_advprop() -> None:
    std, _ = one_step("standard")
    adv, _ = one_step("advprop")
    fast, _ = one_step("fast-advprop")
    assert (std.forward, std.backward) == (64, 64)
    # AdvProp: 5 PGD passes (forward + input backward) + clean + adversarial batches.
    assert (adv.forward, adv.backward) == (7 * 64, 7 * 64)
    assert adv.branches == ["aux"] * 5 + ["main", "aux"]
    # Fast AdvProp: 51 clean + 13 noisy (attack and training at once) + 13 adversarial.
    assert (fast.forward, fast.backward) == (51 + 13 + 13, 51 + 13 + 13)
    assert fast.branches == ["main", "aux", "aux"]
    assert fast.forward <= 1.25 * std.forward and fast.forward * 5 < adv.forward


def test_stated_cost_per_image_matches_the_counted_passes() -> None:
    threat = ThreatModel("linf", 4 / 255)
    for method in ("advprop", "fast-advprop"):
        counter, _ = one_step(method)
        stated = build_strategy(method, threat).passes_per_image()
        assert stated == pytest.approx(counter.forward / 64, rel=0.02), method  # 13 of 64 is 0.203, not 0.2


def test_same_budget_shortens_the_run_by_the_passes_per_image(tmp_path: Path) -> None:
    config = TrainConfig(method="fast-advprop", model="resnet20", normalize="none", dataset="digits", n_examples=64,
                         epochs=6, batch_size=64, val_size=0, eps=4 / 255, device="cpu", same_budget=True,
                         out=str(tmp_path / "run"))
    result = train(config)
    assert len(result.history) == 5  # round(6 / 1.2)
    saved = read_sidecar(result.weights)
    recipe = saved["recipe"]["config"] if saved else {}
    assert recipe["epochs"] == 5 and not recipe["same_budget"]
    with pytest.raises(UsageError, match="same-budget"):
        train(TrainConfig(method="pgd-at", dataset="digits", n_examples=64, epochs=1, same_budget=True,
                          device="cpu"))


def test_fast_advprop_gradient_equals_the_reference_recipe() -> None:
    """The loop's single backward of the returned loss gives the reference's weight update:
    (1 * sum CE_clean + 0.5 * sum CE_noisy + 0.5 * sum CE_adv) / 64 for shared weights, the clean
    mean for the main BNs' affine parameters, the weighted adversarial mean for the auxiliary ones."""
    x, y = digits(64)
    threat = ThreatModel("linf", 0.1)
    strategy = FastAdvProp(threat, random_start_prob=0.0)  # start from the clean images: no RNG to replay
    model = resnet20().train()
    strategy.prepare_model(model, x[:2])
    strategy.step(model, x, y, torch.Generator().manual_seed(0)).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    xc, yc, xa, ya = x[:51], y[:51], x[51:], y[51:]
    clean = F.cross_entropy(model(xc), yc, reduction="sum")
    with auxiliary_bn(model):
        xa = xa.clone().requires_grad_(True)
        noisy = F.cross_entropy(model(xa), ya, reduction="sum")
        (g,) = torch.autograd.grad(noisy, xa, retain_graph=True)
        x_adv = threat.clip(xa.detach() + 0.1 * g.sign(), x[51:])
        adv = F.cross_entropy(model(x_adv), ya, reduction="sum")
    ((clean + 0.5 * noisy + 0.5 * adv) / 64).backward()
    for name, p in model.named_parameters():
        want = p.grad * (64 / 51 if ".main." in name else 64 / 13 if ".aux." in name else 1.0)
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_advprop_without_grad_sync_and_reuse_weights() -> None:
    s = FastAdvProp(ThreatModel("linf", 1 / 255))
    assert s.steps == 1 and s.step_size == pytest.approx(1 / 255) and s.split(64) == 13 and s.split(1) == 0
    assert s.config()["loss_weights"] == [1.0, 0.5, 0.5]
    counter, loss = one_step("fast-advprop")
    assert math.isfinite(float(loss.detach()))
    s = FastAdvProp(ThreatModel("linf", 0.1), sync_bn_grads=False, loss_weights=(1.0, 0.0, 1.0), steps=2)
    x, y = digits(20)
    model = resnet20().train()
    s.prepare_model(model, x[:2])
    out = s.step(model, x, y, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert set(out.parts) == {"task", "clean", "noisy", "adv"} and math.isfinite(out.parts["noisy"])


# -- end to end -------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.mark.parametrize("method", ["advprop", "fast-advprop"])
def test_cli_trains_and_the_checkpoint_loads_back(method: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / method
    code, stdout, err = run_cli(capsys, "train", method, "--model", "resnet20", "--normalize", "none", "--dataset",
                                "digits", "--n-examples", "128", "--epochs", "1", "--batch-size", "64", "--val-size",
                                "32", "--eps", "4/255", "--device", "cpu", "--quiet", "--out", str(out))
    assert code == 0, err
    assert "PGD-10" in stdout
    weights = out / "model.safetensors"
    side = read_sidecar(weights)
    assert side is not None and side["architecture"] == [{"name": "dual-bn"}] and side["recipe"]["method"] == method
    loaded = load_trained_model(weights)  # replays dual-bn, loads both BNs
    assert len(dual_layers(loaded)) == 19
    x, _ = digits(16)
    plain = resnet20()
    plain.load_state_dict(plain_state_dict(loaded.net))
    torch.testing.assert_close(plain.eval()(x), loaded.net(x))
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(weights), "--dataset", "digits", "--n-examples",
                                "20", "--attack", "pgd", "--eps", "4/255", "--db", str(tmp_path / "b.db"))
    assert code == 0, err
    assert "dual-bn" in " ".join(stdout.split()) and "pgd" in stdout


def test_conversion_preserves_a_pretrained_model() -> None:
    from robustkit.models import load_model

    from conftest import cifar10_test, shared_file

    net = load_model("resnet20", shared_file("models/resnet20-12fca82f.th")).eval()
    x, _ = cifar10_test(32)
    with torch.no_grad():
        before = net(x)
        assert to_dual_bn(net) > 0
        torch.testing.assert_close(net.eval()(x), before, rtol=0, atol=0)
        with auxiliary_bn(net):
            torch.testing.assert_close(net(x), before, rtol=0, atol=0)


# -- fp16 autocast ----------------------------------------------------------------------------------


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    g = g.flatten(1).double()
    return g / g.abs().amax(1, keepdim=True)


def test_fp16_noisy_pass_gradients_are_loss_scaled() -> None:
    """Fast AdvProp's attack pass gives the input and the weight gradient in one backward; under
    fp16 autocast it bypassed the attacks' loss scaling, so confidently classified images got an
    all-zero input gradient (sign(0): they never move). Now both gradients follow fp32's."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            nn.Conv2d(1, 2, 3)(torch.rand(1, 1, 5, 5))
    except RuntimeError as e:  # torch < 2.4 has no CPU fp16 autocast
        pytest.skip(f"CPU fp16 autocast is not available here: {e}")
    model = to_dual_bn_model(toy())
    with torch.no_grad():  # every image class 0 by a margin near 30 (logit gradients ~1e-13), logits small
        model[7].bias.zero_()
        model[7].bias[0] = 30.0
    model.train()
    x, _ = digits(32)
    y = torch.zeros(32, dtype=torch.long)
    params = list(model.parameters())
    with auxiliary_bn(model):
        _, g32, w32 = noisy_pass_grads(model, x.clone().requires_grad_(True), y, params)
        with torch.autocast("cpu", dtype=torch.float16):
            xr = x.clone().requires_grad_(True)
            (raw,) = torch.autograd.grad(F.cross_entropy(model(xr).float(), y, reduction="sum"), xr)  # before
            _, g16, w16 = noisy_pass_grads(model, x.clone().requires_grad_(True), y, params)
    zero = lambda g: int((g.flatten(1).abs().amax(1) == 0).sum())  # noqa: E731
    assert zero(g32) == 0 and zero(raw) == len(x)  # the underflow of the unscaled pass
    assert zero(g16) == 0 and torch.isfinite(g16).all()
    assert F.cosine_similarity(_unit_rows(g16), _unit_rows(g32), dim=1).min() > 0.99
    ratio = g16.flatten(1).double().norm(dim=1) / g32.flatten(1).double().norm(dim=1)
    assert ((ratio > 0.9) & (ratio < 1.1)).all()  # unscaled back to fp32's size
    largest = max(float(b.abs().max()) for b in w32 if b is not None)
    compared = 0
    for a, b in zip(w16, w32, strict=True):
        assert (a is None) == (b is None)
        if b is not None and b.abs().max() > 1e-3 * largest:  # a bias before BatchNorm has none
            a, b = a.flatten().double() / largest, b.flatten().double() / largest
            assert F.cosine_similarity(a, b, dim=0) > 0.999 and 0.95 < float(a.norm() / b.norm()) < 1.05
            compared += 1
    assert compared >= 6
    # the attack itself: from the clean images, one step of eps moves every image (sign(0) did not)
    strategy = FastAdvProp(ThreatModel("linf", 0.1), random_start_prob=0.0)
    with torch.autocast("cpu", dtype=torch.float16):
        x_adv, _, _ = strategy._attack(model, x, y, torch.Generator().manual_seed(0), 1.0)
    assert ((x_adv - x).flatten(1).abs().amax(1) > 0.05).all()
