"""RobustBench interoperability: its model zoo by name with weights in its on-disk layout (logits
equal to the model robustbench itself loads, normalization applied once), its model-info JSON
(export, --compare), and each user mistake as one sentence with a non-zero exit.

Tests that need the optional ``robustbench`` package skip with a reason when it is not installed
(``pip install -c constraints.txt -e ".[test,robustbench]"``); the JSON format tests do not need it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit.cli import main
from robustkit.errors import DependencyError, UsageError
from robustkit.models import load_model
from robustkit.results.leaderboard import Leaderboard, ResultRow


@pytest.fixture(scope="module")
def robustbench():
    """The robustbench package imported through robustkit, or skip saying how to install it."""
    from robustkit.models.robustbench_import import import_robustbench

    try:
        return import_robustbench()
    except DependencyError as exc:
        pytest.skip(f"needs the robustbench extra: {exc}")


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, " ".join(captured.err.split())  # rich may wrap long lines


def assert_one_sentence(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert err.startswith("Error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def random_weights(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and BatchNorm statistics, so that every weight matters in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return net.eval()


def save_in_layout(model_dir: Path, dataset: str, threat: str, name: str, wrapping: str, seed: int = 0) -> Path:
    """Write random weights for a zoo entry where RobustBench keeps them, as its files hold them:
    the normalization constants (mu/sigma) left out, optionally under 'state_dict' with DataParallel's
    'module.' prefix, or as {'last': ..., 'best': ...}."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    net = random_weights(model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]["model"](), seed)
    state = {k: v for k, v in net.state_dict().items() if k.rpartition(".")[2] not in ("mu", "sigma")}
    obj: object = {
        "plain": state,
        "module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "last": {"last": state, "best": {k: torch.zeros_like(v) for k, v in state.items()}},
    }[wrapping]
    path = model_dir / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


ZOO_CASES = [
    # (dataset, threat model, name, how the file wraps the weights): what the family covers
    ("cifar10", "Linf", "Wong2020Fast", "plain"),  # PreActResNet-18, CIFAR-10 mean/std as mu/sigma buffers
    ("cifar10", "Linf", "Rebuffi2021Fixing_R18_ddpm", "module"),  # DeepMind PreActResNet-18, non-persistent mean/std
    ("cifar10", "corruptions", "Hendrycks2020AugMix_WRN", "module"),  # WideResNet-40-2, (x - 0.5) / 0.5 inside
    ("cifar10", "Linf", "Andriushchenko2020Understanding", "last"),  # PreActResNet-18, no normalization
    pytest.param("cifar10", "Linf", "Carmon2019Unlabeled", "module", marks=pytest.mark.slow),  # WideResNet-28-10
]


def test_model_zoo_imports_through_robustkit(robustbench) -> None:
    import pyautoattack
    import robustbench.eval
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    assert "Carmon2019Unlabeled" in model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    assert robustbench.eval.AutoAttack is pyautoattack.AutoAttack  # the alias is the same module, not a copy
    assert "autoattack" not in sys.modules or sys.modules["autoattack"] is not pyautoattack  # alias removed again
    assert pyautoattack.__spec__.name == "pyautoattack"  # and the aliased module keeps its own identity


@pytest.mark.parametrize("dataset,threat,name,wrapping", ZOO_CASES)
def test_zoo_model_matches_robustbench(
    robustbench, tmp_path: Path, dataset: str, threat: str, name: str, wrapping: str
) -> None:
    from robustbench.utils import load_model as robustbench_load_model

    save_in_layout(tmp_path, dataset, threat, name, wrapping)
    ours = (
        load_model(f"robustbench:{name}", model_dir=tmp_path)
        if (dataset, threat) == ("cifar10", "Linf")
        else load_model(f"robustbench:{dataset}/{threat}/{name}", model_dir=tmp_path)
    )
    theirs = robustbench_load_model(name, model_dir=tmp_path, dataset=dataset, threat_model=threat)
    assert ours.name == f"robustbench:{dataset}/{threat}/{name}"
    assert ours.normalization is None  # the model normalizes inside; robustkit adds nothing in front
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, expected = ours(x), theirs(x)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="normalize twice"):
        load_model(f"robustbench:{dataset}/{threat}/{name}", model_dir=tmp_path, normalize="cifar10")


@pytest.fixture
def small_cifar(tmp_path: Path) -> Path:
    """Eight CIFAR-shaped images (uint8 NHWC) with labels, as an npz data set."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 8))
    return path


def test_eval_reads_weights_from_model_dir(
    robustbench, tmp_path: Path, small_cifar: Path, capsys: pytest.CaptureFixture
) -> None:
    from robustbench.utils import load_model as robustbench_load_model

    models = tmp_path / "models"
    save_in_layout(models, "cifar10", "Linf", "Wong2020Fast", "plain", seed=3)
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Wong2020Fast",
        "--dataset",
        f"npz:{small_cifar}",
        "--threat-model",
        "Linf",
        "--model-dir",
        str(models),
        "--attack",
        "fgsm",
        "--db",
        str(tmp_path / "board.db"),
        "--json",
    )
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["model"] == "robustbench:cifar10/Linf/Wong2020Fast"
    assert row["eps"] == pytest.approx(8 / 255)  # RobustBench's eps for cifar10 Linf
    with np.load(small_cifar) as f:
        x = torch.from_numpy(f["x"]).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(f["y"]).long()
    theirs = robustbench_load_model("Wong2020Fast", model_dir=models, dataset="cifar10", threat_model="Linf")
    with torch.no_grad():
        assert row["clean_acc"] == pytest.approx((theirs(x).argmax(1) == y).float().mean().item())

    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Wong2020Fast",
        "--dataset",
        f"npz:{small_cifar}",
        "--model-dir",
        str(models),
        "--normalize",
        "cifar10",
        "--db",
        str(tmp_path / "board.db"),
    )
    assert_one_sentence(code, err, 2, "normalizes its [0, 1] inputs inside the model", "normalize twice")


def test_list_models_from_robustbench(robustbench, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(
        capsys, "list", "models", "--source", "robustbench", "--dataset", "cifar10", "--threat-model", "Linf"
    )
    assert code == 0, err
    for name in ("Carmon2019Unlabeled", "Wong2020Fast", "Standard"):
        assert name in out


def test_unknown_zoo_name_has_a_did_you_mean(robustbench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Carmon2019Unlabeld",
        "--dataset",
        "cifar10",
        "--db",
        str(tmp_path / "board.db"),
    )
    assert_one_sentence(
        code,
        err,
        2,
        "Unknown RobustBench model 'Carmon2019Unlabeld' for cifar10 Linf",
        "Did you mean 'Carmon2019Unlabeled'?",
    )


def test_wrong_threat_model(robustbench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Carmon2019Unlabeled",
        "--dataset",
        "cifar10",
        "--threat-model",
        "L2",
        "--db",
        str(tmp_path / "board.db"),
    )
    assert_one_sentence(code, err, 2, "not in the cifar10 L2 zoo", "robustbench:cifar10/Linf/Carmon2019Unlabeled")


def test_unknown_threat_model_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Carmon2019Unlabeled",
        "--threat-model",
        "Linf2",
        "--db",
        str(tmp_path / "board.db"),
    )
    assert_one_sentence(code, err, 2, "Unknown RobustBench threat model 'Linf2'", "Linf, L2")


def test_missing_weights_say_where_and_how(
    robustbench, tmp_path: Path, small_cifar: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Carmon2019Unlabeled",
        "--dataset",
        f"npz:{small_cifar}",
        "--model-dir",
        str(tmp_path / "models"),
        "--db",
        str(tmp_path / "board.db"),
    )
    expected = tmp_path / "models" / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt"
    assert_one_sentence(
        code, err, 1, f"expected {expected}", "--download", "on a connected machine", "load_model('Carmon2019Unlabeled'"
    )


def test_without_the_extra_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "robustbench", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    code, _, err = run(capsys, "eval", "--model", "robustbench:Carmon2019Unlabeled", "--db", str(tmp_path / "b.db"))
    assert_one_sentence(code, err, 1, "optional package 'robustbench'", "pip install 'robustkit[robustbench]'")
    code, out, _ = run(capsys, "list", "models")  # everything else works as before
    assert code == 0 and "robustbench:NAME" in out


def test_core_never_imports_robustbench() -> None:
    code = (
        "import sys, robustkit, robustkit.cli, robustkit.evaluation.grid, robustkit.results.robustbench; "
        "from robustkit.catalog import catalog; catalog('models'); "
        "from robustkit.models import load_model; load_model('digits-cnn'); "
        "assert 'robustbench' not in sys.modules, 'robustbench imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


# ---- RobustBench's model-info JSON (no robustbench package needed) ----


def make_row(**changes) -> ResultRow:
    base = dict(
        model="robustbench:cifar10/Linf/Wong2020Fast",
        dataset="cifar10",
        n_examples=1000,
        norm="linf",
        eps=8 / 255,
        attack="autoattack",
        seed=0,
        clean_acc=0.8334,
        robust_acc=0.4321,
        seconds=1.0,
        robustkit_version="0",
        torch_version="0",
        device="cpu",
    )
    return ResultRow(**(base | changes))


@pytest.fixture
def board(tmp_path: Path) -> str:
    db = Leaderboard(tmp_path / "board.db")
    db.add(make_row())
    db.add(make_row(attack="pgd", robust_acc=0.5))  # AutoAttack's number is the one RobustBench reports
    db.add(make_row(model="resnet20", dataset="cifar10", attack="fgsm", clean_acc=0.9, robust_acc=0.25, n_examples=200))
    db.add(make_row(model="resnet20", dataset="cifar10", attack="fgsm", eps=2 / 255, robust_acc=0.6, n_examples=200))
    db.add(make_row(model="digits-cnn", dataset="digits", attack="pgd", eps=0.1))  # no RobustBench board: skipped
    return str(db.path)


def test_export_writes_robustbench_model_info(board: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "model_info"
    code, out, err = run(capsys, "leaderboard", "--db", board, "--format", "robustbench", "--output", str(out_dir))
    assert code == 0, err
    assert "skipped digits-cnn" in err
    wong = json.loads((out_dir / "cifar10" / "Linf" / "Wong2020Fast.json").read_text())
    # the field names and value style of robustbench's model_info/<dataset>/<threat_model>/<name>.json
    assert list(wong)[:13] == [
        "link",
        "name",
        "authors",
        "additional_data",
        "number_forward_passes",
        "dataset",
        "venue",
        "architecture",
        "eps",
        "clean_acc",
        "reported",
        "autoattack_acc",
        "footnote",
    ]
    assert (wong["dataset"], wong["eps"], wong["clean_acc"], wong["autoattack_acc"]) == (
        "cifar10",
        "8/255",
        "83.34",
        "43.21",
    )
    assert wong["footnote"] == "Evaluated with robustkit: on the first 1000 test points."
    resnet = json.loads((out_dir / "cifar10" / "Linf" / "resnet20.json").read_text())
    assert (resnet["eps"], resnet["autoattack_acc"]) == ("8/255", "25.0")  # RobustBench's eps, not 2/255
    assert "fgsm, not AutoAttack" in resnet["footnote"]
    assert sorted(p.name for p in out_dir.rglob("*.json")) == ["Wong2020Fast.json", "resnet20.json"]


def test_export_keeps_paper_metadata(board: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "model_info" / "cifar10" / "Linf" / "Wong2020Fast.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "name": "Fast is better than free",
                "venue": "ICLR 2020",
                "clean_acc": "83.34",
                "autoattack_acc": "43.21",
                "unreliable": False,
            }
        )
    )
    code, _, err = run(
        capsys, "leaderboard", "--db", board, "--format", "robustbench", "--output", str(tmp_path / "model_info")
    )
    assert code == 0, err
    info = json.loads(path.read_text())
    assert (info["name"], info["venue"], info["unreliable"], info["eps"]) == (
        "Fast is better than free",
        "ICLR 2020",
        False,
        "8/255",
    )


def test_exported_json_compares_with_zero_difference(board: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "model_info"
    assert run(capsys, "leaderboard", "--db", board, "--format", "robustbench", "--output", str(out_dir))[0] == 0
    code, out, err = run(capsys, "leaderboard", "--db", board, "--compare", str(out_dir), "--format", "json")
    assert code == 0, err
    lines = json.loads(out)
    assert sorted(line["model"] for line in lines) == ["Wong2020Fast", "resnet20"]
    for line in lines:
        assert line["clean_diff"] == 0 and line["robust_diff"] == 0, line
    code, out, err = run(capsys, "leaderboard", "--db", board, "--compare", str(out_dir / "cifar10"))  # rich table
    assert code == 0 and "Wong2020Fast" in out and "+0.00" in out, err


def test_compare_with_robustbench_numbers(board: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # RobustBench's own model_info/cifar10/Linf/Wong2020Fast.json (fields as published)
    path = tmp_path / "cifar10" / "Linf" / "Wong2020Fast.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "link": "https://arxiv.org/abs/2001.03994",
                "name": "Fast is better than free: Revisiting adversarial training",
                "authors": "Eric Wong, Leslie Rice, J. Zico Kolter",
                "additional_data": False,
                "number_forward_passes": 1,
                "dataset": "cifar10",
                "venue": "ICLR 2020",
                "architecture": "PreActResNet-18",
                "eps": "8/255",
                "clean_acc": "83.34",
                "reported": "46.06",
                "footnote": "Focuses on fast adversarial training.",
                "autoattack_acc": "43.21",
            }
        )
    )
    db = Leaderboard(board)
    db.add(make_row(clean_acc=0.8, robust_acc=0.4, n_examples=2000))  # the larger evaluation is the one compared
    code, out, err = run(capsys, "leaderboard", "--db", board, "--compare", str(path), "--format", "csv")
    assert code == 0, err
    header, line = out.strip().splitlines()
    values = dict(zip(header.split(","), line.split(","), strict=True))
    assert (values["clean_acc"], values["clean_acc_file"], values["clean_diff"]) == ("80.0", "83.34", "-3.34")
    assert (values["robust_acc"], values["robust_acc_file"], values["robust_diff"]) == ("40.0", "43.21", "-3.21")


def test_compare_missing_file_is_one_sentence(board: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "leaderboard", "--db", board, "--compare", str(tmp_path / "nope.json"))
    assert_one_sentence(code, err, 1, "No RobustBench model-info JSON at", "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, err = run(capsys, "leaderboard", "--db", board, "--compare", str(bad))
    assert_one_sentence(code, err, 1, "is not a RobustBench model-info JSON")


def test_robustbench_format_needs_a_folder(board: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "leaderboard", "--db", board, "--format", "robustbench")
    assert_one_sentence(code, err, 2, "give --output DIR")


def test_download_only_when_asked(
    robustbench, tmp_path: Path, small_cifar: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--download goes through RobustBench's own downloader (faked here: no network in tests)."""
    import robustbench.utils

    source = save_in_layout(tmp_path / "elsewhere", "cifar10", "Linf", "Wong2020Fast", "plain")
    calls = []

    def fake_download(gdrive_id: str, path: Path) -> None:
        calls.append(gdrive_id)
        Path(path).write_bytes(source.read_bytes())

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", fake_download)
    models = tmp_path / "models"
    model = load_model("robustbench:Wong2020Fast", model_dir=models, download=True)
    assert calls == [
        robustbench.model_zoo.model_dicts[robustbench.model_zoo.enums.BenchmarkDataset.cifar_10][
            robustbench.model_zoo.enums.ThreatModel.Linf
        ]["Wong2020Fast"]["gdrive_id"]
    ]
    assert model.checkpoint == str(models / "cifar10" / "Linf" / "Wong2020Fast.pt")

    def failing_download(gdrive_id: str, path: Path) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", failing_download)
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        "robustbench:Andriushchenko2020Understanding",
        "--dataset",
        f"npz:{small_cifar}",
        "--model-dir",
        str(models),
        "--download",
        "--db",
        str(tmp_path / "board.db"),
    )
    assert_one_sentence(
        code,
        err,
        1,
        "Downloading the RobustBench weights of Andriushchenko2020Understanding",
        "network unreachable",
        "on a connected machine",
    )
    assert not (models / "cifar10" / "Linf" / "Andriushchenko2020Understanding.pt").exists()
