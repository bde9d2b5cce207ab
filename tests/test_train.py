"""robustkit train: every method, the FGSM-AT tricks, the catastrophic-overfitting detector,
resume after SIGKILL, the sidecar, the YAML config and the CLI's one-line errors.

Fast: scikit-learn's 8x8 ``digits`` and the tiny ``digits-cnn``, a few hundred examples, one
thread (the 2-core CI box is shared; more threads are slower there).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.defenses import TrickOptions, build_strategy, pixel_mask, training_methods
from robustkit.defenses.fgsm_tricks import MaskInit, SmoothActivation, first_conv, relu_calls
from robustkit.errors import UsageError
from robustkit.models import build_model, load_model
from robustkit.models.sidecar import load_trained_model, read_sidecar, sidecar_model_name
from robustkit.threat import ThreatModel
from robustkit.training.co_detector import CODetector
from robustkit.training.dat import DATConfig, train_dat
from robustkit.training.loop import TrainConfig, build_training_model, train
from robustkit.training.optim import LAMB, lr_factor
from robustkit.training.pubdef import PubDefConfig
from robustkit.training.rift import RiftConfig, run_rift

ROOT = Path(__file__).resolve().parents[1]
# Every registered training method, found from the registry. Most run as `train(TrainConfig(method=...))`;
# these need more than a method name (their config class, a surrogate, a BatchNorm model, a checkpoint).
NEEDS = {"dat": "DATConfig, train_dat", "dat-fgsm": "DATConfig, train_dat", "pubdef": "PubDefConfig + a surrogate",
         "rift": "run_rift on a trained checkpoint", "advprop": "a model with BatchNorm",
         "fast-advprop": "a model with BatchNorm"}
METHODS = training_methods()

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(model="digits-cnn", dataset="digits", n_examples=256, epochs=1, batch_size=64, val_size=64, eps=0.1,
             lr=0.05, schedule="constant", device="cpu")


def small(**kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, **kw})


def digits_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits", split="train", n_examples=n)
    return d.x, d.y


# -- methods -----------------------------------------------------------------------------------


def test_the_method_lists_follow_the_registry() -> None:
    assert set(NEEDS) <= set(training_methods()) and len(METHODS) >= 12


def _one_epoch(method: str) -> tuple[list[dict], bool]:
    """One epoch of ``method`` through its entry point: the history and whether the model is in eval mode."""
    if method in ("dat", "dat-fgsm"):
        dat = train_dat(DATConfig(**{**SMALL, "method": method, "warmup_epochs": 0.0, "attack_steps": 3}))
        return dat.history, not dat.model.training
    if method == "pubdef":
        result = train(PubDefConfig(**SMALL, surrogate=["digits-cnn"]))
    elif method in ("advprop", "fast-advprop"):
        result = train(small(method=method, model="resnet20", normalize="none", n_examples=64, attack_steps=2))
    elif method == "rift":
        rift = run_rift(RiftConfig(model="digits-cnn", n_examples=128, val_size=64, epochs=1, mrc_epochs=1,
                                   mrc_size=64, attack_steps=3, alphas=[0.0, 1.0], device="cpu"))
        return [{**r, "clean_acc": r["val_acc"], "fgsm_acc": 0.0, "pgd_acc": rift.after["robust_acc"]}
                for r in rift.history], not rift.model.training
    else:
        result = train(small(method=method))
    return result.history, not result.model.training


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_one_epoch_with_finite_metrics(method: str) -> None:
    history, eval_mode = _one_epoch(method)
    (row,) = history
    for key in ("loss", "train_acc", "clean_acc", "fgsm_acc", "pgd_acc", "seconds"):
        assert math.isfinite(row[key]), (key, row)
    assert 0 <= row["pgd_acc"] <= row["clean_acc"] + 1e-9 or row["pgd_acc"] <= 1
    assert eval_mode
    if method in ("trades", "mart"):
        assert "loss_robust" in row


def test_standard_training_decreases_the_loss() -> None:
    result = train(small(method="standard", epochs=3, n_examples=512, lr=0.1))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["clean_acc"] > 0.3


def test_fgsm_methods_use_their_published_step_sizes() -> None:
    threat = ThreatModel("linf", 8 / 255)
    assert build_strategy("fgsm-at", threat).step_size == pytest.approx(8 / 255)
    rs = build_strategy("fgsm-rs", threat)
    assert rs.step_size == pytest.approx(1.25 * 8 / 255) and rs.default_schedule == "cyclic"
    assert build_strategy("pgd-at", threat).step_size == pytest.approx(2 / 255)
    assert build_strategy("trades", threat).beta == 6.0


def test_eps_warmup_ramps_the_training_radius() -> None:
    strategy = build_strategy("pgd-at", ThreatModel("linf", 0.3))
    strategy.set_eps(0.15)
    assert strategy.threat.eps == 0.15 and strategy.step_size == pytest.approx(0.15 / 4)
    strategy.set_eps(0.3)
    assert strategy.step_size == pytest.approx(0.3 / 4)
    result = train(small(method="fgsm-at", eps_warmup_epochs=2, epochs=1))
    assert math.isfinite(result.history[0]["loss"])


def test_fgsm_at_perturbation_is_the_signed_gradient_step() -> None:
    model = load_model("digits-cnn")
    x, y = digits_batch(16)
    threat = ThreatModel("linf", 0.1)
    strategy = build_strategy("fgsm-at", threat)
    x_adv = strategy.perturb(model, x, y, torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = (x + 0.1 * g.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)
    assert all(p.grad is None for p in model.parameters())


# -- tricks ------------------------------------------------------------------------------------


def test_stride_trick_sets_the_first_conv_stride_and_refits_the_head() -> None:
    x, y = digits_batch(4)
    cfg = small(method="fgsm-at", tricks=["stride"], stride=2)
    zoo = build_training_model(cfg, load_dataset("digits", split="train", n_examples=4))
    strategy = build_strategy("fgsm-at", ThreatModel("linf", 0.1), tricks=cfg.trick_options())
    specs = strategy.prepare_model(zoo, x)
    assert specs == [{"name": "large-stride", "stride": 2, "input_size": [1, 8, 8]}]
    assert first_conv(zoo, x)[1].stride == (2, 2)
    assert zoo.net[0].stride == (2, 2) and zoo.net[2].stride == (1, 1)
    assert zoo(x).shape == (4, 10)  # the flatten-linear head was refitted to the smaller map


def test_stride_trick_on_a_pooled_network_keeps_the_head() -> None:
    from robustkit.defenses import LargeStride

    net = build_model("resnet20")
    head = net.linear
    LargeStride(stride=2).apply(net, torch.zeros(1, 3, 32, 32))
    assert net.conv1.stride == (2, 2) and net.linear is head
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_smooth_act_swaps_relu_modules() -> None:
    x, _ = digits_batch(4)
    net = build_model("digits-cnn")
    keys = set(net.state_dict())
    assert relu_calls(net, x) == 3
    t = SmoothActivation("softplus")
    t.apply(net, x)
    assert t.replaced == 3 and not t.functional
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert sum(isinstance(m, nn.Softplus) for m in net.modules()) == 3
    assert relu_calls(net, x) == 0 and set(net.state_dict()) == keys


def test_smooth_act_also_covers_functional_relu() -> None:
    torch.manual_seed(0)
    net = build_model("resnet20").eval()  # calls F.relu in forward
    x = torch.rand(2, 3, 32, 32)
    before = net(x)
    assert relu_calls(net, x) > 0
    t = SmoothActivation("silu")
    t.apply(net, x)
    assert t.functional and relu_calls(net, x) == 0
    after = net(x)
    assert not torch.allclose(before, after)
    # the same network with F.relu replaced by hand gives the same output
    ref = build_model("resnet20").eval()
    ref.load_state_dict(net.state_dict())
    import robustkit.models.resnet_small as rs

    orig = rs.F.relu
    try:
        rs.F.relu = nn.functional.silu
        torch.testing.assert_close(ref(x), after)
    finally:
        rs.F.relu = orig


def test_mask_trick_masks_the_requested_ratio() -> None:
    m = pixel_mask((5, 3, 8, 8), 0.4, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 1, 8, 8)
    assert ((m == 0).flatten(1).sum(1) == round(0.4 * 64)).all()
    x = torch.rand(5, 3, 8, 8) + 0.1
    masked = MaskInit(0.4)(x, torch.Generator().manual_seed(1))
    zero = (masked == 0).all(1)  # whole pixels (every channel) are masked
    assert (zero.flatten(1).float().mean(1) == round(0.4 * 64) / 64).all()
    fixed = MaskInit(0.25, "fixed", seed=3)
    a, b = fixed.mask(x, None), fixed.mask(x[:2], None)
    assert torch.equal(a[0], a[4]) and torch.equal(a[:2], b)


def test_mask_trick_sets_the_fgsm_starting_point() -> None:
    x, y = digits_batch(8)
    threat = ThreatModel("linf", 0.1)
    strategy = build_strategy("fgsm-at", threat, tricks=TrickOptions(("mask",), mask_ratio=0.5))
    start = strategy.start(x, torch.Generator().manual_seed(0))
    masked = (start == 0) & (x > 0)
    assert masked.any() and torch.equal(start[~masked], x[~masked])
    x_adv = strategy.perturb(load_model("digits-cnn"), x, y, torch.Generator().manual_seed(0))
    assert threat.contains(x_adv, x).all()
    with pytest.raises(UsageError, match="fgsm-at or fgsm-rs"):
        build_strategy("pgd-at", threat, tricks=TrickOptions(("mask",)))


def test_weight_reg_adds_the_first_conv_penalty() -> None:
    x, y = digits_batch(16)
    opts = TrickOptions(("weight-reg",), reg_lambda=0.5, reg_p=2.0)
    strategy = build_strategy("fgsm-at", ThreatModel("linf", 0.1), tricks=opts)
    zoo = load_model("digits-cnn").train()
    strategy.prepare_model(zoo, x)
    out = strategy.step(zoo, x, y, torch.Generator().manual_seed(0))
    expected = 0.5 * zoo.net[0].weight.pow(2).sum().item()
    assert out.parts["reg"] == pytest.approx(expected, rel=1e-5) and out.parts["reg"] > 0
    assert out.loss.item() == pytest.approx(out.parts["task"] + out.parts["reg"], rel=1e-5)
    out.loss.backward()
    assert zoo.net[0].weight.grad is not None


def test_tricks_combine_in_training() -> None:
    result = train(small(method="fgsm-at", tricks=["mask", "weight-reg", "smooth-act", "stride"]))
    assert math.isfinite(result.history[0]["loss"]) and result.history[0]["loss_reg"] > 0
    assert [s["name"] for s in result.architecture] == ["large-stride", "smooth-activation"]


# -- catastrophic-overfitting detector ----------------------------------------------------------


def test_detector_flags_a_synthetic_collapse() -> None:
    det = CODetector()
    history = [(0.30, 0.20), (0.45, 0.32), (0.55, 0.38), (0.60, 0.40), (0.75, 0.05), (0.85, 0.01), (0.9, 0.0)]
    checks = [det.observe(i, i * 10, 0.8, f, p) for i, (f, p) in enumerate(history)]
    assert [c.suspect for c in checks] == [False] * 4 + [True] * 3
    assert [c.flagged for c in checks] == [False] * 5 + [True] * 2  # patience: two suspect checks in a row
    assert "best" in checks[5].reason and det.flagged and det.best_pgd == pytest.approx(0.40)
    eager = CODetector(patience=1)
    assert [eager.observe(i, i, 0.8, f, p).flagged for i, (f, p) in enumerate(history)] == [False] * 4 + [True] * 3


def test_detector_flags_fgsm_far_above_pgd_without_a_prior_peak() -> None:
    det = CODetector()
    assert det.observe(1, 1, 0.5, 0.70, 0.03).suspect and not det.flagged
    assert det.observe(2, 2, 0.5, 0.75, 0.02).flagged
    assert "FGSM" in det.history[1].reason


def test_detector_stays_silent_on_a_healthy_history() -> None:
    det = CODetector()
    pgd = [0.05, 0.12, 0.20, 0.26, 0.31, 0.29, 0.34, 0.36, 0.35, 0.38]
    for i, p in enumerate(pgd):
        assert not det.observe(i, i, p + 0.3, p + 0.06, p).flagged
    # one gap right after the eps warmup, then PGD catches up (MNIST weight-reg run): not flagged
    det1 = CODetector()
    for f, p in [(0.39, 0.15), (0.48, 0.15), (0.53, 0.30), (0.61, 0.29), (0.72, 0.50)]:
        assert not det1.observe(0, 0, 0.9, f, p).flagged
    # early chance-level noise is not CO either
    det2 = CODetector()
    assert not det2.observe(0, 0, 0.1, 0.12, 0.02).flagged
    # nor is FGSM and PGD accuracy falling together (overfitting the training set)
    det3 = CODetector()
    for f, p in [(0.25, 0.2), (0.3, 0.25), (0.08, 0.05), (0.03, 0.01)]:
        assert not det3.observe(0, 0, 0.4, f, p).flagged


def test_detector_measures_a_real_model() -> None:
    x, y = load_dataset("digits", split="test", n_examples=64).x, load_dataset("digits", n_examples=64).y
    det = CODetector(ThreatModel("linf", 0.1), x, y)
    clean, fgsm, pgd = det.measure(load_model("digits-cnn"))
    assert 0.8 <= clean <= 1 and pgd <= fgsm + 1e-9 and 0 <= pgd <= clean


def scripted_detector(monkeypatch: pytest.MonkeyPatch, values: list[tuple[float, float]]) -> None:
    it = iter(values)
    monkeypatch.setattr(CODetector, "measure", lambda self, model: (0.9, *next(it)))


def test_on_co_stop_ends_training(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_detector(monkeypatch, [(0.4, 0.3), (0.7, 0.02), (0.7, 0.02), (0.7, 0.02), (0.7, 0.02)])
    result = train(small(method="fgsm-at", epochs=5, on_co="stop"))
    assert result.co_detected and result.stopped_early and len(result.history) == 3
    assert [r["co"] for r in result.history] == [False, False, True]


def test_on_co_rollback_restores_healthy_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_detector(monkeypatch, [(0.4, 0.3), (0.7, 0.02), (0.7, 0.02), (0.4, 0.3)])
    seen = []
    result = train(small(method="fgsm-at", epochs=4, on_co="rollback"), progress=seen.append)
    assert not result.stopped_early and result.history[-1]["rollbacks"] == 1
    assert [r["co"] for r in result.history] == [False, False, True, False]
    assert any(e.kind == "co" for e in seen)


# -- optimizers and schedules --------------------------------------------------------------------


def test_schedules() -> None:
    assert lr_factor("constant", 3, 10) == 1
    assert lr_factor("multistep", 4.9, 10) == 1 and lr_factor("multistep", 5, 10) == pytest.approx(0.1)
    assert lr_factor("multistep", 8, 10) == pytest.approx(0.01)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5) and lr_factor("cosine", 10, 10) == pytest.approx(0)
    assert lr_factor("cyclic", 4, 10) == pytest.approx(1) and lr_factor("cyclic", 2, 10) == pytest.approx(0.5)
    assert lr_factor("warmup", 0.5, 10) == pytest.approx(0.5) and lr_factor("warmup", 2, 10) == 1
    assert lr_factor("cosine", 0.5, 10, warmup_epochs=1) == pytest.approx(0.5 * lr_factor("cosine", 0.5, 10))


def test_lamb_and_optimizers_train() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10))
    opt = LAMB([w], lr=0.05, weight_decay=0.01)
    start = float((w - 3).pow(2).sum().detach())
    for _ in range(50):
        opt.zero_grad()
        (w - 3).pow(2).sum().backward()
        opt.step()
    assert float((w - 3).pow(2).sum().detach()) < 0.2 * start
    for name in ("adam", "adamw", "lamb"):
        r = train(small(method="standard", optimizer=name, lr=1e-3, val_size=0, ema=0.9, grad_clip=1.0))
        assert math.isfinite(r.history[0]["loss"])


# -- files: sidecar, config, resume --------------------------------------------------------------


def test_sidecar_round_trip_with_tricks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = small(method="fgsm-at", tricks=["stride", "smooth-act"], normalize="0.5:0.25", out=str(out), seed=3)
    result = train(cfg)
    assert result.weights == out / "model.safetensors" and result.sidecar == out / "model.json"
    side = read_sidecar(result.weights)
    assert side is not None and side["model"] == "digits-cnn" and side["normalize"] == "0.5:0.25"
    assert side["seed"] == 3 and side["recipe"]["method"] == "fgsm-at" and side["versions"]["torch"]
    assert side["data"]["dataset"] == "digits" and side["data"]["n_examples"] == 256
    assert read_sidecar(tmp_path / "nothing.safetensors") is None
    x, _ = digits_batch(8)
    loaded = load_trained_model(result.weights)
    torch.testing.assert_close(loaded(x), result.model(x))
    name = sidecar_model_name(side)
    assert name.startswith("digits-cnn+stride2")
    again = load_model(name, result.weights, normalize=side["normalize"])
    torch.testing.assert_close(again(x), result.model(x))
    for f in ("metrics.csv", "metrics.json", "config.yaml", "checkpoint/state.json"):
        assert (out / f).is_file(), f
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "loss", "clean_acc", "pgd_acc", "co", "seconds"):
        assert col in header


def test_plain_sidecar_loads_with_load_model(tmp_path: Path) -> None:
    result = train(small(method="standard", out=str(tmp_path / "r")))
    side = read_sidecar(result.weights)
    assert side is not None and side["normalize"] == "none" and side["architecture"] == []
    assert sidecar_model_name(side) == "digits-cnn"
    x, _ = digits_batch(4)
    torch.testing.assert_close(load_model("digits-cnn", result.weights, normalize="none")(x), result.model(x))


def test_config_yaml_round_trip(tmp_path: Path) -> None:
    cfg = TrainConfig(method="fgsm-at", eps=8 / 255, tricks=["mask", "weight-reg"], epochs=3, ema=0.99,
                      model="preactresnet18", dataset="npz:x.npz", milestones=[0.3, 0.6])
    text = cfg.to_yaml()
    assert "eps: 8/255" in text
    assert TrainConfig.from_yaml(text) == cfg
    path = tmp_path / "train.yaml"
    path.write_text(text)
    assert TrainConfig.from_yaml(path) == cfg
    with pytest.raises(UsageError, match="Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_cli_dump_config_and_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "train", "fgsm-at", "--trick", "mask", "--trick", "weight-reg", "--eps", "8/255",
                           "--model", "preactresnet18", "--epochs", "7", "--dump-config")
    assert code == 0
    cfg = TrainConfig.from_yaml(out)
    assert cfg.method == "fgsm-at" and cfg.tricks == ["mask", "weight-reg"] and cfg.eps == 8 / 255
    assert cfg.epochs == 7 and cfg.model == "preactresnet18"
    path = tmp_path / "t.yaml"
    path.write_text(out)
    code, out2, _ = run_cli(capsys, "train", "--config", str(path), "--epochs", "2", "--dump-config")
    assert code == 0
    cfg2 = TrainConfig.from_yaml(out2)
    assert cfg2.epochs == 2 and cfg2.tricks == cfg.tricks and cfg2.method == "fgsm-at"


@pytest.mark.parametrize("args,fragment", [
    (["pgd-att"], "Unknown training method 'pgd-att'. Did you mean 'pgd-at'"),
    (["large-stride"], "not a training method"),
    (["fgsm-at", "--trick", "masks"], "Unknown trick 'masks'. Did you mean 'mask'"),
    (["fgsm-at", "--eps", "8"], "at most 1"),
    (["fgsm-at", "--eps", "eight"], "Cannot read eps"),
    (["fgsm-at", "--on-co", "panic"], "--on-co"),
    (["pgd-at", "--trick", "mask"], "fgsm-at or fgsm-rs"),
    (["fgsm-at", "--optimizer", "rmsprop"], "Unknown optimizer"),
    (["fgsm-at", "--eval", "autoattak"], "Unknown attack 'autoattak'"),
    ([], "Name a training method"),
])  # fmt: skip
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str],
                                 fragment: str) -> None:
    code, _, err = run_cli(capsys, "train", *args, "--out", str(tmp_path / "o"))
    assert code == 2, err
    assert err.startswith("Error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one sentence (rich may wrap it)
    assert fragment in " ".join(err.split())


def test_cli_trains_evaluates_and_refuses_to_overwrite(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "board.db"
    code, stdout, err = run_cli(capsys, "train", "fgsm-rs", "--n-examples", "128", "--epochs", "1", "--batch-size",
                                "64", "--val-size", "32", "--out", str(out), "--eval", "fgsm",
                                "--eval", "autoattack:apgd-ce", "--eval-n-examples", "50", "--db", str(db),
                                "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "PGD-10" in stdout and "--eval" in stdout and (out / "model.safetensors").is_file()
    from robustkit.results.leaderboard import Leaderboard

    frame = Leaderboard(db).frame()
    assert sorted(frame["attack"]) == ["autoattack:apgd-ce", "fgsm", "worst-case"]
    assert set(frame["n_examples"]) == {50}
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(out / "model.safetensors"), "--sha256", "0" * 64,
                           "--db", str(db), "--quiet")
    assert code == 1 and "expected 0000" in err
    code, _, err = run_cli(capsys, "train", "fgsm-rs", "--out", str(out), "--n-examples", "128")
    assert code == 2 and "--resume" in " ".join(err.split())


TRAIN_ARGS = ["train", "fgsm-rs", "--dataset", "digits", "--n-examples", "640", "--epochs", "3", "--batch-size",
              "32", "--val-size", "64", "--ema", "0.9", "--device", "cpu", "--quiet"]


def _cli_process(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ROBUSTKIT_DB": str(out) + ".db"}
    args = [sys.executable, "-m", "robustkit", *TRAIN_ARGS, "--out", str(out), *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ``python -m robustkit train`` process SIGKILLed after its first epoch checkpoint, rerun
    with --resume, ends with exactly the weights and metrics of an uninterrupted run."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _cli_process(killed)
    state = killed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert state.exists(), "the first epoch checkpoint never appeared"
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = _cli_process(killed, "--resume")
    code, _, err = run_cli(capsys, *TRAIN_ARGS, "--out", str(whole))  # the uninterrupted run, meanwhile
    assert code == 0, err
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def metrics(p: Path) -> list[list[str]]:
        rows = [r.split(",") for r in (p / "metrics.csv").read_text().splitlines()]
        drop = {rows[0].index(c) for c in ("seconds", "eval_seconds")}
        return [[v for i, v in enumerate(r) if i not in drop] for r in rows]

    assert metrics(killed) == metrics(whole)
