"""The AutoAttack cascade: versions, the stage-by-stage semantics, attack names and options, the
torchattacks / pyautoattack backends, and (slow) agreement with pyautoattack on real models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attacks import AutoAttack, PyAutoAttack, TorchAttacks
from robustkit.cli import main
from robustkit.errors import DependencyError, UsageError
from robustkit.evaluation.attack_spec import (
    build_attack,
    canonical_attack,
    options_for,
    parse_kwargs,
    split_attacks,
    with_backend,
)
from robustkit.results.leaderboard import Leaderboard

from conftest import cifar10_test, pyautoattack_checkpoint, shared_file

LINF = ThreatModel("linf", 8 / 255)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from robustkit.data import load_dataset
    from robustkit.models import load_model

    model = load_model("digits-cnn").eval()
    data = load_dataset("digits", n_examples=60)
    return model, data.x, data.y


def stage_configs(attack: AutoAttack) -> dict:
    return attack.config()["stages"]


def test_versions_follow_the_reference() -> None:
    standard = stage_configs(AutoAttack(LINF))
    assert list(standard) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert standard["apgd-ce"]["restarts"] == 1 and standard["apgd-ce"]["steps"] == 100
    assert standard["apgd-t"]["n_target_classes"] == 9 and standard["fab-t"]["n_target_classes"] == 9
    assert standard["square"]["n_queries"] == 5000 and standard["square"]["rescale_schedule"] is False
    plus = stage_configs(AutoAttack(LINF, version="plus"))
    assert list(plus) == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["apgd-ce"]["restarts"] == 5 and plus["fab"]["restarts"] == 5
    rand = stage_configs(AutoAttack(LINF, version="rand"))
    assert list(rand) == ["apgd-ce", "apgd-dlr"] and rand["apgd-dlr"]["eot_iter"] == 20
    l1 = AutoAttack(ThreatModel("l1", 12.0))
    assert list(stage_configs(l1)) == ["apgd-ce", "apgd-t", "fab-t"] and l1.config()["skipped"] == ["square"]
    assert stage_configs(l1)["apgd-ce"] == {"steps": 100, "restarts": 5, "loss": "ce", "rho": 0.75,
                                            "use_largereps": True}
    custom = AutoAttack(LINF, attacks="apgd,square", stage_options={"square": {"n_queries": 100}})
    assert custom.config()["version"] == "custom" and custom.stage_names() == ["apgd-ce", "square"]
    assert stage_configs(custom)["square"]["n_queries"] == 100


@pytest.mark.parametrize("kwargs,fragment", [({"version": "fast"}, "Unknown AutoAttack version"),
                                             ({"attacks": "apgd-ce,pgd"}, "cannot run pgd"),
                                             ({"attacks": "apgd-ce,sqare"}, "Did you mean 'square'")])
def test_bad_versions_and_lists(kwargs: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        AutoAttack(LINF, **kwargs)


def test_names_options_and_backends() -> None:
    assert split_attacks("pgd,autoattack:apgd-ce,square") == ["pgd", "autoattack:apgd-ce,square"]
    assert split_attacks("autoattack:plus,pgd") == ["autoattack:plus", "pgd"]
    assert split_attacks(["autoattack:apgd-ce,square", "fgsm"]) == ["autoattack:apgd-ce,square", "fgsm"]
    assert canonical_attack("AA:standard") == "autoattack"
    assert canonical_attack("aa:apgd,fab-t") == "autoattack:apgd-ce,fab-t"
    assert canonical_attack("torchattacks:pgd") == "torchattacks:PGD"
    with pytest.raises(UsageError, match="has no variants"):
        canonical_attack("pgd:fast")
    assert with_backend("pgd", "torchattacks") == "torchattacks:pgd"
    assert with_backend("autoattack:plus", "autoattack") == "pyautoattack:plus"
    assert with_backend("autoattack", "autoattack") == "pyautoattack"
    assert with_backend("square", "autoattack") == "pyautoattack:square"
    kwargs = parse_kwargs("apgd-ce.steps=5,square.n_queries=50,pgd.steps=3,version=plus")
    assert options_for("autoattack:apgd-ce,square", {k: v for k, v in kwargs.items() if k != "version"}) == {
        "stage_options": {"apgd-ce": {"steps": 5}, "square": {"n_queries": 50}}}
    assert options_for("pgd", kwargs) == {"steps": 3}  # a plain option goes only to the attacks that take it
    assert options_for("autoattack", {"version": "plus"}) == {"version": "plus"}
    attack = build_attack("autoattack:apgd-ce,square", LINF, **options_for("autoattack:apgd-ce,square", kwargs))
    assert stage_configs(attack)["square"]["n_queries"] == 50


def test_each_stage_attacks_only_the_points_still_robust(digits: tuple) -> None:
    model, x, y = digits
    threat = ThreatModel("linf", 0.15)
    attack = AutoAttack(threat, attacks="apgd-ce,square",
                        stage_options={"apgd-ce": {"steps": 5}, "square": {"n_queries": 30}})
    square = attack.stages[1][1]
    seen: list[torch.Tensor] = []
    perturb = square.perturb
    square.perturb = lambda forward, xs, *rest, **kw: seen.append(xs) or perturb(forward, xs, *rest, **kw)  # type: ignore
    result = attack(model, x, y)
    first, second = result.stages["apgd-ce"], result.stages["square"]
    assert torch.equal(second, result.success) and bool((first <= second).all())  # cumulative
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    alone = build_attack("apgd-ce", threat, steps=5)(model, x, y)
    assert torch.equal(first, alone.success | ~correct)  # stage 1 = APGD-CE on its own (same seed)
    assert len(seen) == 1 and torch.equal(seen[0], x[~first])  # Square got exactly the points left
    square_alone = build_attack("square", threat, n_queries=30, rescale_schedule=False)(model, x[~first], y[~first])
    assert torch.equal(result.success[~first], square_alone.success)
    assert bool(threat.contains(result.x_adv, x).all())


def test_cli_autoattack_reports_stages_and_records_warnings(capsys: pytest.CaptureFixture, tmp_path) -> None:  # noqa: ANN001
    db = tmp_path / "lb.db"
    args = ["eval", "--attack", "pgd,autoattack:apgd-ce,square", "--attack-kwargs",
            "apgd-ce.steps=5,square.n_queries=40,pgd.steps=5", "--n-examples", "40", "--db", str(db), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert "after apgd-ce" in out and "after square" in out
    rows = {r.attack: r for r in Leaderboard(db).rows()}
    assert set(rows) == {"pgd", "autoattack:apgd-ce,square", "worst-case"}
    aa = rows["autoattack:apgd-ce,square"]
    stages = aa.extra["per_stage"]["autoattack:apgd-ce,square"]
    assert list(stages) == ["apgd-ce", "square"] and stages["square"] == pytest.approx(aa.robust_acc)
    assert isinstance(aa.extra["warnings"], list)  # diagnostics ran (on by default for AutoAttack)
    assert json.loads(json.dumps(aa.attack_config))["stages"]["square"]["n_queries"] == 40


def test_cli_prints_each_stage_as_it_runs(capsys: pytest.CaptureFixture, tmp_path) -> None:  # noqa: ANN001
    args = ["eval", "--attack", "autoattack:apgd-ce,square", "--attack-kwargs", "apgd-ce.steps=5,square.n_queries=20",
            "--n-examples", "20", "--db", str(tmp_path / "lb.db")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 0, err
    assert "autoattack: robust after apgd-ce:" in err and "autoattack: robust after square:" in err
    assert err.index("after apgd-ce") < err.index("after square")


def test_torchattacks_backend_equals_native_pgd(digits: tuple) -> None:
    pytest.importorskip("torchattacks")
    model, x, y = digits
    threat = ThreatModel("linf", 0.1)
    ours = build_attack("pgd", threat, steps=10, step_size=0.025, random_start=False)(model, x, y)
    theirs = build_attack("torchattacks:PGD", threat, steps=10, alpha=0.025, random_start=False)(model, x, y)
    assert isinstance(build_attack("torchattacks:pgd", threat), TorchAttacks)
    assert torch.equal(ours.success, theirs.success)
    with pytest.raises(UsageError, match="Did you mean"):
        build_attack("torchattacks:PDG", threat)
    with pytest.raises(UsageError, match="takes no option stepz"):
        build_attack("torchattacks:PGD", threat, stepz=3)


def test_pyautoattack_backend_equals_native_apgd(digits: tuple) -> None:
    pytest.importorskip("pyautoattack")
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    model, x, y = digits
    threat = ThreatModel("linf", 0.15)
    ours = build_attack("autoattack:apgd-ce", threat)(model, x, y)
    theirs = build_attack("pyautoattack:apgd-ce", threat)(model, x, y)
    assert isinstance(build_attack("pyautoattack", threat), PyAutoAttack)
    assert (ours.success == theirs.success).float().mean() >= 0.98


def test_missing_backend_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, *args: object) -> object:
        if name in ("torchattacks", "pyautoattack"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(DependencyError, match="pip install --no-deps torchattacks"):
        TorchAttacks(LINF)
    with pytest.raises(DependencyError, match=r"robustkit\[oracles\]"):
        PyAutoAttack(LINF)


def _compare_with_pyautoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    from pyautoattack import AutoAttack as Reference

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    ours = AutoAttack(LINF, seed=0)(model, x, y)
    reference = Reference(model, norm="Linf", eps=8 / 255, version="standard", seed=0)
    reference.verbose = False
    adv = reference.run_standard_evaluation(x, y, batch_size=len(x))[0]
    with torch.no_grad():
        theirs = model(adv).argmax(1) == y
    robust = ~ours.success
    return float(robust.float().mean()), float(theirs.float().mean()), float((robust == theirs).float().mean())


@pytest.mark.slow
def test_standard_matches_pyautoattack_on_an_adversarially_trained_model() -> None:
    from robustkit.models import load_model

    model = load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()
    x, y = cifar10_test(200)
    ours, theirs, agreement = _compare_with_pyautoattack(model, x, y)
    print(f"resnet4b, 200 images: robustkit {ours:.4f}, pyautoattack {theirs:.4f}, agreement {agreement:.4f}")
    assert abs(ours - theirs) <= 0.005 and agreement >= 0.99


@pytest.mark.slow
def test_standard_matches_pyautoattack_on_model_test() -> None:
    from robustkit.models import load_model

    model = load_model("resnet18", pyautoattack_checkpoint()).eval()
    x, y = cifar10_test(200)
    ours, theirs, agreement = _compare_with_pyautoattack(model, x, y)
    print(f"model_test.pt, 200 images: robustkit {ours:.4f}, pyautoattack {theirs:.4f}, agreement {agreement:.4f}")
    assert abs(ours - theirs) <= 0.005 and agreement >= 0.99


def test_eot_averages_gradients_over_a_randomized_model(digits: tuple) -> None:
    model, x, y = digits
    threat = ThreatModel("linf", 0.15)
    plain = build_attack("apgd-ce", threat, steps=10)(model, x, y)
    eot = build_attack("apgd-ce", threat, steps=10, eot_iter=4)(model, x, y)
    assert torch.equal(plain.success, eot.success)  # a deterministic model: the same gradient 4 times

    class Noisy(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return model(z + 0.05 * torch.randn_like(z))

    calls = []
    noisy = Noisy()
    noisy.register_forward_hook(lambda *_: calls.append(1))
    build_attack("apgd-ce", threat, steps=3, eot_iter=5)(noisy, x[:8], y[:8])
    assert len(calls) >= 3 * 5  # every step averages 5 forward/backward passes
    with pytest.raises(UsageError, match="eot_iter"):
        build_attack("apgd-ce", threat, eot_iter=0)
