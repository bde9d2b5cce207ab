"""The CLI end to end (in-process): the main job, list, leaderboard, and every user error as one
red sentence with the right exit code and no traceback."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from robustkit import __version__
from robustkit.cli import main
from robustkit.models import build_model
from robustkit.results.leaderboard import Leaderboard

from conftest import shared_file


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "board.db")


def assert_user_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    assert err.startswith("Error: "), err
    text = " ".join(err.split())  # rich may wrap long lines
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_version(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out


def test_list_models_has_at_least_ten(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "list", "models")
    assert code == 0
    for name in ("preactresnet18", "wrn-28-10", "wrn28", "resnet20", "digits-cnn", "timm:NAME"):
        assert name in out
    from robustkit.registry import MODELS

    assert len(MODELS.names()) >= 10


@pytest.mark.parametrize("what,expected", [("attacks", "pgd"), ("datasets", "cifar10"), ("defenses", "defenses")])
def test_list_other_registries(capsys: pytest.CaptureFixture, what: str, expected: str) -> None:
    code, out, _ = run(capsys, "list", what)
    assert code == 0 and expected in out


def test_list_defenses_shows_each_kind(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "list", "defenses")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert code == 0
    kinds = (rows["aaa"], rows["pgd-at"], rows["dual-bn"], rows["ops"])
    assert kinds == ("inference", "training", "architecture", "data")


def test_default_eval_writes_a_row_then_reports_it_exists(capsys: pytest.CaptureFixture, db: str) -> None:
    code, out, _ = run(capsys, "eval", "--db", db, "--quiet", "--n-examples", "100")
    assert code == 0
    assert "digits-cnn" in out and "clean acc" in out and "robust acc" in out
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "json", "--rows")
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["attack"] == "pgd" and rows[0]["n_examples"] == 100
    assert 0.9 <= rows[0]["clean_acc"] <= 1.0 and rows[0]["robust_acc"] < rows[0]["clean_acc"]
    code, out, err = run(capsys, "eval", "--db", db, "--quiet", "--n-examples", "100")
    assert code == 0 and "already in the leaderboard" in " ".join(err.split())
    code, out, _ = run(capsys, "eval", "--db", db, "--quiet", "--n-examples", "100", "--overwrite")
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "csv", "--rows")
    assert len(out.strip().splitlines()) == 2  # header + the one row, not duplicated


def test_training_split_and_another_normalization_are_cells_of_their_own(capsys: pytest.CaptureFixture,
                                                                        db: str) -> None:
    """A run on the training split, or with another normalization than the model's, is not the
    test-split run already stored: it is evaluated and stored beside it (it used to be reported as
    "already in the leaderboard", with the test split's numbers)."""
    base = ("eval", "--db", db, "--quiet", "--n-examples", "100")
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base, "--split", "train")
    assert code == 0 and "already" not in err
    assert run(capsys, *base, "--normalize", "none")[0] == 0
    code, _, err = run(capsys, *base, "--split", "train")
    assert code == 0 and "already in the leaderboard" in " ".join(err.split())
    rows = json.loads(run(capsys, "leaderboard", "--db", db, "--format", "json", "--rows")[1])
    cells = sorted((r["dataset"], r["defense"]) for r in rows)
    assert cells == [("digits", ""), ("digits", "normalize=none"), ("digits:train", "")]
    train = next(r for r in rows if r["dataset"] == "digits:train")
    test = next(r for r in rows if r["dataset"] == "digits" and not r["defense"])
    assert (train["clean_acc"], train["robust_acc"]) != (test["clean_acc"], test["robust_acc"])


def test_eval_json_and_fraction_eps(capsys: pytest.CaptureFixture, db: str) -> None:
    code, out, _ = run(
        capsys,
        "eval",
        "--db",
        db,
        "--json",
        "--n-examples",
        "50",
        "--attack",
        "fgsm,pgd",
        "--eps",
        "16/255",
        "--attack-kwargs",
        "pgd.steps=5",
    )
    assert code == 0, out
    rows = json.loads(out)
    assert [r["attack"] for r in rows] == ["fgsm", "pgd", "worst-case"]
    assert rows[2]["robust_acc"] <= min(rows[0]["robust_acc"], rows[1]["robust_acc"])
    assert rows[0]["eps"] == pytest.approx(16 / 255)


@pytest.mark.parametrize(
    "args,code,fragments",
    [
        (["--model", "resnet2O"], 2, ["Unknown model 'resnet2O'", "Did you mean", "'resnet20'"]),
        (["--attack", "pgdd"], 2, ["Unknown attack 'pgdd'", "'pgd'"]),
        (["--dataset", "cifar01"], 2, ["Unknown dataset 'cifar01'", "'cifar10'"]),
        (["--eps", "0"], 2, ["eps must be a positive number"]),
        (["--eps", "-8/255"], 2, ["eps must be a positive number"]),
        (["--eps", "8"], 2, ["at most 1", "8/255"]),
        (["--eps", "eight"], 2, ["Cannot read eps 'eight'"]),
        (["--n-examples", "5000"], 1, ["--n-examples 5000 is larger than the 500 test images of digits"]),
        (["--attack-kwargs", "stepz=3"], 2, ["No attack of this run (pgd) takes the option 'stepz'", "steps"]),
        (["--attack", "fgsm", "--attack-kwargs", "pgd.steps=3"], 2, ["pgd.steps: pgd is not in this run"]),
        (["--attack-kwargs", "steps=abc"], 2, ["The option steps of pgd takes an integer, got 'abc'"]),
        (["--attack-kwargs", "restarts=1.5"], 2, ["The option restarts of pgd takes an integer, got 1.5"]),
        (["--attack", "autoattack", "--attack-kwargs", "square.n_queries=x"], 2, ["n_queries of square in autoattack"]),
        (["--attack", "autoattack", "--attack-kwargs", "square.n_querie=3"], 2, ["no option 'n_querie'", "n_queries"]),
        (["--attack-kwargs", "seed=3"], 2, ["seeded from --seed"]),
        (["--model", "resnet20", "--dataset", "digits"], 1,
         ["takes 3-channel images", "(2, 1, 8, 8)", "never broadcasts grayscale"]),
        (
            ["--checkpoint", "/nonexistent/w.safetensors"],
            1,
            ["Checkpoint file not found", "/nonexistent/w.safetensors"],
        ),
    ],
)
def test_user_errors(capsys: pytest.CaptureFixture, db: str, args: list[str], code: int, fragments: list[str]) -> None:
    assert_user_error(*run(capsys, "eval", "--db", db, *args)[::2], code, *fragments)
    assert not Path(db).exists() or not Leaderboard(db).rows()  # nothing written


def test_a_plain_option_goes_to_the_attacks_that_take_it(capsys: pytest.CaptureFixture, db: str) -> None:
    code, _, err = run(capsys, "eval", "--db", db, "--attack", "fgsm,pgd", "--attack-kwargs", "steps=3",
                       "--n-examples", "20", "--quiet")
    assert code == 0, err
    configs = {r.attack: r.attack_config for r in Leaderboard(db).rows()}
    assert configs["pgd"]["steps"] == 3 and "steps" not in configs["fgsm"]


def test_dataset_missing_from_data_dir(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "eval", "--db", db, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet20"
    )
    assert_user_error(code, err, 1, "Dataset cifar10 (test) not found", "cifar-10-batches-py/test_batch")


def test_checkpoint_that_is_not_a_state_dict(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    code, _, err = run(capsys, "eval", "--db", db, "--checkpoint", str(path))
    assert_user_error(code, err, 1, "state dict")


def test_checkpoint_with_keys_that_do_not_fit(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    state = build_model("digits-cnn").state_dict()
    state.pop("8.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    code, _, err = run(capsys, "eval", "--db", db, "--checkpoint", str(path))
    assert_user_error(code, err, 1, "does not fit", "1 missing key", "8.bias", "1 unexpected key", "extra.weight")


def test_sha256_mismatch(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(build_model("digits-cnn").state_dict(), str(path))
    code, _, err = run(capsys, "eval", "--db", db, "--checkpoint", str(path), "--sha256", "0" * 64)
    assert_user_error(code, err, 1, "sha256")


@pytest.mark.parametrize(
    "x,fragment",
    [
        (np.full((4, 1, 8, 8), np.nan, dtype=np.float32), "NaN"),
        (np.full((4, 1, 8, 8), 1.5, dtype=np.float32), "must lie in [0, 1]"),
        (np.full((4, 1, 8, 8), np.inf, dtype=np.float32), "NaN or infinite"),
    ],
)
def test_bad_npz_inputs(capsys: pytest.CaptureFixture, db: str, tmp_path: Path, x: np.ndarray, fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.zeros(4, dtype=np.int64))
    code, _, err = run(capsys, "eval", "--db", db, "--dataset", f"npz:{path}")
    assert_user_error(code, err, 1, fragment)


@pytest.mark.parametrize("y,fragment", [(np.arange(4) - 20, "4 negative label(s) (smallest -20)"),
                                        (np.array([0, -1, 2, 3]), "1 negative label(s) (smallest -1)")])
def test_negative_labels(capsys: pytest.CaptureFixture, db: str, tmp_path: Path, y: np.ndarray, fragment: str) -> None:
    path = tmp_path / "neg.npz"
    np.savez(path, x=np.zeros((4, 8, 8), dtype=np.uint8), y=y)
    code, _, err = run(capsys, "eval", "--db", db, "--dataset", f"npz:{path}")
    assert_user_error(code, err, 1, "labels must be class indices", fragment)
    assert not Leaderboard(db).rows()


def test_model_that_does_not_fit_the_images(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((4, 32, 32, 3), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    code, _, err = run(capsys, "eval", "--db", db, "--dataset", f"npz:{path}")
    assert_user_error(code, err, 2, "cannot take", "(3, 32, 32)")


def test_leaderboard_exports_have_the_same_rows(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    run(
        capsys,
        "eval",
        "--db",
        db,
        "--quiet",
        "--n-examples",
        "40",
        "--attack",
        "fgsm,pgd",
        "--attack-kwargs",
        "pgd.steps=3",
    )
    for fmt, count in (("csv", 4), ("md", 5)):  # header (+ md rule) + fgsm, pgd, worst-case
        out_file = tmp_path / f"board.{fmt}"
        code, _, _ = run(capsys, "leaderboard", "--db", db, "--format", fmt, "--output", str(out_file), "--rows")
        assert code == 0 and len(out_file.read_text().strip().splitlines()) == count
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "html", "--rows")
    assert code == 0 and out.count("<tr") >= 4
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--rows")
    assert code == 0 and "fgsm" in out and "pgd" in out
    # the default view ranks the model: one row, its worst case and the attack that gave it
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "csv")
    (ranked_row,) = list(csv.DictReader(io.StringIO(out)))
    assert ranked_row["model"] == "digits-cnn" and ranked_row["rank"] == "1"
    assert ranked_row["attack@0.1"] in ("fgsm", "pgd-3", "worst-case")


def test_a_model_without_weights_is_flagged(capsys: pytest.CaptureFixture, db: str) -> None:
    data = shared_file("cifar10_test1000.npz")
    code, out, err = run(capsys, "eval", "--db", db, "--quiet", "--json", "--model", "resnet20", "--dataset",
                         f"npz:{data}", "--n-examples", "8")
    assert code == 0, err
    assert "randomly initialized" in " ".join(json.loads(out)[0]["warnings"])
    code, out, err = run(capsys, "eval", "--db", db, "--quiet", "--json", "--n-examples", "8")  # packaged weights
    assert code == 0, err
    assert "randomly initialized" not in " ".join(json.loads(out)[0]["warnings"])


def test_reading_commands_do_not_create_the_database(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    for command in (["leaderboard"], ["leaderboard", "--format", "csv"], ["plot"], ["report", "scaling"]):
        code, _, err = run(capsys, *command, "--db", str(missing))
        assert_user_error(code, err, 1, "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file/x.db", "file/sub/x.db"])
def test_db_under_a_file(capsys: pytest.CaptureFixture, tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("precious")
    code, _, err = run(capsys, "eval", "--db", str(tmp_path / where), "--n-examples", "10")
    assert_user_error(code, err, 2, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "precious"


@pytest.mark.parametrize("out,fragment", [("precious.txt", "is an existing file"),
                                          ("precious.txt/sub", "is a file, not a folder")])
def test_train_out_that_is_a_file(capsys: pytest.CaptureFixture, tmp_path: Path, out: str, fragment: str) -> None:
    (tmp_path / "precious.txt").write_text("precious")
    code, _, err = run(capsys, "train", "standard", "--epochs", "1", "--out", str(tmp_path / out))
    assert_user_error(code, err, 2, fragment)
    assert (tmp_path / "precious.txt").read_text() == "precious"


def test_resume_without_a_checkpoint_says_so(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "standard", "--epochs", "1", "--n-examples", "64", "--val-size", "32",
                       "--out", str(tmp_path / "run"), "--resume", "--quiet")
    assert code == 0, err
    assert "warning: --resume:" in err and "holds no checkpoint; starting a new run" in " ".join(err.split())


@pytest.mark.parametrize("args,dataset,eps", [
    (["--model", "wrn28"], "cifar10", "8/255"), (["--model", "resnet20", "--norm", "l2"], "cifar10", "0.5"),
    (["--model", "mnist-cnn-a"], "mnist", "0.3"), ([], "digits", "0.1"),
    (["--model", "resnet20", "--dataset", "npz:x.npz"], "npz:x.npz", "8/255"),
    (["--model", "digits-cnn", "--dataset", "npz:x.npz"], "npz:x.npz", "0.1"),
])
def test_data_and_radius_follow_the_model(capsys: pytest.CaptureFixture, args: list[str], dataset: str,
                                          eps: str) -> None:
    code, out, err = run(capsys, "eval", *args, "--dump-config")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["dataset"] == dataset and config["eps"] == [eps]


def test_missing_torchvision_data_says_how_to_get_it(capsys: pytest.CaptureFixture, db: str) -> None:
    code, _, err = run(capsys, "eval", "--db", db, "--model", "wrn28", "--attack", "square")
    assert_user_error(code, err, 2, "Dataset cifar10 is read from a folder", "--data-dir", "--download",
                      "--dataset npz:FILE")


def test_aliases_are_stored_under_the_registry_name(capsys: pytest.CaptureFixture) -> None:
    for alias in ("wrn28", "WRN-28-10"):
        code, out, _ = run(capsys, "eval", "--model", alias, "--dump-config")
        assert code == 0 and yaml.safe_load(out)["model"] == ["wrn-28-10"]
