"""Distillation (robustkit.training.distill): a student learns from the packaged robust digits-cnn teacher,
the feature objectives decrease, the projections are trained, saved and reloaded (also across a
resume), pgd-at robust distillation runs, feature taps and input masking behave, errors are clear.

Fast: scikit-learn's 8x8 ``digits``, one thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkit.cli import main
from robustkit.errors import CheckpointError, UsageError
from robustkit.models import ModelInfo, ZooModel, load_model
from robustkit.models.sidecar import load_trained_model
from robustkit.training.distill import (
    DistillConfig,
    FeatureTap,
    Projections,
    distill,
    load_projections,
    load_teacher,
    mask_input,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw) -> DistillConfig:
    base = dict(dataset="digits", epochs=1, batch_size=64, val_size=256, device="cpu", schedule="constant",
                optimizer="adam", lr=1e-3, weight_decay=0.0)
    base.update(kw)
    return DistillConfig(**base)


def test_student_learns_from_the_teacher_without_labels() -> None:
    """ce_weight 0: the only signal is the teacher's soft labels (KD, T = 1)."""
    result = distill(cfg(objectives="kd", temperature=1.0, epochs=3))
    accs = [row["clean_acc"] for row in result.history]
    assert accs[-1] > 0.6, accs  # chance is 0.1
    assert result.history[-1]["loss_kd"] < result.history[0]["loss_kd"]
    x = load_model("digits-cnn")  # agreement with the teacher on held-out digits
    from robustkit.data import load_dataset

    test = load_dataset("digits", split="test")
    with torch.no_grad():
        agree = (result.model(test.x).argmax(1) == x(test.x).argmax(1)).float().mean()
    assert agree > 0.6


def test_feature_and_patch_objectives_decrease_with_masking() -> None:
    result = distill(cfg(objectives="feature,patch", student_mask_ratio=0.5, n_examples=512, epochs=3))
    first, last = result.history[0], result.history[-1]
    assert last["loss_feature"] < 0.7 * first["loss_feature"], (first, last)
    assert last["loss_patch"] < first["loss_patch"], (first, last)
    assert "loss_kd" not in last


def test_projections_are_trained_saved_and_reloaded(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = distill(cfg(objectives="kd,feature,patch", n_examples=256, out=str(out)))
    assert result.aux is not None and result.aux_weights == out / "projection.safetensors"
    assert isinstance(result.aux, Projections)
    # the projections are optimized with the student: Adam keeps a state for every one of their tensors
    opt = torch.load(out / "checkpoint" / "epoch-0001" / "optimizer.pt", weights_only=True)
    n_student, n_aux = len(list(result.model.parameters())), len(list(result.aux.parameters()))
    assert n_aux == 4 and len(opt["state"]) == n_student + n_aux
    loaded = load_projections(out)
    for k, v in result.aux.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k
    side = json.loads((out / "model.json").read_text())
    assert side["aux"]["file"] == "projection.safetensors"
    assert side["recipe"]["method"] == "standard" and side["recipe"]["distill"]["objectives"] == ["kd", "feature",
                                                                                                    "patch"]
    student = load_trained_model(out / "model.safetensors")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x), result.model(x))


def test_projections_survive_a_resume(tmp_path: Path) -> None:
    """Two epochs in one go = one epoch, then --resume for the second (projections included)."""
    kw = dict(objectives="kd,feature", n_examples=128, val_size=0, student_mask_ratio=0.25)
    whole = distill(cfg(epochs=2, out=str(tmp_path / "whole"), **kw))
    distill(cfg(epochs=1, out=str(tmp_path / "split"), **kw))
    assert (tmp_path / "split" / "checkpoint" / "epoch-0001" / "aux.safetensors").is_file()
    resumed = distill(cfg(epochs=2, out=str(tmp_path / "split"), resume=True, **kw))
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.aux is not None and whole.aux is not None
    for k, v in whole.aux.state_dict().items():
        assert torch.equal(v, resumed.aux.state_dict()[k]), k


def test_robust_distillation_with_pgd_at_and_a_mix(tmp_path: Path) -> None:
    result = distill(cfg(method="pgd-at", eps=0.1, attack_steps=3, n_examples=128, mix="cutmix",
                         out=str(tmp_path / "r")))
    (row,) = result.history
    assert all(row[k] == row[k] for k in ("loss", "loss_kd", "loss_feature", "pgd_acc"))
    side = json.loads((tmp_path / "r" / "model.json").read_text())
    assert side["recipe"]["method"] == "pgd-at" and side["recipe"]["steps"] == 3
    assert side["recipe"]["distill"]["teacher_input"] == "clean"


def test_a_student_of_other_widths_gets_fitting_projections() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 24), nn.ReLU(),
                        nn.Linear(24, 10))
    info = ModelInfo(lambda **_: net, None, (1, 8, 8), 10, "tiny test student")
    student = ZooModel("tiny", info, net)
    result = distill(cfg(objectives="kd,feature,patch", n_examples=128, val_size=0), model=student)
    assert result.aux is not None
    assert tuple(result.aux.feature.weight.shape) == (64, 24)  # student 24 -> teacher 64
    assert tuple(result.aux.patch.weight.shape) == (32, 8, 1, 1)  # 8x8x8 map -> teacher's 32x4x4
    assert result.history[0]["loss_patch"] == result.history[0]["loss_patch"]


def test_feature_tap_finds_the_head_input_and_the_last_map() -> None:
    model = load_model("digits-cnn")
    tap = FeatureTap(model, torch.rand(2, 1, 8, 8))
    assert tap.head is model.net[8] and tap.spatial is model.net[4]
    with tap.record() as f:
        logits = model(torch.rand(3, 1, 8, 8))
    assert f["feature"].shape == (3, 64) and f["patch"].shape == (3, 32, 4, 4)
    torch.testing.assert_close(model.net[8](f["feature"]), logits)
    model(torch.rand(5, 1, 8, 8))
    assert f["feature"].shape[0] == 3  # nothing recorded outside record()
    tap.remove()


def test_mask_input_masks_the_asked_share_of_patches() -> None:
    x = torch.rand(5, 1, 8, 8) + 0.01
    xm, mask = mask_input(x, 0.75, 2, torch.Generator().manual_seed(0))
    cells = mask[:, 0, ::2, ::2]
    assert (cells.sum((1, 2)) == 16 - int(16 * 0.25)).all()  # 12 of 16 cells per image
    assert torch.equal(xm == 0, mask.bool())
    assert torch.equal(xm[mask == 0], x[mask == 0])


def test_bad_teacher_and_options_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        load_teacher("digits-cnn", str(junk))
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher("digits-cnn", str(tmp_path / "missing.safetensors"))
    with pytest.raises(UsageError, match="teacher-checkpoint"):
        load_teacher("mnist-cnn-a", None)
    with pytest.raises(UsageError, match="objective"):
        cfg(objectives="kd,logits")
    with pytest.raises(UsageError, match="mask-ratio"):
        cfg(student_mask_ratio=1.0)
    for args, code in ((["--teacher-checkpoint", str(junk)], 1), (["--feature-loss", "l3"], 2),
                       (["--mix", "cutmx"], 2)):
        with pytest.raises(SystemExit) as exc:
            main(["train", "distill", "--n-examples", "64", "--epochs", "1", "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == code and len(err.splitlines()) == 1 and err.startswith("Error:"), err


def test_cli_distills_and_writes_the_projections(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exc:
        main(["train", "distill", "--teacher", "digits-cnn", "--student", "digits-cnn", "--n-examples", "128",
              "--epochs", "1", "--val-size", "64", "--objectives", "kd,patch", "--mask-ratio", "0.5",
              "--optimizer", "adam", "--lr", "1e-3", "--quiet", "--out", str(out)])
    cap = capsys.readouterr()
    assert exc.value.code == 0, cap.err
    assert (out / "projection.safetensors").is_file() and (out / "model.safetensors").is_file()
    assert "projection.safetensors" in cap.err
    config = DistillConfig.from_yaml(out / "config.yaml")
    assert config.objectives == ["kd", "patch"] and config.student_mask_ratio == 0.5
