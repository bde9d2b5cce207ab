"""The evaluation pipeline: grids and configs, worst case, records, adversarial examples, resume
after kill -9, sharded torchrun runs, diagnostics and plots."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from robustkit import ThreatModel, distributed
from robustkit.attacks import PGD
from robustkit.cli import main
from robustkit.evaluation import diagnostics as diag
from robustkit.evaluation.grid import EvalSpec, run_grid
from robustkit.evaluation.records import read_records
from robustkit.evaluation.runner import _clock
from robustkit.registry import ATTACKS
from robustkit.results.leaderboard import Leaderboard

from conftest import shared_file


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def robustkit_cmd(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "robustkit", *args]


def test_grid_two_models_two_attacks_two_eps_worst_case(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    data = shared_file("cifar10_test1000.npz")
    models = shared_file("models")
    db = str(tmp_path / "b.db")
    code, out, err = cli(capsys, "eval", "--db", db, "--json", "--model", "resnet20,resnet4b",
                         "--checkpoint", f"{models}/resnet20-12fca82f.th,{models}/abcrown_resnet4b.pth",
                         "--dataset", f"npz:{data}", "--n-examples", "24", "--attack", "fgsm,pgd",
                         "--attack-kwargs", "pgd.steps=5", "--eps", "2/255,8/255", "--records", str(tmp_path / "rec"),
                         "--save-adv", str(tmp_path / "adv"))
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * 3  # models × eps × (fgsm, pgd, worst-case)
    for model in ("resnet20", "resnet4b"):
        for eps in (2 / 255, 8 / 255):
            cell = {r["attack"]: r for r in rows if r["model"] == model and abs(r["eps"] - eps) < 1e-9}
            assert cell["worst-case"]["robust_acc"] <= min(cell["fgsm"]["robust_acc"], cell["pgd"]["robust_acc"])
            records = read_records(cell["pgd"]["extra"]["records"])
            assert len(records) == 24
            worst = (records["clean_pred"] == records["label"]) & ~records["success_fgsm"] & ~records["success_pgd"]
            assert worst.mean() == pytest.approx(cell["worst-case"]["robust_acc"])
            assert (records["norm_pgd"] <= eps + 1e-6).all()
            adv = load_file(cell["pgd"]["extra"]["adversarial_examples"])
            assert adv["x_adv"].shape == (24, 3, 32, 32)
            final_ok = records["final_pred"] == records["label"]
            assert (final_ok | ~records["robust"]).all()
    # the robust model is more robust than the standard one at 2/255
    acc = {(r["model"], r["attack"]): r["robust_acc"] for r in rows if abs(r["eps"] - 2 / 255) < 1e-9}
    assert acc[("resnet4b", "worst-case")] > acc[("resnet20", "worst-case")]
    # exports hold the same rows
    for fmt, extra_lines in (("csv", 1), ("md", 2)):
        code, text, _ = cli(capsys, "leaderboard", "--db", db, "--format", fmt, "--rows")
        assert len(text.strip().splitlines()) == 12 + extra_lines
    code, text, _ = cli(capsys, "leaderboard", "--db", db, "--format", "json", "--rows")
    assert len(json.loads(text)) == 12
    # the ranked view: one row per model, resnet4b (robust) first at the standard radius 8/255
    code, text, _ = cli(capsys, "leaderboard", "--db", db, "--format", "json")
    (group,) = json.loads(text)
    assert group["ranking_eps"] == "8/255" and group["standard_eps"]
    assert [r["model"] for r in group["rows"]] == ["resnet4b", "resnet20"]
    for r in group["rows"]:
        cell = {x["attack"]: x for x in rows if x["model"] == r["model"] and abs(x["eps"] - 8 / 255) < 1e-9}
        assert r["robust"]["8/255"]["robust_acc"] == cell["worst-case"]["robust_acc"]
    # each row tells its checkpoint apart by file name (extra["checkpoint"], results/labels.py)
    paths = {f"{models}/resnet20-12fca82f.th", f"{models}/abcrown_resnet4b.pth"}
    assert {r["extra"]["checkpoint"] for r in rows} == paths
    code, text, _ = cli(capsys, "leaderboard", "--db", db, "--rows", "--format", "md")
    assert "resnet20-12fca82f" in text and "abcrown_resnet4b" in text


def test_config_round_trip(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, text, _ = cli(capsys, "eval", "--dump-config", "--model", "resnet20,resnet32", "--eps", "2/255,8/255",
                        "--attack", "fgsm,pgd", "--attack-kwargs", "pgd.steps=20", "--n-examples", "10")
    assert code == 0 and "8/255" in text
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    spec = EvalSpec.from_yaml(path)
    assert spec.model == ["resnet20", "resnet32"] and spec.eps == [2 / 255, 8 / 255]
    assert spec.attack_kwargs == {"pgd.steps": 20} and spec.n_examples == 10
    code, again, _ = cli(capsys, "eval", "--dump-config", "--config", str(path))
    assert again == text
    path.write_text("modle: resnet20\n")
    code, _, err = cli(capsys, "eval", "--config", str(path))
    assert code == 2 and "Unknown keys" in err and "modle" in err


def test_library_grid_and_existing_rows(tmp_path: Path) -> None:
    spec = EvalSpec(n_examples=40, attack=["fgsm"], eps=[0.05, 0.2], batch_size=16)
    first = run_grid(spec, db=tmp_path / "b.db")
    assert [len(c.rows) for c in first] == [1, 1]
    again = run_grid(spec, db=tmp_path / "b.db")
    assert [len(c.rows) for c in again] == [0, 0] and [len(c.existing) for c in again] == [1, 1]
    assert first[1].rows[0].robust_acc <= first[0].rows[0].robust_acc


def test_batch_size_is_part_of_the_cell(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    spec = EvalSpec(n_examples=30, attack=["fgsm", "pgd"], attack_kwargs={"pgd.steps": 3}, eps=[0.1], batch_size=10)
    first = run_grid(spec, db=db)[0]
    assert [r.attack_config["batch_size"] for r in first.rows] == [10, 10, 10]  # fgsm, pgd, worst-case
    other = run_grid(dataclasses.replace(spec, batch_size=16), db=db)[0]
    assert len(other.rows) == 3 and not other.existing  # another batch size is another cell
    again = run_grid(spec, db=db)[0]
    assert not again.rows and again.existing == first.rows  # the same batch size reuses the rows
    assert len(Leaderboard(db).rows()) == 6


def test_random_weights_are_drawn_from_the_seed(tmp_path: Path) -> None:
    data = shared_file("cifar10_test1000.npz")

    def run(seed: int) -> tuple[float, list[int], list[int]]:
        spec = EvalSpec(model=["resnet20"], dataset=f"npz:{data}", n_examples=40, attack=["fgsm"], eps=[2 / 255],
                        seed=seed)
        cell = run_grid(spec, db=tmp_path / "b.db", overwrite=True)[0]
        assert "randomly initialized" in cell.warnings[0]
        records = read_records(cell.records)
        return cell.rows[0].clean_acc, records["clean_pred"].tolist(), records["final_pred"].tolist()

    first = run(0)
    assert run(0) == first  # --overwrite recomputes the same numbers
    assert run(1) != first


def _run_digits(db: Path, *extra: str) -> subprocess.Popen:
    args = robustkit_cmd("eval", "--db", str(db), "--quiet", "--json", "--batch-size", "20", "--attack", "pgd",
                         "--attack-kwargs", "steps=40", "--eps", "0.15", *extra)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_kill_gives_identical_numbers(tmp_path: Path) -> None:
    killed_db, clean_db = tmp_path / "killed" / "b.db", tmp_path / "clean" / "b.db"
    proc = _run_digits(killed_db)
    runs = killed_db.parent / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(runs.glob("*/*/batch_*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(runs.glob("*/*/batch_*.npz")))
    assert 3 <= done_before < 25, "the run was not interrupted in the middle"
    assert Leaderboard(killed_db).rows() == []
    resumed = _run_digits(killed_db)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    uninterrupted = _run_digits(clean_db)
    ref, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    a, b = json.loads(out)[0], json.loads(ref)[0]
    assert (a["clean_acc"], a["robust_acc"]) == (b["clean_acc"], b["robust_acc"])
    assert len(Leaderboard(killed_db).rows()) == 1
    assert read_records(a["extra"]["records"]).equals(read_records(b["extra"]["records"]))
    assert not list(runs.glob("*/*/batch_*.npz")), "the batch store is cleared once the rows are written"


def test_two_identical_evals_at_once_share_the_work(tmp_path: Path) -> None:
    args = ["--n-examples", "60", "--batch-size", "10", "--attack-kwargs", "steps=10", "--eps", "0.1,0.2"]
    db = tmp_path / "b.db"
    procs = [_run_digits(db, *args), _run_digits(db, *args)]  # two processes, the same cells, started together
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(json.loads(out))
    alone = _run_digits(tmp_path / "alone" / "b.db", *args)
    ref, err = alone.communicate(timeout=300)
    assert alone.returncode == 0, err
    rows = Leaderboard(db).rows()
    assert sorted(r.eps for r in rows) == [0.1, 0.2]  # one row per cell
    numbers = {(r["eps"], r["clean_acc"], r["robust_acc"]) for r in json.loads(ref)}
    for out in outs:  # both report the rows that were computed once, with a single run's numbers
        assert {(r["eps"], r["clean_acc"], r["robust_acc"]) for r in out} == numbers
        assert {r["timestamp"] for r in out} == {r.timestamp for r in rows}
    assert not list((tmp_path / "runs").glob("*/*/batch_*.npz"))


def test_two_databases_in_one_folder_have_their_own_batch_caches(tmp_path: Path) -> None:
    spec = EvalSpec(n_examples=20, attack=["fgsm"], eps=[0.1], batch_size=10)
    run_grid(spec, db=tmp_path / "a.db")
    run_grid(spec, db=tmp_path / "b.db")
    caches = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(caches) == 2 and caches[0].startswith("a-") and caches[1].startswith("b-")


def test_sharded_run_equals_single_process(tmp_path: Path) -> None:
    single = _run_digits(tmp_path / "one" / "b.db", "--n-examples", "200")
    ref, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "robustkit", "eval", "--db", str(tmp_path / "two" / "b.db"), "--quiet", "--json",
                "--batch-size", "20", "--attack", "pgd", "--attack-kwargs", "steps=40", "--eps", "0.15",
                "--n-examples", "200"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    rows = Leaderboard(tmp_path / "two" / "b.db").rows()
    assert len(rows) == 1
    b = json.loads(ref)[0]
    assert (rows[0].clean_acc, rows[0].robust_acc) == (b["clean_acc"], b["robust_acc"])
    assert read_records(rows[0].extra["records"]).equals(read_records(b["extra"]["records"]))


SLOW_S, TIMEOUT_S = 12.0, 8.0  # rank 0's one batch takes longer than --dist-timeout


class SlowOnRank0(PGD):
    """PGD that sleeps on rank 0 of two workers (so rank 1, which has no batch, would wait for it)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: object):  # noqa: ANN204
        if distributed.world() == (0, 2):
            time.sleep(SLOW_S)
        return super().__call__(model, x, y, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, port: int, db: str, spec: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    ATTACKS.add("slow-pgd", SlowOnRank0)
    run_grid(EvalSpec(**spec), db=db)


def test_a_worker_without_batch_does_not_wait_for_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers, one batch: rank 1 has none. It must not sit in a collective while rank 0 works
    (longer than --dist-timeout here), and the rows equal those of one process."""
    spec = dict(n_examples=15, batch_size=20, attack=["slow-pgd"], attack_kwargs={"steps": 10}, eps=[0.15],
                device="cpu", dist_timeout=TIMEOUT_S)
    mp.start_processes(_sharded_worker, args=(_free_port(), str(tmp_path / "two" / "b.db"), spec), nprocs=2,
                       start_method="spawn")
    monkeypatch.setitem(ATTACKS._items, "slow-pgd", SlowOnRank0)
    one = run_grid(EvalSpec(**spec), db=tmp_path / "one" / "b.db")[0].rows
    two = Leaderboard(tmp_path / "two" / "b.db").rows()
    assert len(one) == len(two) == 1 and two[0].n_examples == 15
    assert (two[0].clean_acc, two[0].robust_acc) == (one[0].clean_acc, one[0].robust_acc)
    assert two[0].seconds >= SLOW_S  # rank 0's time is in the row
    assert read_records(two[0].extra["records"]).equals(read_records(one[0].extra["records"]))


class Softmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


class NoisyInEval(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.01 * torch.randn_like(x))


class DropoutInEval(nn.Module):
    """Dropout that stays on in eval mode (a randomized defense by accident)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.nn.functional.dropout(x, 0.1, training=True))


class WithFeatures(nn.Module):
    """Returns (logits, features), as models with auxiliary outputs do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x.flatten(1)


class Quantized(nn.Module):
    """Rounds its input: zero gradients everywhere (classic gradient masking)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


@pytest.fixture(scope="module")
def digits_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from robustkit.data import load_dataset
    from robustkit.models import load_model

    model = load_model("digits-cnn")
    data = load_dataset("digits", n_examples=64)
    with torch.no_grad():
        ok = model(data.x).argmax(1) == data.y
    return model, data.x[ok], data.y[ok]


def test_batch_timers_wait_for_cuda_work(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    _clock(torch.device("cpu"))
    assert waited == []  # no effect on CPU
    _clock(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


def test_sanity_checks_are_silent_on_a_clean_model(digits_batch: tuple) -> None:
    model, x, y = digits_batch
    threat = ThreatModel("linf", 0.1)
    assert diag.sanity_checks(model, x, y, 10, threat, "digits") == []
    assert diag.unbounded_and_loss_checks(model, x, y, threat, PGD) == []


@pytest.mark.parametrize("wrapper,fragment", [(Softmax, "like probabilities"), (NoisyInEval, "randomized"),
                                              (DropoutInEval, "randomized"), (WithFeatures, "returns a tuple"),
                                              (Quantized, "exactly zero")])
def test_sanity_checks_trip(digits_batch: tuple, wrapper: type, fragment: str) -> None:
    model, x, y = digits_batch
    warnings = diag.sanity_checks(wrapper(model), x, y, 10, ThreatModel("linf", 0.1), "digits")
    assert any(fragment in w for w in warnings), warnings


def test_a_model_returning_a_tuple_is_evaluated_with_a_warning(digits_batch: tuple) -> None:
    from robustkit.data import Dataset
    from robustkit.evaluation.runner import evaluate

    model, x, y = digits_batch
    data = Dataset("digits", x, y, 10)
    attack = [("pgd", PGD(ThreatModel("linf", 0.1), steps=5))]
    plain, wrapped = evaluate(model, data, attack), evaluate(WithFeatures(model), data, attack)
    assert np.array_equal(plain.robust(), wrapped.robust())
    assert diag.sanity_checks(model, x, y, 10, ThreatModel("linf", 0.1), "digits") == []


def test_gradient_masking_checks_trip_on_a_masked_model(digits_batch: tuple) -> None:
    model, x, y = digits_batch
    warnings = diag.unbounded_and_loss_checks(Quantized(model), x, y, ThreatModel("linf", 0.1), PGD)
    assert any("unbounded attack" in w for w in warnings) or any("did not increase the loss" in w for w in warnings)
    assert diag.sanity_checks(model, x, y, 10, ThreatModel("linf", 0.5), "digits")[0].startswith("Linf eps 0.5")


def test_eps_monotonicity_and_black_box_checks() -> None:
    assert diag.non_monotone_in_eps([(0.1, 0.5), (0.2, 0.4)], "m") == []
    assert "rises" in diag.non_monotone_in_eps([(0.1, 0.4), (0.2, 0.5)], "m")[0]
    from robustkit.evaluation.runner import EvalResult

    arrays = {"index": np.arange(3), "label": np.zeros(3, int), "clean_pred": np.zeros(3, int),
              "success:pgd": np.array([True, False, False]), "success:square": np.array([True, True, False])}
    result = EvalResult(["pgd", "square"], arrays)
    assert "broke 1 points" in diag.black_box_stronger(result, ["square"], ["pgd"])[0]


def test_plot_command(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    db = str(tmp_path / "b.db")
    cli(capsys, "eval", "--db", db, "--quiet", "--n-examples", "30", "--attack", "fgsm", "--eps", "0.05,0.1")
    for name in ("curve.png", "curve.svg"):
        code, _, err = cli(capsys, "plot", "--db", db, "--output", str(tmp_path / name))
        assert code == 0, err
        assert (tmp_path / name).stat().st_size > 1000
    code, _, err = cli(capsys, "plot", "--db", db, "--output", str(tmp_path / "curve.txt"))
    assert code == 2 and ".png, .svg or .pdf" in err


def test_html_export_renders_in_headless_chromium(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import screenshot_leaderboard as shot

    if shot.chromium() is None:
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    db = str(tmp_path / "b.db")
    cli(capsys, "eval", "--db", db, "--quiet", "--n-examples", "30", "--attack", "fgsm,pgd", "--eps", "0.1")
    page = tmp_path / "board.html"
    cli(capsys, "leaderboard", "--db", db, "--format", "html", "--output", str(page), "--rows")
    dom = shot.dump_dom(page)
    assert dom.count("<tr") == 4 and "worst-case" in dom and "<details>" in dom
    png = shot.screenshot(page, tmp_path / "board.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_surrogate_transfer_cell(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    data, models = shared_file("cifar10_test1000.npz"), shared_file("models")
    common = ["--db", str(tmp_path / "b.db"), "--json", "--model", "resnet32", "--checkpoint",
              f"{models}/resnet32-d509ac18.th", "--dataset", f"npz:{data}", "--n-examples", "32", "--attack", "mi-fgsm",
              "--eps", "8/255"]
    code, out, err = cli(capsys, "eval", *common, "--surrogate", "resnet20", "--surrogate-checkpoint",
                         f"{models}/resnet20-12fca82f.th")
    assert code == 0, err
    (transfer,) = json.loads(out)
    assert transfer["attack"] == "mi-fgsm@resnet20" and transfer["attack_config"]["surrogate"] == "resnet20"
    code, out, err = cli(capsys, "eval", *common)
    (white,) = json.loads(out)
    assert white["robust_acc"] <= transfer["robust_acc"] < transfer["clean_acc"]


@pytest.mark.parametrize("args,fragment", [(["--defense", "pgd-at"], "'pgd-at' is a training defense"),
                                           (["--defense", "nope"], "Unknown defense 'nope'"),
                                           (["--defense-kwargs", "tau=1"], "without --defense")])
def test_eval_refuses_defenses_it_cannot_apply(capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str],
                                               fragment: str) -> None:
    code, _, err = cli(capsys, "eval", "--db", str(tmp_path / "lb.db"), "--quiet", *args)
    assert code == 2 and fragment in err.replace("\n", " ")
