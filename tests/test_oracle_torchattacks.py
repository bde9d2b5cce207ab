"""Oracle: robustkit's FGSM, PGD (Linf, L2) and transfer attacks against torchattacks 3.5.1 on
real checkpoints (../shared/data/models) and real CIFAR-10 test images.

Semantics differ in one documented way: robustkit freezes a point at its first adversarial
iterate, torchattacks returns the last one. The exact comparisons therefore record every
torchattacks iterate (one run with K steps visits the iterates of the runs with 1..K steps)
and compare robustkit's point with torchattacks' iterate at the step where that point first
became adversarial (the last one if it never did).

Notes on exactness:
- torchattacks averages the loss over the batch, robustkit sums it; for L2 PGD the gradient
  norm gets ``eps_for_division`` added, so torchattacks is run with ``1e-10 / N`` (robustkit adds
  1e-10 to the norm of the summed gradient) and with a power-of-two batch N, which makes the
  two gradients differ by the exact factor N. Sign-based updates do not depend on the scale.
- DI draws its random numbers from the attack's generator in torchattacks' order, so
  ``seed=s`` in robustkit and ``torch.manual_seed(s)`` before torchattacks give the same
  transforms and the same points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attacks import DIFGSM, FGSM, MDTIFGSM, MIFGSM, PGD, TIFGSM, transfer_attack
from robustkit.models import load_model

from conftest import cifar10_test, shared_file

torchattacks = pytest.importorskip("torchattacks")

CHECKPOINTS = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet4b": "abcrown_resnet4b.pth",
}


@cache
def real_model(name: str) -> nn.Module:
    return load_model(name, str(shared_file(f"models/{CHECKPOINTS[name]}"))).eval()


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def iterates(attack: object, hook: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """All iterates x_0 .. x_K of a torchattacks run: what ``hook`` (the method each step calls
    on the current iterate: ``get_logits``, or ``input_diversity`` for DI/TI) sees, then the
    returned point."""
    seen: list[torch.Tensor] = []
    original = getattr(attack, hook)

    def record(inputs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(inputs.detach().clone())
        return original(inputs, *args, **kwargs)

    setattr(attack, hook, record)
    try:
        final = attack(x, y)
    finally:
        setattr(attack, hook, original)
    return seen + [final.detach()]


def frozen_reference(model: nn.Module, traj: list[torch.Tensor], y: torch.Tensor,
                     target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, the iterate at its first adversarial step s_i (1..K; K if never) and s_i."""
    with torch.no_grad():
        hits = torch.stack([(model(t).argmax(1) == target) if target is not None else
                            (model(t).argmax(1) != y) for t in traj[1:]])
    steps = len(traj) - 1
    first = torch.where(hits.any(0), hits.float().argmax(0) + 1, torch.full_like(y, steps))
    return torch.stack([traj[s][i] for i, s in enumerate(first.tolist())]), first


def assert_same_points(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> None:
    diff = (ours - reference).abs().flatten(1).amax(1)[mask]
    bad = int((diff > 1e-5).sum())
    assert bad == 0, f"{bad}/{int(mask.sum())} points differ (max |diff| {float(diff.max()):.3g})"


# -- FGSM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "resnet4b"])
def test_fgsm_matches_torchattacks(name: str) -> None:
    model = real_model(name)
    x, y = cifar10_test(64)
    ok = clean_correct(model, x, y)
    eps = 8 / 255
    ours = FGSM(ThreatModel("linf", eps))(model, x, y)
    theirs = torchattacks.FGSM(model, eps=eps)(x, y)
    assert_same_points(ours.x_adv, theirs, ok)
    assert torch.equal(ours.x_adv[~ok], x[~ok])  # already-misclassified points are left alone
    with torch.no_grad():
        ta_robust = (model(theirs).argmax(1) == y).float().mean().item()
    print(f"\nFGSM {name} eps 8/255, 64 images: robust acc robustkit {ours.robust_accuracy:.3f} "
          f"torchattacks {ta_robust:.3f}")
    assert ours.robust_accuracy == pytest.approx(ta_robust)


# -- PGD without random start: freeze semantics, exact ------------------------------------------
def _pgd_case(name: str, norm: str, eps: float, n: int, steps: int) -> None:
    model = real_model(name)
    x, y = cifar10_test(n)
    ok = clean_correct(model, x, y)
    step = 2.5 * eps / steps
    start = time.perf_counter()
    ours = PGD(ThreatModel(norm, eps), steps=steps, step_size=step, random_start=False)(model, x, y)
    t_ours = time.perf_counter() - start
    if norm == "linf":
        theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=False)
    else:
        theirs = torchattacks.PGDL2(model, eps=eps, alpha=step, steps=steps, random_start=False,
                                    eps_for_division=1e-10 / n)
    start = time.perf_counter()
    traj = iterates(theirs, "get_logits", x, y)
    t_theirs = time.perf_counter() - start
    assert len(traj) == steps + 1
    reference, first = frozen_reference(model, traj, y)
    assert_same_points(ours.x_adv, reference, ok)
    with torch.no_grad():
        ta_final = (model(traj[-1]).argmax(1) == y).float().mean().item()
    hist = torch.bincount(first[ok], minlength=steps + 1)[1:].tolist()
    print(f"\nPGD {name} {norm} eps {eps:.4g} steps {steps} step {step:.4g}, {n} images "
          f"({int(ok.sum())} attacked): robust acc robustkit {ours.robust_accuracy:.3f}, torchattacks "
          f"final iterate {ta_final:.3f}; first adversarial step histogram {hist}; "
          f"{t_ours:.1f}s vs {t_theirs:.1f}s")
    # the comparison is only meaningful when points break at different steps
    assert sum(1 for h in hist[:-1] if h) >= 2
    assert ours.robust_accuracy <= ta_final + 1e-9  # freezing can only keep more points broken


PGD_CASES = [
    ("resnet20", "linf", 2 / 255, 32, 5),
    ("resnet20", "l2", 0.25, 32, 5),
    ("resnet4b", "linf", 8 / 255, 128, 5),
    ("resnet4b", "l2", 0.5, 128, 5),
    pytest.param("resnet20", "linf", 2 / 255, 256, 10, marks=pytest.mark.slow),
    pytest.param("resnet20", "l2", 0.25, 256, 10, marks=pytest.mark.slow),
    pytest.param("resnet4b", "linf", 8 / 255, 256, 10, marks=pytest.mark.slow),
    pytest.param("resnet4b", "l2", 0.5, 256, 10, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,norm,eps,n,steps", PGD_CASES)
def test_pgd_matches_torchattacks_at_first_adversarial_step(name: str, norm: str, eps: float, n: int,
                                                            steps: int) -> None:
    _pgd_case(name, norm, eps, n, steps)


def test_recorded_iterates_are_shorter_runs() -> None:
    """The harness: the iterate recorded at step s equals torchattacks run with steps=s."""
    model = real_model("resnet4b")
    x, y = cifar10_test(16)
    traj = iterates(torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=4, random_start=False),
                    "get_logits", x, y)
    torch.manual_seed(0)
    di_traj = iterates(torchattacks.DIFGSM(model, eps=8 / 255, alpha=2 / 255, steps=3), "input_diversity",
                       x, y)
    for s in (1, 2, 3):
        short = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=s, random_start=False)(x, y)
        assert torch.equal(traj[s], short)
        torch.manual_seed(0)
        assert torch.equal(di_traj[s], torchattacks.DIFGSM(model, eps=8 / 255, alpha=2 / 255, steps=s)(x, y))


# -- transfer attacks: exact where deterministic (or same seed) ----------------------------------
def _ta_transfer(kind: str, model: nn.Module, eps: float, alpha: float) -> tuple[object, str]:
    """The torchattacks attack robustkit's preset ``kind`` reproduces, and the hook to record."""
    if kind == "mi-fgsm":
        return torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=1.0), "get_logits"
    if kind == "di-fgsm":
        return torchattacks.DIFGSM(model, eps=eps, alpha=alpha, steps=10), "input_diversity"
    if kind == "ti-fgsm":
        return (torchattacks.TIFGSM(model, eps=eps, alpha=alpha, steps=10, diversity_prob=0.0),
                "input_diversity")
    return torchattacks.TIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=1.0), "input_diversity"


OURS: dict[str, Callable[..., object]] = {"mi-fgsm": MIFGSM, "di-fgsm": DIFGSM, "ti-fgsm": TIFGSM,
                                          "mdti-fgsm": MDTIFGSM}


@pytest.mark.parametrize("kind", ["mi-fgsm", pytest.param("di-fgsm", marks=pytest.mark.slow),
                                  pytest.param("mdti-fgsm", marks=pytest.mark.slow)])
def test_transfer_attack_points_match_torchattacks(kind: str) -> None:
    """MI (deterministic), DI and M-DI-TI (same seed): the same points as torchattacks, frozen at
    the first adversarial iterate. (TI alone is compared by robust accuracy below: its smoothed
    gradient has entries near zero whose sign can flip with the batch size.)"""
    model = real_model("resnet4b")
    x, y = cifar10_test(64)
    ok = clean_correct(model, x, y)
    eps = 8 / 255
    ours = OURS[kind](ThreatModel("linf", eps), seed=3)(model, x, y)
    attack, hook = _ta_transfer(kind, model, eps, 2 / 255)
    torch.manual_seed(3)
    reference, _ = frozen_reference(model, iterates(attack, hook, x, y), y)
    assert_same_points(ours.x_adv, reference, ok)


@pytest.mark.parametrize("kind", ["pgd", "mi-fgsm", "mdti-fgsm"])
def test_transfer_attack_crafts_torchattacks_points(kind: str) -> None:
    """transfer_attack runs the full budget on every point: torchattacks' output, all points
    (also those the surrogate misclassifies), scored on the target model."""
    surrogate, target_model = real_model("resnet4b"), real_model("resnet20")
    x, y = cifar10_test(64)
    threat = ThreatModel("linf", 8 / 255)
    if kind == "pgd":
        ours = PGD(threat, random_start=False)
        theirs = torchattacks.PGD(surrogate, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)
    else:
        ours = OURS[kind](threat, seed=3)
        theirs, _ = _ta_transfer(kind, surrogate, 8 / 255, 2 / 255)
    result = transfer_attack(ours, surrogate, target_model, x, y)
    torch.manual_seed(3)
    expected = theirs(x, y)
    assert_same_points(result.x_adv, expected, torch.ones(len(x), dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(result.success, target_model(expected).argmax(1) != y)


# -- robust accuracy on >= 200 images (slow) -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,eps,n", [("resnet4b", 8 / 255, 256), ("resnet20", 2 / 255, 200)])
@pytest.mark.parametrize("kind", ["mi-fgsm", "di-fgsm", "ti-fgsm", "mdti-fgsm"])
def test_transfer_attack_robust_accuracy_matches_torchattacks(kind: str, name: str, eps: float,
                                                              n: int) -> None:
    model = real_model(name)
    x, y = cifar10_test(n)
    ok = clean_correct(model, x, y)
    threat = ThreatModel("linf", eps)
    alpha = 2.5 * eps / 10
    start = time.perf_counter()
    ours = OURS[kind](threat, seed=0)(model, x, y)
    t_ours = time.perf_counter() - start
    attack, hook = _ta_transfer(kind, model, eps, alpha)
    torch.manual_seed(0)
    start = time.perf_counter()
    traj = iterates(attack, hook, x, y)
    t_theirs = time.perf_counter() - start
    with torch.no_grad():
        ta_acc = (model(traj[-1]).argmax(1) == y).float().mean().item()
    reference, _ = frozen_reference(model, traj, y)
    same = ((ours.x_adv - reference).abs().flatten(1).amax(1) <= 1e-5)[ok].float().mean().item()
    line = (f"\n{kind} {name} eps {eps * 255:.0f}/255, {n} images: robust acc robustkit "
            f"{ours.robust_accuracy:.4f} torchattacks {ta_acc:.4f} (diff "
            f"{100 * (ours.robust_accuracy - ta_acc):+.2f}pp); same x_adv on {100 * same:.1f}% of "
            f"attacked points; {t_ours:.1f}s vs {t_theirs:.1f}s")
    if kind in ("di-fgsm", "mdti-fgsm"):  # independent randomness: another seed on each side
        other = OURS[kind](threat, seed=1)(model, x, y).robust_accuracy
        torch.manual_seed(2)
        attack, _ = _ta_transfer(kind, model, eps, alpha)
        other_adv = attack(x, y)
        with torch.no_grad():
            other_ta = (model(other_adv).argmax(1) == y).float().mean().item()
        line += f"; other seeds: robustkit {other:.4f} torchattacks {other_ta:.4f}"
    print(line)
    assert abs(ours.robust_accuracy - ta_acc) <= 0.015


# -- surrogate (black-box transfer) ----------------------------------------------------------------
@pytest.mark.slow
def test_transfer_from_resnet20_to_resnet32() -> None:
    surrogate, target_model = real_model("resnet20"), real_model("resnet32")
    x, y = cifar10_test(200)
    ok = clean_correct(target_model, x, y)
    threat = ThreatModel("linf", 8 / 255)
    white = MIFGSM(threat)(target_model, x, y)
    white_rate = white.success[ok].float().mean().item()
    lines = [f"\nresnet20 -> resnet32, Linf 8/255, 200 images ({int(ok.sum())} clean-correct on "
             f"resnet32), success rate on those: white-box MI-FGSM on resnet32 {white_rate:.3f}"]
    for stop in (False, True):
        for kind, cls in OURS.items():
            start = time.perf_counter()
            transfer = transfer_attack(cls(threat, seed=0), surrogate, target_model, x, y,
                                       stop_at_surrogate_success=stop)
            rate = transfer.success[ok].float().mean().item()
            lines.append(f"  transfer {kind} stop_at_surrogate_success={stop}: {rate:.3f} "
                         f"({time.perf_counter() - start:.0f}s)")
            assert 0 < rate < white_rate
    # torchattacks' MI-FGSM runs all 10 steps, on every point: the usual transfer setting
    ta_adv = torchattacks.MIFGSM(surrogate, eps=8 / 255, alpha=2 / 255)(x, y)
    with torch.no_grad():
        ta_rate = (target_model(ta_adv).argmax(1) != y)[ok].float().mean().item()
    lines.append(f"  torchattacks MI-FGSM crafted on resnet20: {ta_rate:.3f}")
    print("\n".join(lines))
