"""The Attack contract (DESIGN.md), checked for every registered attack and supported norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustkit.attacks  # noqa: F401
from robustkit import ThreatModel
from robustkit.errors import DataError, UsageError
from robustkit.registry import ATTACKS

EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 8.0, "l0": 10.0}
# Small budgets keep the contract check fast; the contract does not depend on the budget.
FAST = {"square": {"n_queries": 100}, "fab": {"steps": 20}, "fab-t": {"steps": 20, "n_target_classes": 2},
        "autoattack": {"attacks": "apgd-ce,fab-t,square",
                       "stage_options": {"apgd-ce": {"steps": 10}, "fab-t": {"steps": 10, "n_target_classes": 2},
                                         "square": {"n_queries": 50}}},
        "pyautoattack": {"attacks": "apgd-ce"},
        "ddn": {"steps": 10}, "alma": {"steps": 20}, "cw": {"binary_search_steps": 2, "steps": 10}}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def cases() -> list[tuple[str, str]]:
    return [(name, norm) for name, cls in ATTACKS.items() for norm in cls.supported_norms]


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("name,norm", cases())
def test_contract(name: str, norm: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = small_model().train()
    for p in model.parameters():
        p.grad = None
    flags = [p.requires_grad for p in model.parameters()]
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])
    attack = ATTACKS.get(name)(threat, seed=3, **FAST.get(name, {}))

    result = attack(model, x, y)

    assert torch.equal(x, x_before), "the attack modified its input"
    assert model.training, "the model's train mode was not restored"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), "gradients leaked into parameters"
    assert result.x_adv.shape == x.shape and result.success.shape == (len(x),)
    assert bool(threat.contains(result.x_adv, x).all()), "x_adv left the threat set"
    model.eval()
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    again = ATTACKS.get(name)(threat, seed=3, **FAST.get(name, {}))(model, x, y)
    assert torch.equal(again.x_adv, result.x_adv), "same seed gave a different result"


@pytest.mark.parametrize("name", ATTACKS.names())
def test_bad_inputs_are_refused(name: str) -> None:
    cls = ATTACKS.get(name)
    attack = cls(ThreatModel(cls.supported_norms[0], EPS[cls.supported_norms[0]]))
    model = small_model()
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        attack(model, torch.full((2, 3, 8, 8), 2.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="NaN"):
        attack(model, torch.full((2, 3, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="Labels must have shape"):
        attack(model, torch.rand(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))


def test_threat_model_validation() -> None:
    with pytest.raises(UsageError, match="positive"):
        ThreatModel("linf", 0)
    with pytest.raises(UsageError, match="at most 1"):
        ThreatModel("linf", 8)
    with pytest.raises(UsageError, match="Unknown norm"):
        ThreatModel("l3", 0.1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_lands_in_ball(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    threat = ThreatModel(norm, EPS[norm] / 4)
    x = torch.rand(8, 3, 8, 8, generator=g)
    far = x + torch.randn(8, 3, 8, 8, generator=g)
    clipped = threat.clip(far, x)
    assert bool(threat.contains(clipped, x).all())
    # points inside the set are left alone
    inside = threat.random_init(x, g)
    assert torch.allclose(threat.clip(inside, x), inside, atol=1e-6)


def test_l1_projection_is_euclidean_nearest() -> None:
    threat = ThreatModel("l1", 1.0)
    v = torch.tensor([[3.0, -1.0, 0.5, 0.0]])
    p = threat.project(v)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    v = torch.tensor([[0.8, -0.6, 0.1, 0.0]])  # soft threshold theta = 0.2
    assert torch.allclose(threat.project(v), torch.tensor([[0.6, -0.4, 0.0, 0.0]]), atol=1e-6)
