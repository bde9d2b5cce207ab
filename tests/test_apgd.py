"""APGD-CE / APGD-DLR / APGD-T against pyautoattack (the reference implementation) on real
checkpoints and CIFAR-10 images, plus the schedule, the L1 projection, early stopping,
determinism, the number of target classes and the class-count checks.

Fast tests use the small robust resnet4b (64 images, 20 iterations); the full oracle
comparisons (>= 200 images, 100 iterations) are marked slow.
"""

from __future__ import annotations

import time
from types import ModuleType

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attack import Forward, attack_mode
from robustkit.attacks import APGD, APGDDLR, APGDT
from robustkit.attacks.apgd import checkpoints, project_l1_box
from robustkit.errors import UsageError
from robustkit.models import load_model
from robustkit.registry import ATTACKS

from conftest import cifar10_test, pyautoattack_checkpoint, shared_file

LINF = ThreatModel("linf", 8 / 255)


def reference() -> ModuleType:
    """pyautoattack's APGD module (imported only by the tests that compare with it)."""
    return pytest.importorskip("pyautoattack.autopgd_base")


def resnet4b() -> nn.Module:
    return load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()


def resnet18() -> nn.Module:
    return load_model("resnet18", pyautoattack_checkpoint(), normalize=None).eval()


def linear_model(num_classes: int, scale: float = 1.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model.eval()


def robust_after_reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    eps: float,
    steps: int,
    norm: str = "Linf",
    seed: int = 0,
) -> torch.Tensor:
    """Per-sample robustness under pyautoattack's APGDAttack (ce/dlr) or APGDAttack_targeted."""
    if kind == "t":
        ref = reference().APGDAttack_targeted(
            model, n_iter=steps, norm=norm, eps=eps, seed=seed, n_restarts=1
        )
    else:
        ref = reference().APGDAttack(
            model, n_iter=steps, norm=norm, eps=eps, seed=seed, loss=kind, n_restarts=1
        )
    x_adv = ref.perturb(x, y)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


# -- the schedule and the projection -----------------------------------------------------------
def test_checkpoints_follow_the_paper() -> None:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [round(100 * v) for v in p[1:]] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20) == [4, 7, 9, *range(10, 21)]  # windows shrink by 1 down to 1 iteration


def test_l1_box_projection_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g)
    x[:, 0, :4] = 0.0  # some coordinates on the box's faces
    x[:, 1, :4] = 1.0
    for eps in (0.5, 12.0, 1e4):
        v = 2 * torch.randn(8, 3, 16, 16, generator=g)
        ours = x + project_l1_box(x, v, eps)
        ref = x + v + reference().L1_projection(x, v, eps)
        assert torch.allclose(ours, ref, atol=5e-4)  # the reference is float32-accurate to ~1e-4
        exact = x.double() + project_l1_box(x.double(), v.double(), eps)
        assert torch.allclose(ours.double(), exact, atol=1e-6)
        assert bool(ThreatModel("l1", eps).contains(ours, x).all())
    inside = 1e-3 * torch.randn(8, 3, 16, 16, generator=g)
    inside = (x + inside).clamp(0, 1) - x
    assert torch.allclose(project_l1_box(x, inside, 1e4), inside)


# -- agreement with pyautoattack (small, fast) --------------------------------------------------
@pytest.mark.parametrize("kind", ["ce", "t"])
def test_agrees_with_pyautoattack_small(kind: str) -> None:
    """resnet4b, 64 images, Linf 8/255, 20 iterations, different seeds for the two sides.
    Tolerance: robust accuracy within 2 images, per-sample agreement >= 60/64."""
    model = resnet4b()
    x, y = cifar10_test(64)
    eps = 8 / 255
    ref_robust = robust_after_reference(model, x, y, kind, eps, steps=20, seed=0)
    cls = APGDT if kind == "t" else APGD
    robust = ~cls(ThreatModel("linf", eps), steps=20, seed=1)(model, x, y).success
    print(
        f"apgd-{kind}: pyautoattack {int(ref_robust.sum())}/64 robust, "
        f"robustkit {int(robust.sum())}/64, agreement {int((robust == ref_robust).sum())}/64"
    )
    assert abs(int(robust.sum()) - int(ref_robust.sum())) <= 2
    assert int((robust == ref_robust).sum()) >= 60


# -- contract details ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,norm,eps,kwargs",
    [
        (APGD, "linf", 8 / 255, {}),
        (APGDT, "linf", 8 / 255, {}),
        (APGDDLR, "l2", 0.5, {}),
        (APGD, "l1", 12.0, {}),
        (APGD, "l1", 12.0, {"use_largereps": True}),
    ],
)
def test_early_stop_gives_the_same_outcome(
    cls: type[APGD], norm: str, eps: float, kwargs: dict
) -> None:
    # float64, so that the different batch compositions cannot flip a gradient sign by rounding
    model = resnet4b().double()
    x, y = cifar10_test(24)
    x = x.double()
    threat = ThreatModel(norm, eps)
    fast = cls(threat, steps=10, early_stop=True, **kwargs)(model, x, y)
    full = cls(threat, steps=10, early_stop=False, **kwargs)(model, x, y)
    assert 0 < int(fast.success.sum()) < len(x)  # both kinds of samples occur
    assert torch.equal(fast.success, full.success)
    assert torch.allclose(fast.x_adv, full.x_adv, atol=1e-6)
    assert torch.allclose(fast.loss, full.loss, equal_nan=True)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_same_seed_same_result(name: str) -> None:
    model = linear_model(10, scale=5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correctly classified
    threat = ThreatModel("linf", 1 / 255)
    a = ATTACKS.get(name)(threat, steps=10, seed=5)(model, x, y)
    b = ATTACKS.get(name)(threat, steps=10, seed=5)(model, x, y)
    c = ATTACKS.get(name)(threat, steps=10, seed=6)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.x_adv, c.x_adv)
    assert a.loss is not None and bool(torch.isfinite(a.loss).all())


def test_loss_is_the_best_loss() -> None:
    model = resnet4b()
    x, y = cifar10_test(16)
    res = APGD(ThreatModel("linf", 2 / 255), steps=10)(model, x, y)
    with torch.no_grad():
        logits = model(x)
        at_x_adv = nn.functional.cross_entropy(model(res.x_adv), y, reduction="none")
    clean_wrong = logits.argmax(1) != y
    assert bool(res.loss[clean_wrong].isnan().all())  # not attacked
    kept = ~clean_wrong & ~res.success  # the best point is returned for robust samples
    assert torch.allclose(res.loss[kept], at_x_adv[kept], atol=1e-4)
    assert bool((res.loss[~clean_wrong] >= at_x_adv[~clean_wrong] - 1e-4).all())


@pytest.mark.parametrize("num_classes,expected", [(5, 4), (10, 9), (12, 9)])
def test_apgd_t_uses_min_9_c_minus_1_targets(
    num_classes: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = linear_model(num_classes)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    seen: list[torch.Tensor] = []
    original = APGDT.attack_once

    def spy(self: APGDT, forward, xs, ys, loss_target, success_target, generator, owner=None):
        seen.append(loss_target.clone())
        return original(self, forward, xs, ys, loss_target, success_target, generator, owner)

    monkeypatch.setattr(APGDT, "attack_once", spy)
    APGDT(ThreatModel("linf", 1e-6), steps=4)(model, x, y)  # too small to break anything
    assert len(seen) == expected
    ranked = logits.argsort(1, descending=True)
    for rank, targets in enumerate(seen, start=1):
        assert torch.equal(targets, ranked[:, rank])
        assert bool((targets != y).all())
    with pytest.raises(UsageError, match=f"n_target_classes={num_classes}"):
        APGDT(ThreatModel("linf", 1e-6), steps=4, n_target_classes=num_classes)(model, x, y)


def test_dlr_needs_enough_classes() -> None:
    x = torch.rand(4, 3, 8, 8)
    two = linear_model(2)
    y = two(x).argmax(1).detach()
    with pytest.raises(UsageError, match="at least 3 classes.*has 2"):
        APGDDLR(ThreatModel("linf", 8 / 255))(two, x, y)
    with pytest.raises(UsageError, match="at least 4 classes.*has 2"):
        APGDT(ThreatModel("linf", 8 / 255))(two, x, y)
    three = linear_model(3)
    y3 = three(x).argmax(1).detach()
    with pytest.raises(UsageError, match="targeted DLR loss needs a model with at least 4 classes"):
        APGDT(ThreatModel("linf", 8 / 255))(three, x, y3)
    APGDDLR(ThreatModel("linf", 8 / 255), steps=2)(three, x, y3)  # 3 classes are enough for DLR
    APGD(ThreatModel("linf", 8 / 255), steps=2)(two, x, y)  # CE works with 2 classes


def test_explicit_target() -> None:
    model = linear_model(10, scale=5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    target = logits.argsort(1, descending=True)[:, 1]
    for cls in (APGD, APGDT):
        res = cls(ThreatModel("linf", 16 / 255), steps=20)(model, x, y, target=target)
        with torch.no_grad():
            assert torch.equal(res.success, model(res.x_adv).argmax(1) == target)
        assert int(res.success.sum()) > 0


def test_bad_hyper_parameters() -> None:
    with pytest.raises(UsageError, match="L1 schedule"):
        APGD(ThreatModel("linf", 8 / 255), use_largereps=True)
    with pytest.raises(UsageError, match="steps >= 1"):
        APGD(ThreatModel("linf", 8 / 255), steps=0)
    with pytest.raises(UsageError, match="rho"):
        APGD(ThreatModel("linf", 8 / 255), rho=1.5)
    with pytest.raises(UsageError, match="Unknown loss"):
        APGD(ThreatModel("linf", 8 / 255), loss="hinge")


# -- the full oracle comparisons (slow) ---------------------------------------------------------
def _oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, label: str) -> None:
    """APGD-CE and APGD-T, 100 iterations, 1 restart: robust accuracy within 0.5 pp of
    pyautoattack and >= 98% per-sample agreement. pyautoattack runs with seed 0, robustkit
    with seed 1: the agreement must not come from identical random starts."""
    n = len(x)
    for kind, cls in (("ce", APGD), ("t", APGDT)):
        t0 = time.time()
        ref = robust_after_reference(model, x, y, kind, eps, steps=100, seed=0)
        t1 = time.time()
        ours = ~cls(ThreatModel("linf", eps), seed=1)(model, x, y).success
        t2 = time.time()
        ra_ref, ra_ours = 100 * ref.float().mean().item(), 100 * ours.float().mean().item()
        agree = 100 * (ref == ours).float().mean().item()
        line = (
            f"{label} apgd-{kind} Linf {eps * 255:.0f}/255, {n} images: pyautoattack {ra_ref:.1f}% "
            f"({t1 - t0:.0f} s), robustkit {ra_ours:.1f}% ({t2 - t1:.0f} s), agreement {agree:.1f}%"
        )
        print(line)
        assert abs(ra_ref - ra_ours) <= 0.5 + 1e-9
        assert agree >= 98.0


@pytest.mark.slow
def test_oracle_resnet18_pyautoattack_checkpoint() -> None:
    x, y = cifar10_test(200)
    _oracle(resnet18(), x, y, 8 / 255, "resnet18 (model_test.pt)")


@pytest.mark.slow
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_oracle_resnet4b(eps: float) -> None:
    x, y = cifar10_test(200)
    _oracle(resnet4b(), x, y, eps, "resnet4b")


def test_target_classes_are_packed_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room in the budget, APGD-T attacks several target classes at once (one row per
    point and class, each point with each of its classes once) and breaks about the same
    points as one class at a time (the random starts differ)."""
    model = resnet4b()
    x, y = cifar10_test(32)
    with torch.no_grad():
        logits = model(x)
    keep = logits.argmax(1) == y
    x, y, logits = x[keep], y[keep], logits[keep]
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    original = APGDT.attack_once

    def spy(self, forward, xs, ys, loss_target, success_target, generator, owner=None):  # type: ignore[no-untyped-def]
        calls.append((loss_target.clone(), owner))
        return original(self, forward, xs, ys, loss_target, success_target, generator, owner)

    monkeypatch.setattr(APGDT, "attack_once", spy)
    attack = APGDT(LINF, steps=10, seed=0)

    def run(budget: int) -> torch.Tensor:
        with attack_mode(model):
            return attack.perturb(Forward(model), x, y, None, torch.Generator().manual_seed(0), budget=budget).success

    packed = run(9 * len(x))
    assert len(calls) == 1  # all nine classes in one batch of 9 rows per point
    towards, owner = calls[0]
    assert owner is not None and torch.equal(owner, torch.arange(len(x)).repeat(9))
    ranked = logits.argsort(1, descending=True)
    assert torch.equal(towards.view(9, -1), ranked[:, 1:10].T)
    calls.clear()
    one_at_a_time = run(1)
    assert len(calls) >= 2 and all(owner is None for _, owner in calls)
    agree = int((packed == one_at_a_time).sum())
    print(f"broken: packed {int(packed.sum())}, one class at a time {int(one_at_a_time.sum())}; agree {agree}/{len(x)}")
    assert 0 < int(packed.sum()) < len(x) and agree >= len(x) - 2
