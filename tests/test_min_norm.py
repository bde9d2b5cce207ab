"""Minimum-norm attacks (FMN, DDN, ALMA, C&W L2, DeepFool, FAB without eps) against adv-lib 0.2.8
on real checkpoints and images: at the same step budget robustkit's median distance (failures
count as inf) is within 2% of adv-lib's or smaller and its success rate at least adv-lib's.
Fast tests: the small robust resnet4b and the MNIST model, a few dozen images, small budgets;
slow: resnet20, resnet4b and MNIST with the real budgets, and FMN-Linf against APGD.

Also: L0 and ``eps=inf`` in ThreatModel, the eps-constrained mode (it breaks exactly what the
unbounded run finds within eps), ``distance``, and the one-sentence errors.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attacks import APGD, DDN, FAB, FMN, PGD, CarliniWagnerL2, DeepFool
from robustkit.attacks.min_norm import ActiveRows
from robustkit.errors import UsageError
from robustkit.models import load_model
from robustkit.registry import ATTACKS

from conftest import cifar10_test, mnist_test, shared_file

pytestmark = pytest.mark.usefixtures("one_thread")

INF = math.inf
MIN_NORM = ("fmn", "ddn", "alma", "cw", "deepfool", "fab")
MODELS: dict[str, tuple[str, str, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]] = {
    "resnet20": ("resnet20", "models/resnet20-12fca82f.th", cifar10_test),
    "resnet4b": ("resnet4b", "models/abcrown_resnet4b.pth", cifar10_test),
    "mnist": ("mnist-cnn-a", "models/abcrown_mnist_cnn_a_adv.pth", mnist_test),
}
P = {"l0": 0, "l1": 1, "l2": 2, "linf": INF}


@functools.cache
def real_model(key: str) -> nn.Module:
    arch, path, _ = MODELS[key]
    model = load_model(arch, shared_file(path)).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # adv-lib does not freeze the model itself
    return model


def clean_points(key: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images the model classifies correctly (both libraries attack these)."""
    model, data = real_model(key), MODELS[key][2]
    x, y = data(3 * n)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n].contiguous(), y[ok][:n]


def adv_lib() -> types.ModuleType:
    pytest.importorskip("adv_lib")
    # adv-lib imports visdom at module level for an optional progress logger it never needs here
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))
    import adv_lib.attacks

    return adv_lib.attacks


def reference(name: str, norm: str, budget: dict[str, int]) -> Callable[..., torch.Tensor]:
    """adv-lib's attack ``name`` at the same budget: ``run(model, x, labels, targeted)``."""
    al = adv_lib()
    steps = budget.get("steps")
    if name == "fmn":
        return lambda m, x, lab, t: al.fmn(m, x, lab, norm=P[norm], targeted=t, steps=steps or 10)
    if name == "ddn":
        return lambda m, x, lab, t: al.ddn(m, x, lab, targeted=t, steps=steps or 100)
    if name == "alma":
        return lambda m, x, lab, t: al.alma(m, x, lab, targeted=t, num_steps=steps or 1000, distance=norm)
    if name == "cw":
        return lambda m, x, lab, t: al.carlini_wagner_l2(m, x, lab, targeted=t, max_iterations=steps or 10000,
                                                         binary_search_steps=budget.get("binary_search_steps", 9))
    if name == "deepfool":
        return lambda m, x, lab, t: al.df(m, x, lab, norm=P[norm], steps=steps or 100)
    return lambda m, x, lab, t: al.fab(m, x, lab, norm=P[norm], n_iter=steps or 100)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, norm: str,
            target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Success and distance (inf where not adversarial) of points, judged the same way for both."""
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    success = pred == target if target is not None else pred != y
    dist = ThreatModel(norm, INF).norm_of(x_adv - x)
    return success, torch.where(success, dist, torch.full_like(dist, INF))


def median(d: torch.Tensor) -> float:
    return float(np.median(d.double().numpy()))


def compare(key: str, name: str, norm: str, n: int, budget: dict[str, int], targeted: bool = False) -> dict[str, Any]:
    """Run robustkit and adv-lib on the same clean points; assert the acceptance rule; print both."""
    model = real_model(key)
    x, y = clean_points(key, n)
    target = (y + 1) % 10 if targeted else None
    start = time.perf_counter()
    ours = ATTACKS.get(name)(ThreatModel(norm, INF), targeted=targeted, **budget)(model, x, y, target=target)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    ref_adv = reference(name, norm, budget)(model, x, y if target is None else target, targeted)
    t_ref = time.perf_counter() - start
    ref_success, ref_dist = measure(model, x, y, ref_adv, norm, target)
    our_success, our_dist = measure(model, x, y, ours.x_adv, norm, target)
    assert torch.equal(our_success, ours.success)
    torch.testing.assert_close(our_dist, ours.distance)
    row = {"ours": median(ours.distance), "ref": median(ref_dist), "ours_success": float(ours.success.float().mean()),
           "ref_success": float(ref_success.float().mean()), "t_ours": t_ours, "t_ref": t_ref}
    print(f"\n{key} {name} {norm}{' targeted' if targeted else ''} {budget} on {len(x)} images: median distance "
          f"robustkit {row['ours']:.4g} / adv-lib {row['ref']:.4g}, success {row['ours_success']:.1%} / "
          f"{row['ref_success']:.1%}, {t_ours:.1f} s / {t_ref:.1f} s")
    assert row["ours"] <= row["ref"] * 1.02 + 1e-9 or row["ref"] == INF
    assert row["ours_success"] >= row["ref_success"]
    return row


# -- the threat model: L0 and eps=inf ---------------------------------------------------------
def test_l0_counts_changed_coordinates_and_projects_onto_the_largest() -> None:
    delta = torch.zeros(2, 3, 4, 4)
    delta[0, 0, 0, 0], delta[0, 1, 0, 0], delta[0, 2, 3, 3] = 0.5, -0.1, 0.2  # one pixel, 2 channels + 1
    delta[1, :, 1, 1] = 0.3
    threat = ThreatModel("l0", 2)
    assert threat.norm_of(delta).tolist() == [3.0, 3.0]  # coordinates (each channel), as FMN / adv-lib
    projected = threat.project(delta)
    assert threat.norm_of(projected).tolist() == [2.0, 2.0]
    assert projected[0, 0, 0, 0] == 0.5 and projected[0, 2, 3, 3] == 0.2 and projected[0, 1, 0, 0] == 0
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert threat.contains(threat.clip(x + delta, x), x).all()
    start = threat.random_init(x, torch.Generator().manual_seed(1))
    assert threat.contains(start, x).all() and (threat.norm_of(start - x) > 0).all()
    with pytest.raises(UsageError, match="whole number"):
        ThreatModel("l0", 2.5)


def test_unbounded_threat_is_the_box() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g)
    far = x + 3 * torch.randn(3, 3, 8, 8, generator=g)
    for norm in ("linf", "l2", "l1", "l0"):
        threat = ThreatModel(norm, INF)
        assert not threat.bounded and ThreatModel(norm, 1).bounded
        assert torch.equal(threat.clip(far, x), far.clamp(0, 1))
        assert threat.contains(far.clamp(0, 1), x).all()
        with pytest.raises(UsageError, match="finite eps"):
            threat.random_init(x, g)
    with pytest.raises(UsageError, match="positive"):
        ThreatModel("l2", -INF)
    with pytest.raises(UsageError, match="positive"):
        ThreatModel("l2", math.nan)


def test_active_rows_read_and_write_the_same_values_whole_and_indexed() -> None:
    """While every point is active the state moves as whole tensors; once one stops, by index;
    the values are those of plain indexing either way, and the whole path gathers nothing."""
    state = torch.arange(12.0).view(6, 2)
    rows = ActiveRows(6, state.device)
    assert rows.take(state) is state  # no gather, no copy
    assert rows.keep(torch.ones(6, dtype=torch.bool)) and rows.whole
    state = rows.put(state, state + 100)
    mask = torch.tensor([True, False, True, False, False, True])
    state = rows.put_where(state, mask, -rows.take(state))
    expected = torch.arange(12.0).view(6, 2) + 100
    expected[mask] *= -1
    assert torch.equal(state, expected)
    assert rows.keep(~mask) and not rows.whole and rows.index.tolist() == [1, 3, 4]
    assert torch.equal(rows.take(state), expected[[1, 3, 4]])
    state = rows.put(state, torch.zeros(3, 2))
    state = rows.put_where(state, torch.tensor([False, True, False]), torch.ones(3, 2))
    expected[[1, 4]], expected[3] = 0, 1
    assert torch.equal(state, expected) and len(rows) == 3
    assert not rows.keep(torch.zeros(3, dtype=torch.bool)) and len(rows) == 0


# -- errors ----------------------------------------------------------------------------------
def test_one_sentence_errors() -> None:
    with pytest.raises(UsageError, match=r"^ddn supports the norms l2, not l0\.$"):
        DDN(ThreatModel("l0", INF))
    with pytest.raises(UsageError, match=r"^pgd supports the norms linf, l2, not l0\.$"):
        PGD(ThreatModel("l0", 10))
    with pytest.raises(UsageError, match=r"^deepfool is untargeted; it has no targeted version"):
        DeepFool(ThreatModel("l2", INF), targeted=True)
    model = tiny_model()
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    for name in ("fmn", "ddn", "alma", "cw"):
        norm = ATTACKS.get(name).supported_norms[0]
        with pytest.raises(UsageError, match=r"targeted=True\) but got no target; pass target="):
            ATTACKS.get(name)(ThreatModel(norm, INF), targeted=True)(model, x, y)
    with pytest.raises(UsageError, match="does not take a target"):
        DeepFool(ThreatModel("l2", INF))(model, x, y, target=y)
    assert ATTACKS.canonical("cw-l2") == "cw" and ATTACKS.canonical("df") == "deepfool"
    assert all(getattr(ATTACKS.get(name), "minimum_norm", False) for name in MIN_NORM)


# -- the contract without eps ------------------------------------------------------------------
def tiny_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(32, 10)).eval()


SMALL = {"ddn": {"steps": 20}, "alma": {"steps": 30}, "fab": {"steps": 10}, "fmn": {"steps": 20},
         "cw": {"binary_search_steps": 3, "steps": 20, "initial_const": 1.0}}


@pytest.mark.parametrize("name,norm", [(n, norm) for n in MIN_NORM for norm in ATTACKS.get(n).supported_norms])
def test_unbounded_runs_report_the_distance_of_what_they_return(name: str, norm: str) -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two points misclassified from the start: distance 0
    threat = ThreatModel(norm, INF)
    result = ATTACKS.get(name)(threat, **SMALL.get(name, {}))(model, x, y)
    assert ((result.x_adv >= 0) & (result.x_adv <= 1)).all()
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    assert result.success[:2].all() and (result.distance[:2] == 0).all()
    assert result.success[2:].any(), "the attack broke none of the points of a random small CNN"
    dist = threat.norm_of(result.x_adv - x)
    assert torch.equal(result.distance, torch.where(result.success, dist, torch.full_like(dist, INF)))
    assert torch.equal(result.x_adv[~result.success], x[~result.success])
    again = ATTACKS.get(name)(threat, **SMALL.get(name, {}))(model, x, y)
    assert torch.equal(again.x_adv, result.x_adv)


# -- eps-constrained mode -----------------------------------------------------------------------
@pytest.mark.parametrize("name,norm,eps", [("fmn", "l2", 0.5), ("fmn", "linf", 2 / 255), ("fmn", "l0", 12),
                                           ("ddn", "l2", 0.5), ("alma", "l1", 80.0), ("cw", "l2", 0.5),
                                           ("deepfool", "linf", 2 / 255), ("fab", "l2", 0.5)])
def test_eps_mode_breaks_what_the_unbounded_run_finds_within_eps(name: str, norm: str, eps: float) -> None:
    """Points stop once within eps; the best norm only decreases, so success is exactly ``distance
    <= eps`` of the unbounded run, with or without early stop (float64: the batch a point runs in
    cannot flip a decision by rounding)."""
    model = real_model("resnet4b").double()
    try:
        x, y = clean_points("resnet4b", 12)
        x = x.double()
        budget = SMALL.get(name, {})
        free = ATTACKS.get(name)(ThreatModel(norm, INF), **budget)(model, x, y)
        threat = ThreatModel(norm, eps)
        fast = ATTACKS.get(name)(threat, **budget)(model, x, y)
        full = ATTACKS.get(name)(threat, early_stop=False, **budget)(model, x, y)
    finally:
        model.float()
    within = free.distance <= eps
    assert 0 < int(within.sum()) < len(x), "pick an eps that splits the points"
    assert torch.equal(fast.success, within) and torch.equal(full.success, within)
    assert threat.contains(fast.x_adv, x).all() and threat.contains(full.x_adv, x).all()
    assert (fast.distance[within] <= eps).all() and (fast.distance[~within] == INF).all()
    if name != "deepfool":  # without early stop the run goes on to the smallest point, as unbounded
        torch.testing.assert_close(full.distance[within], free.distance[within])


# -- adv-lib oracles (fast: small budgets) -------------------------------------------------------
FAST_CASES = [
    ("resnet4b", "fmn", "linf", {"steps": 20}), ("resnet4b", "fmn", "l2", {"steps": 20}),
    ("resnet4b", "fmn", "l1", {"steps": 20}), ("resnet4b", "fmn", "l0", {"steps": 20}),
    ("resnet4b", "ddn", "l2", {"steps": 20}), ("resnet4b", "alma", "l2", {"steps": 50}),
    ("resnet4b", "alma", "l1", {"steps": 50}), ("resnet4b", "cw", "l2", {"binary_search_steps": 5, "steps": 50}),
    ("resnet4b", "deepfool", "l2", {}), ("resnet4b", "deepfool", "linf", {}),
    ("resnet4b", "fab", "linf", {"steps": 10}), ("resnet4b", "fab", "l2", {"steps": 10}),
    ("resnet4b", "fab", "l1", {"steps": 10}),
    ("mnist", "fmn", "linf", {"steps": 20}), ("mnist", "ddn", "l2", {"steps": 20}),
    ("mnist", "deepfool", "l2", {}),
]


@pytest.mark.parametrize("key,name,norm,budget", FAST_CASES)
def test_matches_adv_lib(key: str, name: str, norm: str, budget: dict[str, int]) -> None:
    compare(key, name, norm, 16, budget)


@pytest.mark.parametrize("name,norm,budget", [("fmn", "l2", {"steps": 20}), ("ddn", "l2", {"steps": 20}),
                                              ("alma", "l1", {"steps": 50}),
                                              ("cw", "l2", {"binary_search_steps": 5, "steps": 50})])
def test_targeted_matches_adv_lib(name: str, norm: str, budget: dict[str, int]) -> None:
    compare("resnet4b", name, norm, 8, budget, targeted=True)


def test_fmn_and_ddn_follow_adv_lib_point_by_point() -> None:
    """FMN and DDN have no randomness: on the same points they find adv-lib's points."""
    model = real_model("resnet4b")
    x, y = clean_points("resnet4b", 8)
    al = adv_lib()
    ours = FMN(ThreatModel("l2", INF), steps=20)(model, x, y)
    torch.testing.assert_close(ours.x_adv, al.fmn(model, x, y, norm=2, steps=20), atol=1e-5, rtol=0)
    ours = DDN(ThreatModel("l2", INF), steps=20)(model, x, y)
    torch.testing.assert_close(ours.x_adv, al.ddn(model, x, y, steps=20), atol=1e-5, rtol=0)


# -- slow: the real budgets ------------------------------------------------------------------------
SLOW_CASES = [
    *[(key, "fmn", norm, {"steps": 100}) for key in ("resnet20", "resnet4b", "mnist")
      for norm in ("linf", "l2", "l1", "l0")],
    *[(key, "ddn", "l2", {}) for key in ("resnet20", "resnet4b", "mnist")],
    *[(key, "deepfool", norm, {}) for key in ("resnet20", "resnet4b", "mnist") for norm in ("l2", "linf")],
    *[(key, "alma", norm, {}) for key in ("resnet4b", "mnist") for norm in ("l2", "l1")],
    *[("resnet20", "alma", norm, {"steps": 200}) for norm in ("l2", "l1")],
    *[(key, "cw", "l2", {"binary_search_steps": 9, "steps": 1000}) for key in ("mnist",)],
    *[(key, "cw", "l2", {"binary_search_steps": 5, "steps": 200}) for key in ("resnet20", "resnet4b")],
    *[(key, "fab", norm, {}) for key in ("resnet4b", "mnist") for norm in ("linf", "l2", "l1")],
    *[("resnet20", "fab", norm, {"steps": 20}) for norm in ("linf", "l2", "l1")],
]


@pytest.mark.slow
@pytest.mark.parametrize("key,name,norm,budget", SLOW_CASES)
def test_matches_adv_lib_at_the_real_budget(key: str, name: str, norm: str, budget: dict[str, int]) -> None:
    compare(key, name, norm, 32 if key == "resnet20" else 64, budget)


def fmn_against_apgd(n: int, steps: int) -> list[tuple[float, float, float, int, int]]:
    """Robust accuracy of resnet4b at 2/255 and 8/255 implied by FMN-Linf's distances and by
    APGD-CE (100 steps), and how many points each breaks that the other does not."""
    model = real_model("resnet4b")
    x, y = cifar10_test(n)
    fmn = FMN(ThreatModel("linf", INF), steps=steps)(model, x, y)
    rows = []
    for eps in (2 / 255, 8 / 255):
        apgd = APGD(ThreatModel("linf", eps), steps=100)(model, x, y)
        fmn_broken = fmn.distance <= eps + 1e-7
        rows.append((eps, 1 - float(fmn_broken.float().mean()), apgd.robust_accuracy,
                     int((fmn_broken & ~apgd.success).sum()), int((apgd.success & ~fmn_broken).sum())))
    for eps, fmn_acc, apgd_acc, only_fmn, only_apgd in rows:
        print(f"\nresnet4b Linf {eps * 255:.0f}/255 on {n} images: robust accuracy from FMN-{steps} distances "
              f"{fmn_acc:.1%}, APGD-CE-100 {apgd_acc:.1%}; broken only by FMN {only_fmn}, only by APGD {only_apgd}")
    return rows


def test_fmn_linf_is_consistent_with_apgd() -> None:
    """Every FMN point within eps is adversarial (so its robust accuracy is a valid upper bound),
    and FMN is not far weaker than APGD (at most 2 binomial standard errors plus 1 point more)."""
    n = 48
    for _, fmn_acc, apgd_acc, _, _ in fmn_against_apgd(n, steps=100):
        noise = 2 * math.sqrt(max(apgd_acc * (1 - apgd_acc), 0.05) / n) + 1 / n
        assert fmn_acc <= apgd_acc + noise


@pytest.mark.slow
def test_fmn_linf_is_consistent_with_apgd_on_more_images() -> None:
    n = 200
    for _, fmn_acc, apgd_acc, _, _ in fmn_against_apgd(n, steps=1000):
        noise = 2 * math.sqrt(max(apgd_acc * (1 - apgd_acc), 0.05) / n) + 1 / n
        assert fmn_acc <= apgd_acc + noise


def test_cw_abort_per_point_does_not_depend_on_the_batch() -> None:
    """``abort_early="point"``: a point's run is the same alone or in a batch (float64, so that
    the batch cannot flip a decision by rounding); the default follows adv-lib (the batch stops
    when every point stalled), which test_matches_adv_lib checks."""
    model = real_model("resnet4b").double()
    try:
        x, y = clean_points("resnet4b", 5)
        x = x.double()
        attack = CarliniWagnerL2(ThreatModel("l2", INF), binary_search_steps=3, steps=20, initial_const=0.1,
                                 abort_early="point")
        batch = attack(model, x, y)
        alone = torch.cat([attack(model, x[i : i + 1], y[i : i + 1]).distance for i in range(len(x))])
    finally:
        model.float()
    assert batch.success.any()
    torch.testing.assert_close(batch.distance, alone)
    with pytest.raises(UsageError, match="abort_early must be batch"):
        CarliniWagnerL2(ThreatModel("l2", INF), abort_early="sometimes")


def test_fab_without_eps_is_adv_libs_fab() -> None:
    model = real_model("resnet4b")
    x, y = clean_points("resnet4b", 6)
    ours = FAB(ThreatModel("linf", INF), steps=10)(model, x, y)
    ref = adv_lib().fab(model, x, y, norm=INF, n_iter=10)
    success, dist = measure(model, x, y, ref, "linf")
    assert success.all() and torch.equal(ours.success, success)
    # the same points up to the projections' rounding (robustkit solves FAB's Linf projection by Newton steps)
    torch.testing.assert_close(ours.distance, dist, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square", "autoattack", "fgsm"])
def test_eps_bounded_attacks_refuse_an_infinite_eps(name: str) -> None:
    with pytest.raises(UsageError, match="needs a finite eps"):
        ATTACKS.get(name)(ThreatModel("linf", math.inf))
