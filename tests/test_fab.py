"""FAB and FAB-T: the hyperplane projections and whole runs against pyautoattack's
``fab_projections`` / ``FABAttack_PT`` (FAB has no randomness without restarts, so the points
found agree to float precision), the number of target classes, early stopping and seeding;
slow: FAB-T robust accuracy against pyautoattack on 100+ images."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attack import AttackResult, Forward, attack_mode
from robustkit.attacks import FAB, FABT
from robustkit.attacks.fab import _saturation_level, _saturation_level_sorted, project_l1, project_l2, project_linf
from robustkit.errors import UsageError
from robustkit.models import load_model

from conftest import cifar10_test, shared_file

LINF = ThreatModel("linf", 8 / 255)
PROJECTIONS = {"linf": (project_linf, float("inf")), "l2": (project_l2, 2.0), "l1": (project_l1, 1.0)}


def linear_model(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def robust_model() -> nn.Module:
    return load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()


def hyperplanes(n: int, dim: int, offset: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, dim, generator=g)
    w = torch.randn(n, dim, generator=g) * (torch.rand(n, dim, generator=g) > 0.3)  # some zero weights
    b = (w * t).sum(1) + offset * torch.randn(n, generator=g) * w.abs().sum(1)
    return t, w, b


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_reaches_the_plane_inside_the_box(norm: str) -> None:
    project, p = PROJECTIONS[norm]
    t, w, b = hyperplanes(32, 40, offset=0.02)
    d = project(t, w, b)
    assert ((t + d) >= -1e-6).all() and ((t + d) <= 1 + 1e-6).all()  # up to rounding
    torch.testing.assert_close((w * (t + d)).sum(1), b, atol=1e-5, rtol=1e-5)
    # a point on the plane does not move; a plane out of the box's reach gives the closest corner
    torch.testing.assert_close(project(t, w, (w * t).sum(1)), torch.zeros_like(t), atol=1e-6, rtol=0)
    far = project(t, w, (w * t).sum(1) + 1e4)
    assert ((t + far) >= -1e-6).all() and ((t + far) <= 1 + 1e-6).all()
    torch.testing.assert_close((w * (t + far)).sum(1), w.clamp_min(0).sum(1), atol=1e-4, rtol=1e-5)


def test_projection_small_cases() -> None:
    t = torch.tensor([[0.5, 0.5]])
    w = torch.tensor([[1.0, 1.0]])
    b = torch.tensor([0.5])  # reach z1 + z2 = 0.5
    torch.testing.assert_close(project_linf(t, w, b), torch.tensor([[-0.25, -0.25]]))
    torch.testing.assert_close(project_l2(t, w, b), torch.tensor([[-0.25, -0.25]]))
    assert project_l1(t, w, b).abs().sum() == pytest.approx(0.5)  # all on one coordinate
    # the box caps the first coordinate, the rest is done by the second one
    t = torch.tensor([[0.1, 0.9]])
    torch.testing.assert_close(project_linf(t, w, torch.tensor([0.4])), torch.tensor([[-0.1, -0.5]]))
    torch.testing.assert_close(project_l2(t, w, torch.tensor([0.4])), torch.tensor([[-0.1, -0.5]]))


@pytest.mark.parametrize("max_steps", [32, 1])
def test_newton_saturation_level_equals_the_sorted_solution(max_steps: int) -> None:
    """The Newton solve gives the sort's root (also where the sum never reaches c: inf, and
    c = 0 with nothing free: 0); with one step most rows fall back to the sort."""
    g = torch.Generator().manual_seed(0)
    for dim in (1, 2, 7, 300, 3072):
        weights = torch.rand(24, dim, generator=g) * (torch.rand(24, dim, generator=g) > 0.3)
        caps = torch.rand(24, dim, generator=g) * (torch.rand(24, dim, generator=g) > 0.2)
        c = torch.rand(24, generator=g) * (weights * caps).sum(1) * 1.2
        c[:2] = 0
        newton = _saturation_level(weights, caps, c, max_steps=max_steps)
        exact = _saturation_level_sorted(weights, caps, c)
        assert torch.equal(newton.isinf(), exact.isinf())
        finite = exact.isfinite()
        torch.testing.assert_close(newton[finite], exact[finite], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projections_match_the_reference(norm: str) -> None:
    fab_projections = pytest.importorskip("pyautoattack.fab_projections")
    reference = getattr(fab_projections, f"projection_{norm}")
    project, p = PROJECTIONS[norm]
    for dim, offset in [(5, 0.1), (50, 0.01), (50, 1.0), (3072, 0.01), (3072, 1.0)]:
        t, w, b = hyperplanes(16, dim, offset, seed=dim)
        ours, ref = project(t, w, b), reference(t.clone(), w.clone(), b.clone())
        torch.testing.assert_close(ours.norm(p=p, dim=1), ref.norm(p=p, dim=1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_fab_t_uses_min_9_c_minus_1_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[torch.Tensor] = []
    original = FABT.run

    def spy(self, forward, x0, y, toward, target, start, owner=None):  # type: ignore[no-untyped-def]
        runs.append(toward)
        return original(self, forward, x0, y, toward, target, start, owner)

    monkeypatch.setattr(FABT, "run", spy)
    model = linear_model(5)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    tiny = ThreatModel("linf", 1e-5)  # nothing breaks, so every target class is tried
    result = FABT(tiny, steps=3)(model, x, y)
    assert not result.success.any()
    assert len(runs) == 4  # a 5-class model: min(9, 5 - 1) targets
    tried = torch.stack(runs, 1)
    assert (tried != y[:, None]).all() and all(len(set(row.tolist())) == 4 for row in tried)
    runs.clear()
    FABT(tiny, steps=3, n_target_classes=2)(model, x, y)
    assert len(runs) == 2
    with pytest.raises(UsageError, match="n_target_classes"):
        FABT(tiny, n_target_classes=9)(model, x, y)
    assert len(FABT(LINF).target_classes(torch.randn(3, 10))) == 9


def test_targets_are_the_next_most_likely_classes() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert [int(t) for t in FABT(LINF).target_classes(logits)] == [3, 2, 0, 4]


def _reference_fab(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, targeted: bool,
                   steps: int, n_target_classes: int = 9) -> torch.Tensor:
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    ref = fab_pt.FABAttack_PT(model, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm], n_restarts=1,
                              n_iter=steps, eps=eps, seed=0, targeted=targeted, device="cpu",
                              n_target_classes=n_target_classes)
    return ref.perturb(x, y)


@pytest.mark.parametrize("cls,norm,eps", [(FABT, "linf", 4 / 255), (FABT, "l2", 0.5), (FAB, "linf", 4 / 255)])
def test_runs_match_the_reference(robust_model: nn.Module, cls: type[FAB], norm: str, eps: float) -> None:
    x, y = cifar10_test(6)
    threat = ThreatModel(norm, eps)
    kwargs = {"n_target_classes": 2} if cls is FABT else {}
    full = cls(threat, steps=10, early_stop=False, **kwargs)(robust_model, x, y)
    ref_adv = _reference_fab(robust_model, x, y, norm, eps, cls is FABT, 10, n_target_classes=2)
    with torch.no_grad():
        ref_success = (robust_model(ref_adv).argmax(1) != y) & (threat.norm_of(ref_adv - x) <= eps)
    assert ref_success.any() and not ref_success.all()
    assert torch.equal(full.success, ref_success)
    # without early stop the run is the reference's: the smallest adversarial point found
    torch.testing.assert_close(full.x_adv, ref_adv, atol=1e-4, rtol=0)
    # early stop: the same samples broken, each at its first adversarial point within eps
    fast = cls(threat, steps=10, **kwargs)(robust_model, x, y)
    assert torch.equal(fast.success, full.success)
    assert threat.contains(fast.x_adv, x).all()


def test_restarts_are_seeded() -> None:
    model = linear_model(10)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel("l2", 0.05)
    attack = FAB(threat, steps=4, restarts=3, seed=2)
    starts = [attack.random_start(x, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
    # restarts begin at norm eps / 2 (less what the box cuts)
    assert (threat.norm_of(starts[0] - x) <= threat.eps / 2 + 1e-6).all()
    a, b = attack(model, x, y), FAB(threat, steps=4, restarts=3, seed=2)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_given_target_means_hitting_it(robust_model: nn.Module) -> None:
    x, y = cifar10_test(8)
    with torch.no_grad():
        second = robust_model(x).argsort(1, descending=True)[:, 1]
    result = FABT(ThreatModel("linf", 16 / 255), steps=10)(robust_model, x, y, target=second)
    assert result.success.any()
    with torch.no_grad():
        assert torch.equal(result.success, robust_model(result.x_adv).argmax(1) == second)


def test_refuses_bad_settings() -> None:
    with pytest.raises(UsageError, match="steps"):
        FAB(LINF, steps=0)
    with pytest.raises(UsageError, match="alpha_max"):
        FABT(LINF, eta=0.5)
    with pytest.raises(UsageError, match="n_target_classes"):
        FABT(LINF, n_target_classes=0)


@pytest.mark.slow
def test_fab_t_matches_pyautoattack() -> None:
    model = load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()
    x, y = cifar10_test(100)
    start = time.time()
    ours = FABT(LINF)(model, x, y)
    t_ours = time.time() - start
    start = time.time()
    ref_adv = _reference_fab(model, x, y, "linf", 8 / 255, True, 100)
    t_ref = time.time() - start
    with torch.no_grad():
        ref_success = (model(ref_adv).argmax(1) != y) & (LINF.norm_of(ref_adv - x) <= 8 / 255)
    ref_robust = 1 - float(ref_success.float().mean())
    print(f"\nFAB-T Linf 8/255, resnet4b, {len(x)} images: robust accuracy robustkit {ours.robust_accuracy:.2%} "
          f"({t_ours:.0f} s), pyautoattack {ref_robust:.2%} ({t_ref:.0f} s); "
          f"per-sample disagreements {int((ours.success != ref_success).sum())}")
    assert abs(ours.robust_accuracy - ref_robust) <= 0.01


@pytest.mark.parametrize("early_stop", [True, False])
def test_packed_target_classes_break_the_same_points(robust_model: nn.Module, early_stop: bool) -> None:
    """FAB-T has no randomness, so packing its target classes (one row per point and class)
    breaks exactly the points one class at a time breaks; float64, so that the batch size
    cannot flip a decision by rounding. Without early stop every row runs all its steps, so
    the points found are the same too."""
    model = robust_model.double()
    x, y = cifar10_test(16)
    x = x.double()
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    attack = FABT(LINF, steps=10, early_stop=early_stop)

    def run(budget: int) -> AttackResult:
        with attack_mode(model):
            return attack.perturb(Forward(model), x, y, None, torch.Generator().manual_seed(0), budget=budget)

    packed, one_at_a_time = run(9 * len(x)), run(1)
    robust_model.float()
    assert 0 < int(packed.success.sum()) < len(x)
    assert torch.equal(packed.success, one_at_a_time.success)
    if not early_stop:
        torch.testing.assert_close(packed.x_adv, one_at_a_time.x_adv)
