"""PMA / PMA+ (arXiv 2411.15210): the authors' schedule, the contract details, and (slow) PMA
against APGD-CE on the adversarially trained resnet4b."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attacks import APGD, PMA, PMAPlus
from robustkit.errors import UsageError
from robustkit.models import load_model

from conftest import cifar10_test, shared_file


def resnet4b() -> nn.Module:
    return load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()


def test_step_schedule_is_the_authors() -> None:
    eps = 8 / 255
    pma = PMA(ThreatModel("linf", eps), steps=100)
    # cosine from 2·eps, restarting after the change point steps / 2 = 50
    assert pma.step_size(1) == pytest.approx(2 * eps)
    assert pma.step_size(0) == pytest.approx(eps * (1 + math.cos(math.pi / 50)))
    assert pma.step_size(26) == pytest.approx(eps)
    assert pma.step_size(50) == pytest.approx(eps * (1 + math.cos(49 * math.pi / 50)))
    assert pma.step_size(51) == pytest.approx(2 * eps)
    assert pma.step_size(99) == pytest.approx(eps * (1 + math.cos(48 * math.pi / 50)))


def test_stage_losses() -> None:
    pma = PMA(ThreatModel("linf", 8 / 255), steps=10)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 1])
    p = logits.softmax(1)
    p_y = p[[0, 1], [0, 1]]
    p_other = torch.stack([p[0, 1], p[1, 2]])
    assert torch.allclose(pma.stage_loss(logits, y, 0, 0), p_y)
    assert torch.allclose(pma.stage_loss(logits, y, 3, 0), -p_y)
    assert torch.allclose(pma.stage_loss(logits, y, 3, 1), p_other)
    for stage in (0, 1):
        assert torch.allclose(pma.stage_loss(logits, y, 5, stage), p_other - p_y)


@pytest.mark.parametrize("cls", [PMA, PMAPlus])
def test_early_stop_and_seed(cls: type) -> None:
    model = resnet4b().double()  # float64: batch composition cannot flip a sign by rounding
    x, y = cifar10_test(24)
    x = x.double()
    threat = ThreatModel("linf", 8 / 255)
    kwargs = {"apgdt_steps": 5} if cls is PMAPlus else {}
    fast = cls(threat, steps=10, early_stop=True, **kwargs)(model, x, y)
    full = cls(threat, steps=10, early_stop=False, **kwargs)(model, x, y)
    again = cls(threat, steps=10, early_stop=True, **kwargs)(model, x, y)
    assert 0 < int(fast.success.sum()) < len(x)
    assert torch.equal(fast.success, full.success)
    assert torch.allclose(fast.x_adv, full.x_adv, atol=1e-6)
    assert torch.equal(fast.x_adv, again.x_adv)


def test_pma_plus_adds_apgd_t_to_pma() -> None:
    model = resnet4b()
    x, y = cifar10_test(32)
    threat = ThreatModel("linf", 4 / 255)
    pma = PMA(threat, steps=10)(model, x, y)
    plus = PMAPlus(threat, steps=10, apgdt_steps=10)(model, x, y)
    assert bool((plus.success >= pma.success).all())  # PMA+ starts with the same PMA run
    assert plus.robust_accuracy <= pma.robust_accuracy


def test_untargeted_only() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(2, 3, 8, 8)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(UsageError, match="untargeted"):
        PMA(ThreatModel("linf", 8 / 255))(model, x, y, target=torch.ones(2, dtype=torch.long))
    with pytest.raises(UsageError, match="steps >= 2"):
        PMA(ThreatModel("linf", 8 / 255), steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_pma_at_least_as_strong_as_apgd_ce(eps: float) -> None:
    """The paper's claim on an adversarially trained model: PMA <= APGD-CE (within 0.5 pp)."""
    model = resnet4b()
    x, y = cifar10_test(200)
    threat = ThreatModel("linf", eps)
    t0 = time.time()
    apgd = APGD(threat)(model, x, y).robust_accuracy * 100
    t1 = time.time()
    pma = PMA(threat)(model, x, y).robust_accuracy * 100
    t2 = time.time()
    plus = PMAPlus(threat)(model, x, y).robust_accuracy * 100
    t3 = time.time()
    print(
        f"resnet4b Linf {eps * 255:.0f}/255, 200 images: APGD-CE {apgd:.1f}% ({t1 - t0:.0f} s), "
        f"PMA {pma:.1f}% ({t2 - t1:.0f} s), PMA+ {plus:.1f}% ({t3 - t2:.0f} s)"
    )
    assert pma <= apgd + 0.5
    assert plus <= pma
