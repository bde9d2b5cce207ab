"""EVP visual prompting: the frozen backbone, the frame-only prompt, the two training tricks, the
label mapping, the prompt file and its sidecar, `robustkit train prompt` and `robustkit eval --prompt`.

Fast: a ResNet-20 (fresh weights, randomized BatchNorm statistics, so that a backbone left in
training mode would show) on a handful of 8x8 digits, and a tiny conv net where many steps are needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from robustkit.attacks.transfer import DIFGSM, diversify
from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.errors import CheckpointError, UsageError
from robustkit.models import load_model
from robustkit.models.prompted import (
    PromptedModel,
    default_prompt_size,
    frequency_label_map,
    load_prompted_model,
    read_prompt_sidecar,
    reference_lr,
    resolve_label_map,
)
from robustkit.threat import ThreatModel
from robustkit.training.prompt import PromptConfig, prompt_step, prompt_update, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 weights with BatchNorm running statistics far from their initial values."""
    from robustkit.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20")
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
    path = tmp_path_factory.mktemp("backbone") / "resnet20.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def resnet(path: Path) -> nn.Module:
    return load_model("resnet20", path)


def tiny(channels: int = 3, side: int = 16, classes: int = 10) -> PromptedModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * side * side, classes))
    return PromptedModel(net, input_size=(channels, side, side), prompt_size=3)


def digits(n: int, split: str = "train"):
    return load_dataset("digits", split=split, n_examples=n)


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, " ".join(captured.err.split())


# -- the model -------------------------------------------------------------------------------------


def test_backbone_bit_identical_after_training(backbone_file: Path) -> None:
    backbone = resnet(backbone_file)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config = PromptConfig(label_map="frequency", epochs=2, batch_size=8, val_size=0, device="cpu", diversity_prob=1.0)
    result = train_prompt(config, backbone=backbone, data=digits(16))
    after = result.model.backbone.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the backbone's weights or statistics moved"
    assert not any(p.requires_grad for p in result.model.backbone.parameters())
    assert all(p.grad is None for p in result.model.backbone.parameters())
    assert [name for name, p in result.model.named_parameters() if p.requires_grad] == ["frame"]
    assert result.model.frame.abs().sum() > 0  # the prompt did train
    assert result.history[-1]["diversified_steps"] == 2  # p = 1: every step


def test_an_interrupted_prompt_run_resumes_to_the_uninterrupted_prompt(backbone_file: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after its second epoch of four, then resumed: the same frame and history as a run
    that was never stopped (the data order and input diversity continue from the saved
    generators); a new run into the folder, or other options, are refused."""
    import robustkit.training.prompt as prompt

    options = dict(label_map="frequency", epochs=4, batch_size=8, device="cpu", diversity_prob=0.5)
    data, val = digits(24), digits(8, "test")
    whole = train_prompt(PromptConfig(**options, out=str(tmp_path / "whole")), backbone=resnet(backbone_file),
                         data=data, val=val)
    out = str(tmp_path / "stopped")
    calls: list[int] = []
    real_accuracy = prompt.accuracy

    def stop_in_third_epoch(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_accuracy(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(prompt, "accuracy", stop_in_third_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_prompt(PromptConfig(**options, out=out), backbone=resnet(backbone_file), data=data, val=val)
    with pytest.raises(UsageError, match="pass --resume"):
        train_prompt(PromptConfig(**options, out=out), backbone=resnet(backbone_file), data=data, val=val)
    with pytest.raises(UsageError, match="differ"):
        train_prompt(PromptConfig(**{**options, "diversity_prob": 0.6}, out=out, resume=True),
                     backbone=resnet(backbone_file), data=data, val=val)
    resumed = train_prompt(PromptConfig(**options, out=out, resume=True), backbone=resnet(backbone_file),
                           data=data, val=val)
    assert torch.equal(resumed.model.frame, whole.model.frame)
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (resumed, whole)]
    assert strip[0] == strip[1] and len(strip[0]) == 4
    assert not (Path(out) / "prompt-state").exists()


def test_prompt_only_touches_the_frame() -> None:
    model = tiny(side=16)
    with torch.no_grad():
        model.frame.copy_(torch.randn_like(model.frame) * 3)
    x = torch.rand(5, 1, 28, 28)
    z = model.compose(x)
    expected = F.interpolate(x.expand(-1, 3, -1, -1), size=(10, 10), mode="bilinear", align_corners=False,
                             antialias=True)
    assert z.shape == (5, 3, 16, 16)
    assert torch.equal(z[:, :, 3:13, 3:13], expected)  # the shrunk image, exactly
    canvas = model.canvas()
    assert torch.equal(canvas[:, 3:13, 3:13], torch.zeros(3, 10, 10))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:13, 3:13] = True
    assert torch.equal(z[:, :, ~inside], canvas[:, ~inside].expand(5, -1, -1))  # the frame, the same for all
    assert model.trainable_parameters() == 3 * (16 * 16 - 10 * 10)


def test_training_steps_leave_the_image_region_alone() -> None:
    model = tiny(side=16)
    x, y = torch.rand(4, 3, 10, 10), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        prompt_step(model, x, y, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(model.compose(x)[:, :, 3:13, 3:13], x)  # already the inner size: untouched
    assert model.canvas().abs().sum() > 0


def test_grad_norm_gives_an_update_of_norm_lr() -> None:
    model = tiny()
    x, y = torch.rand(6, 3, 16, 16), torch.randint(0, 10, (6,))
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), model.frame)
    for lr in (0.5, 7.0):
        update = prompt_update(grad, lr, grad_norm=True)
        assert math.isclose(float(update.norm()), lr, rel_tol=1e-5)
        assert torch.allclose(update / lr, grad / grad.norm())  # the gradient's direction
    assert torch.equal(prompt_update(grad, 0.5, grad_norm=False), 0.5 * grad)  # plain SGD
    assert torch.equal(prompt_update(torch.zeros(3, 4), 1.0), torch.zeros(3, 4))

    frame = model.frame.detach().clone()
    step = prompt_step(model, x, y, 2.0, torch.Generator().manual_seed(0), input_diversity=False)
    assert math.isclose(float((frame - model.frame.detach()).norm()), 2.0, rel_tol=1e-5)
    assert torch.allclose(step.update, 2.0 * grad / grad.norm(), atol=1e-6)
    plain = tiny()
    prompt_step(plain, x, y, 2.0, torch.Generator().manual_seed(0), input_diversity=False, grad_norm=False)
    assert torch.allclose(frame - plain.frame.detach(), 2.0 * grad, atol=1e-7)


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_input_diversity_applied_with_its_probability(prob: float) -> None:
    model, x, y = tiny(), torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(0)
    n = 400
    applied = sum(prompt_step(model, x, y, 0.01, gen, diversity_prob=prob).diversified for _ in range(n))
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(applied - n * prob) <= 4 * sigma + 1e-9
    off = sum(prompt_step(model, x, y, 0.01, gen, input_diversity=False, diversity_prob=1.0).diversified
              for _ in range(20))
    assert off == 0


def test_input_diversity_is_the_transfer_attacks_transform() -> None:
    z = torch.rand(3, 3, 32, 32)
    ours, applied = diversify(z, torch.Generator().manual_seed(4), prob=1.0, resize_rate=0.9)
    attack = DIFGSM(ThreatModel("linf", 0.03), diversity_prob=1.0)
    theirs, _ = attack.diversify(z, torch.Generator().manual_seed(4))
    assert applied and torch.equal(ours, theirs) and ours.shape == z.shape and not torch.equal(ours, z)


def test_training_without_input_diversity_never_applies_it(backbone_file: Path) -> None:
    config = PromptConfig(label_map="frequency", epochs=1, batch_size=8, val_size=0, device="cpu",
                          input_diversity=False, diversity_prob=1.0, grad_norm=False, lr=1.0)
    result = train_prompt(config, backbone=resnet(backbone_file), data=digits(16))
    assert result.history[0]["diversified_steps"] == 0


# -- label mapping -----------------------------------------------------------------------------------


def test_frequency_label_map_is_the_per_class_mode() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([4, 4, 1, 3, 3, 0, 0, 4])
    assert frequency_label_map(preds, labels, 3, 5).tolist() == [4, 3, 0]
    # classes 0 and 1 both prefer source 4; class 1 wants it more, so class 0 takes its next best (2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    preds = torch.tensor([4, 4, 2, 2, 4, 4, 4, 4, 1])
    mapping = frequency_label_map(preds, labels, 2, 5)
    assert mapping.tolist() == [2, 4] and len(set(mapping.tolist())) == 2
    with pytest.raises(UsageError, match="one-to-one"):
        frequency_label_map(preds, labels, 6, 5)


def test_label_map_choice() -> None:
    assert resolve_label_map("auto", 1000, 10) == "frequency"
    assert resolve_label_map("auto", 10, 10) == "identity"
    assert resolve_label_map("frequency", 10, 10) == "frequency"
    with pytest.raises(UsageError, match="fewer than the dataset's 100"):
        resolve_label_map("auto", 10, 100)


def test_reference_defaults() -> None:
    assert default_prompt_size(224) == 30 and default_prompt_size(32) == 4
    assert math.isclose(reference_lr(3 * (224 * 224 - 164 * 164)), 70.0)


# -- files, eval, CLI ----------------------------------------------------------------------------------


def test_sidecar_round_trip(backbone_file: Path, tmp_path: Path) -> None:
    config = PromptConfig(checkpoint=str(backbone_file), label_map="frequency", epochs=1, batch_size=8,
                          val_size=0, device="cpu", out=str(tmp_path / "run"))
    result = train_prompt(config, backbone=resnet(backbone_file), data=digits(16))
    assert result.weights == tmp_path / "run" / "prompt.safetensors" and result.sidecar.name == "prompt.json"
    side = read_prompt_sidecar(result.weights)
    assert side["format"] == "robustkit-prompt/1" and side["method"] == "evp"
    assert side["backbone"]["model"] == "resnet20"
    assert side["backbone"]["checkpoint"] == str(backbone_file.resolve())
    assert side["prompt_size"] == 4 and side["inner_size"] == [24, 24] and side["trainable_parameters"] == 1344
    assert side["label_map"] == result.model.label_map.tolist() and side["label_map_kind"] == "frequency"
    assert side["recipe"]["input_diversity"] and side["recipe"]["grad_norm"]
    loaded = load_prompted_model(result.weights)  # the backbone from the sidecar
    x = digits(8, "test").x
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert torch.equal(loaded.frame, result.model.frame)


def test_train_prompt_cli_and_eval_with_an_attack(backbone_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out, db = tmp_path / "evp", str(tmp_path / "board.db")
    code, _, err = run(capsys, "train", "prompt", "--model", "resnet20", "--checkpoint", str(backbone_file),
                       "--dataset", "digits", "--n-examples", "16", "--epochs", "1", "--batch-size", "8",
                       "--val-size", "8", "--label-map", "frequency", "--out", str(out), "--quiet")
    assert code == 0, err
    prompt = out / "prompt.safetensors"
    assert prompt.is_file() and json.loads((out / "prompt.json").read_text())["recipe"]["epochs"] == 1
    code, stdout, err = run(capsys, "eval", "--prompt", str(prompt), "--dataset", "digits", "--n-examples", "8",
                            "--attack", "fgsm", "--eps", "0.1", "--db", db, "--quiet", "--json")
    assert code == 0, err
    rows = json.loads(stdout)
    assert len(rows) == 1 and rows[0]["model"] == "resnet20" and rows[0]["defense"].startswith("prompt@")
    assert rows[0]["robust_acc"] <= rows[0]["clean_acc"]
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--checkpoint", str(backbone_file), "--prompt",
                       str(prompt), "--dataset", "digits", "--n-examples", "8", "--attack", "pgd", "--eps", "0.1",
                       "--attack-kwargs", "steps=2", "--db", db, "--quiet")
    assert code == 0, err


def test_attack_sees_the_target_images(backbone_file: Path) -> None:
    from robustkit.attacks import PGD

    model = PromptedModel(resnet(backbone_file), input_size=(3, 32, 32), prompt_size=4)
    x, y = digits(4, "test").x, digits(4, "test").y
    result = PGD(ThreatModel("linf", 0.1), steps=2)(model, x, y)
    assert result.x_adv.shape == x.shape and 0 <= result.x_adv.min() and result.x_adv.max() <= 1
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert model.frame.grad is None and all(p.grad is None for p in model.backbone.parameters())


def test_prompt_size_too_large(backbone_file: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match="leaves no room for the image"):
        PromptedModel(resnet(backbone_file), input_size=(3, 32, 32), prompt_size=16)
    code, _, err = run(capsys, "train", "prompt", "--model", "resnet20", "--checkpoint", str(backbone_file),
                       "--dataset", "digits", "--n-examples", "8", "--epochs", "1", "--prompt-size", "30",
                       "--quiet", "--out", str(backbone_file.parent / "never"))
    assert code == 2 and "Traceback" not in err
    assert "--prompt-size 30 leaves no room for the image in the backbone's 32x32 input; use at most 15" in err


def test_missing_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="Prompt file not found"):
        load_prompted_model(missing)
    code, _, err = run(capsys, "eval", "--prompt", str(missing), "--dataset", "digits", "--db",
                       str(tmp_path / "b.db"))
    assert code == 1 and err.startswith("Error: Prompt file not found") and "Traceback" not in err
    bare = tmp_path / "bare.safetensors"
    save_file({"frame": torch.zeros(3, 4)}, str(bare))
    with pytest.raises(CheckpointError, match="has no sidecar bare.json"):
        load_prompted_model(bare)


def test_prompt_on_other_backbone_weights(backbone_file: Path, tmp_path: Path) -> None:
    config = PromptConfig(checkpoint=str(backbone_file), label_map="frequency", epochs=1, batch_size=8,
                          val_size=0, device="cpu", out=str(tmp_path / "run"))
    result = train_prompt(config, backbone=resnet(backbone_file), data=digits(8))
    other = tmp_path / "other.safetensors"
    state = resnet(backbone_file).net.state_dict()
    state["linear.bias"] = state["linear.bias"] + 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    with pytest.raises(UsageError, match="other backbone weights"):
        load_prompted_model(result.weights, backbone=load_model("resnet20", other))
