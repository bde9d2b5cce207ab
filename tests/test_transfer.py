"""Transfer attacks (attacks/transfer.py): presets and defaults, the DI / TI / momentum pieces,
freeze semantics, seeding, and the surrogate helper ``transfer_attack``. Small models and
random data only: the comparisons with torchattacks on real checkpoints live in
test_oracle_torchattacks.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attacks import (
    DIFGSM,
    MDTIFGSM,
    MIFGSM,
    PGD,
    TIFGSM,
    TransferFGSM,
    transfer_attack,
)
from robustkit.attacks.transfer import smoothing_kernel
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS

LINF = ThreatModel("linf", 8 / 255)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()
    with torch.no_grad():
        model[-1].bias.zero_()  # no dominant class: predictions vary with the input
    return model


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = tiny_cnn()(x).argmax(1)  # labels the model gets right, so every point is attacked
    return x, y


# -- registry, presets, defaults ----------------------------------------------------------
def test_registered_names_and_presets() -> None:
    assert ATTACKS.get("mi-fgsm") is MIFGSM and ATTACKS.get("mifgsm") is MIFGSM
    assert ATTACKS.get("di-fgsm") is DIFGSM and ATTACKS.get("ti-fgsm") is TIFGSM
    assert ATTACKS.get("mdti-fgsm") is MDTIFGSM
    mi, di, ti, mdti = MIFGSM(LINF), DIFGSM(LINF), TIFGSM(LINF), MDTIFGSM(LINF)
    assert (mi.decay, mi.diversity_prob, mi.ti_kernel) == (1.0, 0.0, None)
    assert (di.decay, di.diversity_prob, di.ti_kernel) == (0.0, 0.5, None)
    assert (ti.decay, ti.diversity_prob, ti.ti_kernel) == (0.0, 0.0, "gaussian")
    assert (mdti.decay, mdti.diversity_prob, mdti.ti_kernel) == (1.0, 0.5, "gaussian")
    for attack in (mi, di, ti, mdti):
        assert isinstance(attack, PGD)
        assert attack.steps == 10 and not attack.random_start and attack.grad_norm
        assert attack.step_size == pytest.approx(2 / 255)  # 2.5·eps/steps at eps 8/255
        assert attack.resize_rate == 0.9 and attack.len_kernel == 15 and attack.nsig == 3
        cfg = attack.config()
        assert cfg["decay"] == attack.decay and cfg["ti_kernel"] == attack.ti_kernel
    # every switch is reachable from every preset
    assert MIFGSM(LINF, diversity_prob=0.5).diversity_prob == 0.5
    assert DIFGSM(LINF, decay=1.0).decay == 1.0


def test_defaults_match_torchattacks() -> None:
    torchattacks = pytest.importorskip("torchattacks")

    def defaults(cls: type) -> dict:
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    ta_mi, ta_di, ta_ti = (defaults(c) for c in (torchattacks.MIFGSM, torchattacks.DIFGSM,
                                                   torchattacks.TIFGSM))
    threat = ThreatModel("linf", ta_mi["eps"])
    assert MIFGSM(threat).decay == ta_mi["decay"] == 1.0
    assert MIFGSM(threat).step_size == pytest.approx(ta_mi["alpha"])
    assert MIFGSM(threat).steps == ta_mi["steps"]
    di = DIFGSM(threat)
    assert di.decay == ta_di["decay"] == 0.0  # torchattacks' DIFGSM has no momentum by default
    assert (di.diversity_prob, di.resize_rate) == (ta_di["diversity_prob"], ta_di["resize_rate"])
    assert di.random_start == ta_di["random_start"] and di.step_size == pytest.approx(ta_di["alpha"])
    ti = TIFGSM(threat)
    assert ti.decay == ta_ti["decay"] and ti.ti_kernel == ta_ti["kernel_name"]
    assert (ti.len_kernel, ti.nsig) == (ta_ti["len_kernel"], ta_ti["nsig"])
    # torchattacks' TIFGSM also applies input diversity; robustkit's full combination does
    assert MDTIFGSM(threat).diversity_prob == ta_ti["diversity_prob"]


def test_only_linf_and_bad_settings_are_refused() -> None:
    for cls in (MIFGSM, DIFGSM, TIFGSM, MDTIFGSM):
        with pytest.raises(UsageError, match="linf"):
            cls(ThreatModel("l2", 0.5))
    with pytest.raises(UsageError, match="decay"):
        MIFGSM(LINF, decay=-1)
    with pytest.raises(UsageError, match="diversity_prob"):
        DIFGSM(LINF, diversity_prob=1.5)
    with pytest.raises(UsageError, match="resize_rate"):
        DIFGSM(LINF, resize_rate=1.0)
    with pytest.raises(UsageError, match="Unknown TI kernel"):
        TIFGSM(LINF, ti_kernel="box")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 10))
    x = torch.rand(2, 3, 1, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(UsageError, match="resize range"):  # 1×1 images cannot be shrunk
        DIFGSM(LINF)(model, x, y)


# -- the pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gaussian", "linear", "uniform"])
def test_smoothing_kernel_matches_torchattacks(name: str) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    pytest.importorskip("scipy")
    ta = torchattacks.TIFGSM(tiny_cnn(), kernel_name=name)
    ours = smoothing_kernel(name, 15, 3)
    assert ours.shape == (15, 15) and ours.sum().item() == pytest.approx(1.0, abs=1e-6)
    for channel in range(3):
        torch.testing.assert_close(ours, ta.stacked_kernel[channel, 0], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("resize_rate", [0.9, 1.1])
def test_input_diversity_draws_like_torchattacks(resize_rate: float) -> None:
    """Same seed, same transform: the four random numbers are drawn in torchattacks' order."""
    torchattacks = pytest.importorskip("torchattacks")
    ta = torchattacks.DIFGSM(tiny_cnn(), resize_rate=resize_rate, diversity_prob=0.5)
    ours = DIFGSM(LINF, resize_rate=resize_rate, diversity_prob=0.5)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    applied = []
    for seed in range(12):
        torch.manual_seed(seed)
        expected = ta.input_diversity(x)
        got, was_applied = ours.diversify(x, torch.Generator().manual_seed(seed))
        applied.append(was_applied)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        side = max(32, int(32 * resize_rate))
        assert got.shape[-2:] == ((side, side) if was_applied else (32, 32))
    assert any(applied) and not all(applied)  # p = 0.5 over 12 draws


def test_input_diversity_probability_extremes() -> None:
    x = torch.rand(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    never = DIFGSM(LINF, diversity_prob=0.0)
    always = DIFGSM(LINF, diversity_prob=1.0)
    for _ in range(5):
        out, applied = never.diversify(x, g)
        assert not applied and out is x
        out, applied = always.diversify(x, g)
        assert applied and out.shape == x.shape and not torch.equal(out, x)


def test_translation_invariance_smooths_the_gradient() -> None:
    ti = TIFGSM(LINF)
    grad = torch.zeros(1, 3, 32, 32)
    grad[0, :, 16, 16] = 1.0
    out = ti.smooth(grad)
    torch.testing.assert_close(out[0, 0, 9:24, 9:24], smoothing_kernel("gaussian", 15, 3))
    assert out[0, 0].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_momentum_accumulates_normalized_gradients() -> None:
    mi = MIFGSM(LINF)
    state: dict[str, torch.Tensor] = {}
    rows = torch.arange(3)
    g1 = torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1, 1)
    g2 = torch.tensor([-2.0, 1.0, -2.0]).view(3, 1, 1, 1)
    assert torch.equal(mi.direction(g1, state, rows), g1.sign())
    # m = 1.0·g1 + g2 = (-1, -1, 1); only rows 0 and 2 are still running
    d = mi.direction(g2[[0, 2]], state, torch.tensor([0, 2]))
    assert d.flatten().tolist() == [-1.0, 1.0]
    assert state["momentum"].flatten().tolist() == [-1.0, -2.0, 1.0]
    no_momentum = DIFGSM(LINF)
    assert torch.equal(no_momentum.direction(g2, {}, rows), g2.sign())


# -- the attacks end to end -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MIFGSM, DIFGSM, TIFGSM, MDTIFGSM])
def test_attacks_break_points_and_stay_in_the_ball(cls: type, batch: tuple) -> None:
    x, y = batch
    model = tiny_cnn()
    result = cls(LINF, seed=0)(model, x, y)
    assert bool(LINF.contains(result.x_adv, x).all())
    assert result.success.any() and not torch.equal(result.x_adv, x)
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)


@pytest.mark.parametrize("cls", [MIFGSM, DIFGSM, TIFGSM, MDTIFGSM])
def test_early_stop_only_saves_compute(cls: type, batch: tuple) -> None:
    x, y = batch
    x, model = x.double(), tiny_cnn().double()  # float64: batch composition cannot flip a sign by rounding
    threat = ThreatModel("linf", 2 / 255)  # points break at different steps
    a = cls(threat, seed=4, early_stop=True)(model, x, y)
    b = cls(threat, seed=4, early_stop=False)(model, x, y)
    assert torch.equal(a.success, b.success)
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-6, rtol=0)


def test_seeded_diversity_is_reproducible(batch: tuple) -> None:
    x, y = batch
    model = tiny_cnn()
    threat = ThreatModel("linf", 2 / 255)
    one = MDTIFGSM(threat, seed=1)(model, x, y).x_adv
    assert torch.equal(one, MDTIFGSM(threat, seed=1)(model, x, y).x_adv)
    assert not torch.equal(one, MDTIFGSM(threat, seed=2)(model, x, y).x_adv)


def test_freeze_at_first_adversarial_iterate(batch: tuple) -> None:
    """A point broken after s steps is returned as the s-step iterate, not the 10-step one."""
    x, y = batch
    x, model = x.double(), tiny_cnn().double()  # float64: batch composition cannot flip a sign by rounding
    threat = ThreatModel("linf", 2 / 255)
    full = MIFGSM(threat, step_size=0.5 / 255)(model, x, y)
    broken_before = torch.zeros(len(x), dtype=torch.bool)
    first_steps = set()
    for steps in range(1, 10):
        short = MIFGSM(threat, steps=steps, step_size=0.5 / 255)(model, x, y)
        # points first broken at exactly `steps` steps keep that iterate in the 10-step run
        newly = short.success & ~broken_before
        torch.testing.assert_close(full.x_adv[newly], short.x_adv[newly], atol=1e-6, rtol=0)
        assert bool(full.success[newly].all())
        if newly.any():
            first_steps.add(steps)
        broken_before |= short.success
    assert len(first_steps) >= 2 and (~full.success).any()


def test_targeted_mode(batch: tuple) -> None:
    x, y = batch
    model = tiny_cnn()
    target = (y + 1) % 10
    result = MIFGSM(ThreatModel("linf", 16 / 255), steps=20)(model, x, y, target=target)
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) == target)
    assert result.success.any()


# -- surrogate helper ---------------------------------------------------------------------------
def test_transfer_attack_scores_on_the_target(batch: tuple) -> None:
    x, y = batch
    surrogate, target_model = tiny_cnn(0), tiny_cnn(1).train()
    x_before = x.clone()
    attack = MIFGSM(LINF)
    result = transfer_attack(attack, surrogate, target_model, x, y)
    assert torch.equal(x, x_before)
    assert target_model.training, "the target model's train mode was not restored"
    assert all(p.grad is None for p in target_model.parameters())
    assert "is_success" not in vars(attack), "transfer_attack changed the caller's attack"
    assert bool(LINF.contains(result.x_adv, x).all())
    target_model.eval()
    with torch.no_grad():
        assert torch.equal(result.success, target_model(result.x_adv).argmax(1) != y)
    assert result.queries is not None and result.queries.shape == (len(x),)
    # full budget on every point: 10 steps of 2/255 reach the eps-sphere (or the box)
    dist = (result.x_adv - x).abs().flatten(1).amax(1)
    assert bool((dist > 7.5 / 255).all())
    # white-box semantics on request: exactly the attack run on the surrogate
    frozen = transfer_attack(attack, surrogate, target_model, x, y, stop_at_surrogate_success=True)
    assert torch.equal(frozen.x_adv, attack(surrogate, x, y).x_adv)
    white = transfer_attack(attack, surrogate, surrogate, x, y, stop_at_surrogate_success=True)
    assert torch.equal(white.success, attack(surrogate, x, y).success)


def test_transfer_attack_crafts_on_points_the_surrogate_already_misclassifies(batch: tuple) -> None:
    x, y = batch
    surrogate, target_model = tiny_cnn(0), tiny_cnn(1)
    wrong = (y + 1) % 10  # labels the surrogate gets wrong: white-box would leave x unchanged
    assert torch.equal(MIFGSM(LINF)(surrogate, x, wrong).x_adv, x)
    result = transfer_attack(MIFGSM(LINF), surrogate, target_model, x, wrong)
    assert bool(((result.x_adv - x).abs().flatten(1).amax(1) > 7.5 / 255).all())


def test_transfer_attack_targeted(batch: tuple) -> None:
    x, y = batch
    surrogate, target_model = tiny_cnn(0), tiny_cnn(1)
    target = (y + 1) % 10
    result = transfer_attack(TransferFGSM(LINF, steps=5), surrogate, target_model, x, y, target=target)
    with torch.no_grad():
        assert torch.equal(result.success, target_model(result.x_adv).argmax(1) == target)
