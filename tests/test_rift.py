"""RiFT (robust critical fine-tuning): module robust criticality, fine-tuning one module, weight
interpolation, the selection rule, and `robustkit train rift` end to end.

Fast: the packaged adversarially trained ``digits-cnn`` on a few 8x8 digits; one real
adversarially trained CIFAR-10 model from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustkit.cli import main
from robustkit.data import Dataset, load_dataset
from robustkit.errors import UsageError
from robustkit.models import build_model, load_model
from robustkit.models.sidecar import load_trained_model
from robustkit.threat import ThreatModel
from robustkit.training.rift import (
    InterpolationPoint,
    RiftConfig,
    adversarial_set,
    candidate_modules,
    criticality_table,
    fine_tune_module,
    interpolate,
    least_critical,
    module_criticality,
    parse_alphas,
    robust_accuracy,
    run_rift,
    select_alpha,
)

from conftest import cifar10_test, shared_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    train = load_dataset("digits", split="train", n_examples=256)
    test = load_dataset("digits", split="test", n_examples=128)
    return train, test


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, " ".join(captured.err.split())


# -- criticality -----------------------------------------------------------------------------------


def test_criticality_per_module_nonnegative_and_weights_restored(digits: tuple[Dataset, Dataset]) -> None:
    model = load_model("digits-cnn")
    train, _ = digits
    x, y = train.x[:128], train.y[:128]
    x_adv = adversarial_set(model, x, y, ThreatModel("linf", 0.1), steps=5, step_size=0.03)
    assert ThreatModel("linf", 0.1).contains(x_adv, x).all()
    before = state(model)
    rows = criticality_table(model, x_adv, y, radius=0.1, epochs=2, batch_size=64)
    assert [r.module for r in rows] == candidate_modules(model) == ["0", "2", "6", "8"]
    for r in rows:
        assert r.mrc >= 0 and r.worst_loss >= r.base_loss
        assert 0 <= r.relative_norm <= 0.1 + 1e-6  # the ascent stays in the relative ball
        assert r.parameters == sum(p.numel() for p in model.net.get_submodule(r.module).parameters())
    # the ascent does find worse weights, and the modules differ in how much
    assert max(r.mrc for r in rows) > 0.05
    assert len({round(r.mrc, 6) for r in rows}) == len(rows)
    assert least_critical(rows) == min(rows, key=lambda r: r.mrc).module
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored bit for bit


def test_criticality_grows_with_the_radius(digits: tuple[Dataset, Dataset]) -> None:
    model = load_model("digits-cnn")
    train, _ = digits
    x_adv = adversarial_set(model, train.x[:96], train.y[:96], ThreatModel("linf", 0.1), steps=3, step_size=0.04)
    small = module_criticality(model, "6", x_adv, train.y[:96], radius=0.02, epochs=2)
    large = module_criticality(model, "6", x_adv, train.y[:96], radius=0.2, epochs=2)
    assert small.relative_norm <= 0.02 + 1e-6
    assert large.mrc > small.mrc


# -- fine-tuning and interpolation -----------------------------------------------------------------


def test_fine_tuning_touches_only_the_chosen_module(digits: tuple[Dataset, Dataset]) -> None:
    model = load_model("digits-cnn")
    train, test = digits
    at = state(model)
    ft, history = fine_tune_module(model, "2", train, val=test, epochs=2, batch_size=64, lr=0.05)
    assert len(history) == 2 and history[1]["lr"] == pytest.approx(0.005)  # x0.1 at half-time
    changed = {k for k in at if not torch.equal(at[k], ft[k])}
    assert changed == {"net.2.weight", "net.2.bias"}
    now = state(model)
    assert all(torch.equal(at[k], now[k]) for k in at if not k.startswith("net.2."))
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fine_tuning_keeps_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    model = load_model("resnet20", normalize="none")  # fresh weights; BatchNorm everywhere
    data = Dataset("random", torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,)), 10)
    at = state(model)
    ft, _ = fine_tune_module(model, "linear", data, epochs=1, batch_size=8, lr=0.1, augment="crop-flip")
    assert {k for k in at if not torch.equal(at[k], ft[k])} == {"net.linear.weight", "net.linear.bias"}


def test_interpolation_endpoints_and_midpoint() -> None:
    a = {"w": torch.randn(4, 3), "b": torch.randn(3), "same": torch.randn(5), "n": torch.tensor(3)}
    b = {"w": torch.randn(4, 3), "b": torch.randn(3), "same": a["same"].clone(), "n": torch.tensor(3)}
    a["w"][0, 0] = -0.0  # alpha 0 must not turn -0.0 into +0.0
    zero, one, half = interpolate(a, b, 0.0), interpolate(a, b, 1.0), interpolate(a, b, 0.5)
    for k in a:
        assert torch.equal(zero[k], a[k]) and torch.equal(one[k], b[k])
    assert torch.signbit(zero["w"][0, 0])
    assert torch.allclose(half["w"], (a["w"] + b["w"]) / 2)
    assert torch.equal(interpolate(a, b, 0.3)["same"], a["same"])  # unchanged tensors stay exact
    with pytest.raises(UsageError):
        interpolate(a, {"w": b["w"]}, 0.5)


def test_interpolation_at_zero_reproduces_the_at_model(digits: tuple[Dataset, Dataset]) -> None:
    model = load_model("digits-cnn")
    train, test = digits
    at = state(model)
    ft, _ = fine_tune_module(model, "8", train, epochs=1, batch_size=64, lr=0.1)
    model.load_state_dict(interpolate(at, ft, 0.0))
    again = load_model("digits-cnn")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(test.x), again(test.x))


# -- the selection rule ----------------------------------------------------------------------------


def test_selection_never_loses_robust_accuracy() -> None:
    pts = [InterpolationPoint(0.0, 0.60, 0.40), InterpolationPoint(0.5, 0.70, 0.39),
           InterpolationPoint(0.7, 0.65, 0.40), InterpolationPoint(1.0, 0.80, 0.30)]
    assert select_alpha(pts, 0.40) == 0.7
    assert [p.eligible for p in pts] == [True, False, True, False]
    assert select_alpha(pts, 0.40, tolerance=0.01) == 0.5
    assert select_alpha(pts[1:2], 0.40) is None  # nothing qualifies: keep the AT weights
    rng = random.Random(0)
    for _ in range(300):
        base = rng.random()
        pts = [InterpolationPoint(a / 10, rng.random(), rng.random()) for a in range(11)]
        alpha = select_alpha(pts, base)
        ok = [p for p in pts if p.robust_acc >= base]
        if alpha is None:
            assert not ok
            continue
        chosen = next(p for p in pts if p.alpha == alpha)
        assert chosen.robust_acc >= base
        assert chosen.clean_acc == max(p.clean_acc for p in ok)


def test_alpha_grid_parsing() -> None:
    assert parse_alphas("0:1:0.1") == [round(0.1 * i, 10) for i in range(11)]
    assert parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(UsageError):
        parse_alphas("0:1:0")
    with pytest.raises(UsageError):
        RiftConfig(alphas=[0.0, 1.5])


# -- the procedure and the CLI ---------------------------------------------------------------------


def test_run_rift_keeps_robust_accuracy_on_the_held_out_set(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    config = RiftConfig(mrc_size=64, mrc_epochs=1, epochs=2, lr=0.05, batch_size=64, alphas=[0.0, 0.5, 1.0],
                        attack_steps=5, device="cpu", val_size=len(test))
    result = run_rift(config, data=train, val=test)
    assert result.module == least_critical(result.criticality)
    assert [p.alpha for p in result.interpolation] == [0.0, 0.5, 1.0]
    assert result.interpolation[0].robust_acc == result.before["robust_acc"]
    assert result.after["robust_acc"] >= result.before["robust_acc"]
    assert result.after["clean_acc"] >= result.before["clean_acc"]
    # the reported numbers are those of the weights left in the model
    threat = ThreatModel("linf", 0.1)
    assert robust_accuracy(result.model, test, threat, torch.device("cpu"), steps=5) == result.after["robust_acc"]


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(digits: tuple[Dataset, Dataset], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped in the fine-tuning, then in the interpolation: each --resume reuses the finished
    stages (the criticality table is not recomputed) and ends with the weights and report of a
    run that was never stopped; a new run into the folder, or other options, are refused."""
    import robustkit.training.rift as rift

    train, test = digits
    options = dict(mrc_size=32, mrc_epochs=1, epochs=2, lr=0.05, batch_size=64, alphas=[0.0, 0.5, 1.0],
                   attack_steps=3, device="cpu", val_size=64)
    whole = run_rift(RiftConfig(**options, out=str(tmp_path / "whole")), data=train, val=test)
    out = str(tmp_path / "stopped")

    def stop(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(rift, "fine_tune_module", stop)
        with pytest.raises(KeyboardInterrupt):
            run_rift(RiftConfig(**options, out=out), data=train, val=test)
    with pytest.raises(UsageError, match="pass --resume"):
        run_rift(RiftConfig(**options, out=out), data=train, val=test)
    with pytest.raises(UsageError, match="differ"):
        run_rift(RiftConfig(**{**options, "lr": 0.1}, out=out, resume=True), data=train, val=test)
    calls = []
    real_interpolate = rift.interpolate
    with monkeypatch.context() as m:
        m.setattr(rift, "criticality_table", stop)  # stage 1 is read back, not recomputed
        def first_then_stop(*args: object) -> object:  # one interpolation point measured, then stopped
            if calls:
                stop()
            calls.append(args)
            return real_interpolate(*args)

        m.setattr(rift, "interpolate", first_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_rift(RiftConfig(**options, out=out, resume=True), data=train, val=test)
    assert sorted(p.name for p in (Path(out) / "rift-state").iterdir()) == [
        "criticality.json", "fine_tuned.safetensors", "interpolation.json", "state.json"]
    with monkeypatch.context() as m:
        m.setattr(rift, "criticality_table", stop)
        m.setattr(rift, "fine_tune_module", stop)  # stage 2 as well
        resumed = run_rift(RiftConfig(**options, out=out, resume=True), data=train, val=test)
    assert real_interpolate is rift.interpolate
    assert not (Path(out) / "rift-state").exists()
    for name in ("model.safetensors",):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(Path(out) / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    reports = [json.loads((folder / "rift.json").read_text()) for folder in (Path(out), tmp_path / "whole")]
    for report in reports:
        for epoch in report["fine_tune"]:
            epoch.pop("seconds")  # the one thing a resumed run may not repeat
    assert reports[0] == reports[1]
    assert (resumed.alpha, resumed.after) == (whole.alpha, whole.after)


def test_cli_end_to_end_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rift"
    code, stdout, stderr = run(capsys, "train", "rift", "--mrc-size", "64", "--mrc-epochs", "1", "--epochs", "1",
                               "--val-size", "64", "--attack-steps", "3", "--alphas", "0,0.5,1", "--device", "cpu",
                               "--out", str(out), "--quiet")
    assert code == 0, stderr
    assert "Module robust criticality of digits-cnn" in stdout and "Interpolation" in stdout
    for name in ("0", "2", "6", "8"):
        assert f"│ {name} " in stdout
    report = json.loads((out / "rift.json").read_text())
    assert len(report["criticality"]) == 4 and all(r["mrc"] >= 0 for r in report["criticality"])
    assert report["after"]["robust_acc"] >= report["before"]["robust_acc"]
    side = json.loads((out / "model.json").read_text())
    assert side["recipe"]["method"] == "rift" and side["model"] == "digits-cnn"
    model = load_trained_model(out / "model.safetensors")  # what `robustkit eval --checkpoint` loads
    assert model.name == "digits-cnn"
    code, stdout, stderr = run(capsys, "eval", "--checkpoint", str(out / "model.safetensors"), "--n-examples", "32",
                               "--db", str(tmp_path / "lb.db"))
    assert code == 0, stderr
    # a RiFT (or robustkit train) output is a valid input: the sidecar names the model
    code, stdout, stderr = run(capsys, "train", "rift", "--checkpoint", str(out / "model.safetensors"),
                               "--criticality-only", "--mrc-size", "16", "--mrc-epochs", "1", "--attack-steps", "1",
                               "--device", "cpu", "--quiet")
    assert code == 0 and "Module robust criticality of digits-cnn" in stdout, stderr
    code, _, stderr = run(capsys, "train", "rift", "--checkpoint", str(out / "model.safetensors"), "--out", str(out))
    assert code == 2 and "would overwrite the checkpoint" in stderr


def test_cli_criticality_only_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(capsys, "train", "rift", "--criticality-only", "--mrc-size", "32", "--mrc-epochs", "1",
                               "--attack-steps", "2", "--device", "cpu", "--quiet")
    assert code == 0, stderr
    assert "Least robust-critical module" in stderr and not any(tmp_path.iterdir())


def test_cli_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, stderr = run(capsys, "train", "rift", "--checkpoint", str(tmp_path / "missing.safetensors"))
    assert code == 1 and stderr.startswith("Error: Checkpoint file not found") and "Traceback" not in stderr
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("mnist-smallcnn").state_dict().items()}, str(other))
    code, _, stderr = run(capsys, "train", "rift", "--checkpoint", str(other))
    assert code == 1 and stderr.startswith("Error: Checkpoint does not fit digits-cnn") and "Traceback" not in stderr
    code, _, stderr = run(capsys, "train", "rift", "--module", "66", "--mrc-size", "8")
    assert code == 2 and "No Conv2d/Linear module '66'" in stderr and "Did you mean" in stderr
    code, _, stderr = run(capsys, "train", "rift", "--alphas", "0,2")
    assert code == 2 and "--alphas" in stderr
    stopped = tmp_path / "stopped"
    (stopped / "rift-state").mkdir(parents=True)
    (stopped / "rift-state" / "state.json").write_text(json.dumps({"key": "another run"}))
    code, _, stderr = run(capsys, "train", "rift", "--output", str(stopped), "--mrc-size", "8", "--device", "cpu")
    assert code == 2 and "holds an interrupted RiFT run" in stderr and "--resume" in stderr
    code, _, stderr = run(capsys, "train", "rift", "--output", str(stopped), "--resume", "--mrc-size", "8",
                          "--device", "cpu")
    assert code == 2 and "differ from those of the interrupted RiFT run" in stderr and "Traceback" not in stderr


# -- a real adversarially trained model ------------------------------------------------------------


def test_real_cifar_model_criticality_and_selection() -> None:
    """ERAN's PGD-trained ConvSmall (alpha-beta-CROWN): MRC per module on 64 CIFAR-10 test images;
    perturbing within 10% of a weight's norm hurts a robust model's adversarial loss."""
    model = load_model("cifar-conv-small", shared_file("models/abcrown_cifar_conv_small_pgd.pth"))
    x, y = cifar10_test(64)
    threat = ThreatModel("linf", 2 / 255)
    x_adv = adversarial_set(model, x, y, threat, steps=5, step_size=0.5 / 255)
    rows = criticality_table(model, x_adv, y, epochs=1, batch_size=64)
    assert [r.module for r in rows] == ["0", "2", "5", "7"]
    assert all(r.mrc > 0 for r in rows)
    assert rows[0].base_acc < (model(x).argmax(1) == y).float().mean()  # the examples are adversarial


def test_rift_is_a_training_defense_run_by_its_own_command() -> None:
    from robustkit.defenses import build_strategy, training_methods
    from robustkit.errors import UsageError
    from robustkit.threat import ThreatModel

    assert "rift" in training_methods()
    with pytest.raises(UsageError, match="robustkit train rift"):
        build_strategy("rift", ThreatModel("linf", 0.1))
