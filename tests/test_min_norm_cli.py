"""``robustkit eval`` with minimum-norm attacks (curves without eps, rows derived at eps, the
per-sample ensemble, the worst case with other attacks), ``robustkit report optimality`` and the
curve exports, end to end on the packaged digits-cnn (always) and a real CIFAR-10 ResNet-20 from
../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit import ThreatModel
from robustkit.attacks import FMN
from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.evaluation.records import read_records
from robustkit.evaluation.runner import evaluate
from robustkit.models import load_model
from robustkit.results import curves as rc
from robustkit.results.leaderboard import Leaderboard

from conftest import shared_file

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ("--n-examples", "24", "--attack-kwargs", "steps=10", "--quiet")


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def ok(capsys: pytest.CaptureFixture, *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return out


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0 and "Traceback" not in err and err.startswith("Error: "), err
    text = " ".join(err.split())
    assert text.count(". ") + text.count("; ") <= 3, f"more than one sentence: {text}"
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def records_of(curve: rc.Curve) -> dict[str, np.ndarray]:
    frame = read_records(curve.extra["records"])
    return {c: frame[c].to_numpy() for c in frame.columns}


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "board.db")


# -- the numbers ------------------------------------------------------------------------------------
def test_curve_math_and_optimality_by_hand() -> None:
    d = np.array([0.0, 0.5, 1.0, np.inf], dtype=np.float32)  # one misclassified, one never broken
    assert rc.robust_accuracy(d, [0, 0.5, 0.75, 1.0, 5.0]) == [0.75, 0.5, 0.5, 0.25, 0.25]
    s = rc.summarize(d)
    assert (s.clean_acc, s.median, s.mean, s.found) == (0.75, 1.0, 0.75, 2 / 3)
    assert np.array_equal(rc.ensemble([d, [0.0, 0.25, 2.0, 3.0]]), np.float32([0, 0.25, 1, 3]))
    env = np.float32([0, 0.5, 1.0, 2.0])
    assert rc.optimality(env, env) == 1.0
    assert rc.optimality(np.float32([0, np.inf, np.inf, np.inf]), env) == 0.0  # finds nothing
    # A* = mean(min(env, 2)) = 3.5/4, A = mean(0, 1, 1, 2) = 1, worst = 0.75 * 2 = 1.5
    assert rc.optimality(np.float32([0, 1.0, 1.0, 2.0]), env) == pytest.approx(1 - (1 - 0.875) / (1.5 - 0.875))
    # float32 as the attacks compare: a distance equal to float32(8/255) is within 8/255
    assert not rc.robust_at(np.float32([8 / 255]), 8 / 255)[0]


def test_eps_grids() -> None:
    grid = rc.eps_grid("linf", "cifar10")
    assert grid[:17] == [k / 255 for k in range(17)] and grid[17:] == [k / 255 for k in (20, 24, 28, 32)]
    assert rc.eps_grid("l2", "cifar10")[:3] == [0.0, 0.05, 0.1] and rc.eps_grid("l2", "cifar10")[-1] == 2.0
    assert rc.eps_grid("l1", "digits", [0, 3.3, np.inf])[-1] == 5.0  # no standard radius: up to the distances
    assert all(float(e).is_integer() for e in rc.eps_grid("l0", "cifar10", [0, 57, np.inf]))


# -- digits-cnn, end to end --------------------------------------------------------------------------
def test_curves_without_eps_then_rows_at_eps(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    rec = str(tmp_path / "records")
    out = ok(capsys, "eval", "--attack", "fmn,ddn", "--norm", "l2", "--db", db, "--records", rec, "--json", *DIGITS)
    summary = json.loads(out)
    assert [s["kind"] for s in summary] == ["curve"] * 3
    assert [s["attack"] for s in summary] == ["fmn", "ddn", "fmn+ddn"]
    assert Leaderboard(db).rows() == []  # no eps: curves only
    curves = {c.attack: c for c in rc.CurveStore(db).curves()}
    assert set(curves) == {"fmn", "ddn", "fmn+ddn"}

    # the stored distances are the records', the ensemble their per-sample minimum
    records = records_of(curves["fmn"])
    for name in ("fmn", "ddn"):
        assert np.array_equal(curves[name].distances, records[f"distance_{name}"].astype(np.float32))
    both = curves["fmn+ddn"].distances
    assert np.array_equal(both, np.minimum(curves["fmn"].distances, curves["ddn"].distances))
    correct = records["clean_pred"] == records["label"]
    assert np.array_equal(both > 0, correct)  # 0 exactly for the points misclassified from the start
    assert (curves["fmn+ddn"].summary.median <= min(curves["fmn"].summary.median, curves["ddn"].summary.median))
    assert curves["ddn"].summary.median == pytest.approx(float(np.median(records["distance_ddn"][correct])))

    frame = rc.curve_frame(db)
    assert {"model", "defense", "checkpoint", "dataset", "norm", "attack", "n", "eps", "robust_acc",
            "clean_acc"} <= set(frame.columns)
    for name, curve in frame.groupby("attack"):
        acc = curve.sort_values("eps")["robust_acc"].to_numpy()
        assert acc[0] == curve["clean_acc"].iloc[0] == correct.mean() and (np.diff(acc) <= 0).all()
        assert acc[-1] == np.isinf(curves[name].distances).mean()  # the grid reaches the largest distance found
    assert (frame["n"] == 24).all() and (frame["model"] == "digits-cnn").all()

    # rows at two radii, derived from the distances: split the points, away from any distance
    finite = np.sort(np.unique(curves["fmn"].distances[np.isfinite(curves["fmn"].distances)]))
    gaps = np.diff(finite)
    eps = [float(finite[i] + gaps[i] / 2) for i in (int(np.argmax(gaps[: len(gaps) // 2])), len(gaps) // 2)]
    eps_arg = ",".join(f"{e:.6f}" for e in eps)
    out = ok(capsys, "eval", "--attack", "fmn,ddn", "--norm", "l2", "--eps", eps_arg, "--db", db, "--records", rec,
             "--json", *DIGITS)
    rows = [r for r in json.loads(out) if r["kind"] == "row"]
    assert {r["attack"] for r in rows} == {"fmn", "ddn", "fmn+ddn"} and len(rows) == 6
    assert len(rc.CurveStore(db).curves()) == 3  # the stored curves were reused, not duplicated
    for r in rows:
        assert r["attack_config"]["derived_from"] == "curve"
        d = (records[f"distance_{r['attack']}"] if r["attack"] != "fmn+ddn"
             else np.minimum(records["distance_fmn"], records["distance_ddn"]))
        assert r["robust_acc"] == float((d.astype(np.float32) > np.float32(r["eps"])).mean())
        assert 0 < r["robust_acc"] < r["clean_acc"] or r["attack"] != "fmn"

    # the same attack run at that eps (through the same runner) breaks exactly those points
    data = load_dataset("digits", split="test", n_examples=24)
    model = load_model("digits-cnn")
    for e in {float(np.float32(r["eps"])) for r in rows}:
        direct = evaluate(model, data, [("fmn", FMN(ThreatModel("l2", e), steps=10))], batch_size=256)
        assert np.array_equal(direct.robust("fmn"), rc.robust_at(records["distance_fmn"], e)), e

    # again: nothing recomputed, nothing duplicated
    code, _, err = run(capsys, "eval", "--attack", "fmn,ddn", "--norm", "l2", "--eps", eps_arg, "--db", db,
                       "--records", rec, *DIGITS)
    assert code == 0 and err.count("already in the leaderboard") == 3 + 6
    assert len(Leaderboard(db).rows()) == 6 and len(rc.CurveStore(db).curves()) == 3


def test_worst_case_includes_the_minimum_norm_attacks(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    out = ok(capsys, "eval", "--attack", "pgd,fmn", "--norm", "l2", "--eps", "0.5", "--db", db,
             "--records", str(tmp_path / "rec"), "--json", *DIGITS)
    items = json.loads(out)
    rows = {r["attack"]: r for r in items if r["kind"] == "row"}
    assert list(rows) == ["pgd", "fmn", "worst-case"]
    assert rows["worst-case"]["attack_config"]["attacks"] == ["pgd", "fmn"]
    pgd = read_records(rows["pgd"]["extra"]["records"])
    (curve,) = rc.CurveStore(db).curves()
    fmn_robust = rc.robust_at(curve.distances, 0.5)
    pgd_robust = pgd["robust"].to_numpy()
    assert rows["worst-case"]["robust_acc"] == float((pgd_robust & fmn_robust).mean())
    assert rows["worst-case"]["robust_acc"] <= min(rows["pgd"]["robust_acc"], rows["fmn"]["robust_acc"])


def test_ranked_view_and_exports_show_the_median_distance(capsys: pytest.CaptureFixture, db: str) -> None:
    ok(capsys, "eval", "--attack", "fmn,ddn", "--norm", "l2", "--eps", "0.5", "--db", db, *DIGITS)
    medians = {c.attack: c.summary.median for c in rc.CurveStore(db).curves()}
    best = min(medians, key=medians.get)
    csv = ok(capsys, "leaderboard", "--db", db, "--format", "csv").splitlines()
    header, (line,) = csv[0].split(","), csv[1:]
    cell = dict(zip(header, line.split(","), strict=True))["median distance"]
    assert cell == f"{medians[best]:.4g} ({best})"
    assert "median distance" in ok(capsys, "leaderboard", "--db", db, "--format", "html")


def test_optimality_report(capsys: pytest.CaptureFixture, db: str) -> None:
    ok(capsys, "eval", "--attack", "fmn,ddn,deepfool", "--norm", "l2", "--db", db, *DIGITS)
    table = json.loads(ok(capsys, "report", "optimality", "--db", db, "--format", "json"))
    assert [r["rank"] for r in table] == [1, 2, 3] and {r["attack"] for r in table} == {"fmn", "ddn", "deepfool"}
    scores = [r["optimality"] for r in table]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    curves = {c.attack: c.distances for c in rc.CurveStore(db).curves()}
    env = rc.ensemble([curves[a] for a in ("fmn", "ddn", "deepfool")])
    assert np.array_equal(curves["fmn+ddn+deepfool"], env)
    for r in table:
        assert r["optimality"] == pytest.approx(rc.optimality(curves[r["attack"]], env))
    csv = ok(capsys, "report", "optimality", "--db", db, "--format", "csv")
    assert csv.splitlines()[0].startswith("model,defense,dataset,norm,n,seed,rank,attack,optimality")
    assert "Optimality" in ok(capsys, "report", "optimality", "--db", db)
    code, _, err = run(capsys, "report", "optimality", "--db", db, "--norm", "linf")
    assert_user_error(code, err, "No minimum-norm curves match")


@pytest.mark.parametrize("args,fragments", [
    (("--attack", "ddn", "--norm", "l0"), ("ddn supports the norms l2, not l0.",)),
    (("--attack", "pgd", "--norm", "l0"), ("pgd supports the norms linf, l2, not l0.",)),
    (("--attack", "fmn,pgd", "--norm", "l0", "--eps", "10"), ("pgd supports the norms linf, l2, not l0.",)),
    (("--attack", "fmn", "--attack-kwargs", "targeted=true"), ("fmn was asked for as a targeted attack",
                                                                "no target class per point")),
    (("--attack", "pgd", "--eps", "inf"), ("pgd needs a finite eps",)),
    (("--attack", "fmn,pgd", "--eps", "inf"), ("pgd needs a finite eps",)),
    (("--attack", "pgd", "--eps", "-1"), ("eps must be a positive number", "got -1")),
    (("--attack", "fmn", "--eps", "-1"), ("eps must be a positive number", "got -1")),
    (("--attack", "fmn", "--eps", "0"), ("eps must be a positive number",)),
    (("--attack", "fmn", "--norm", "l0", "--eps", "2.5"), ("must be a whole number",)),
])
def test_bad_input_is_one_sentence(capsys: pytest.CaptureFixture, db: str, args: tuple[str, ...],
                                   fragments: tuple[str, ...]) -> None:
    code, _, err = run(capsys, "eval", *args, "--db", db, "--n-examples", "8", "--quiet")
    assert_user_error(code, err, *fragments)
    assert not Path(db).exists() or Leaderboard(db).rows() == []


def test_eps_inf_and_l0_curves(capsys: pytest.CaptureFixture, db: str) -> None:
    out = ok(capsys, "eval", "--attack", "fmn", "--norm", "l0", "--eps", "inf", "--db", db, "--json", *DIGITS)
    (curve,) = json.loads(out)
    assert curve["kind"] == "curve" and curve["norm"] == "l0" and Leaderboard(db).rows() == []
    assert all(float(p["eps"]).is_integer() for p in curve["curve"])
    spec = ok(capsys, "eval", "--attack", "fmn", "--norm", "l2", "--dump-config")
    assert "eps: []" in spec
    ok(capsys, "eval", "--attack", "fmn", "--norm", "l0", "--eps", "3", "--db", db, *DIGITS)  # rows read off the curve
    rows = json.loads(ok(capsys, "leaderboard", "--db", db, "--norm", "l0", "--rows", "--format", "json"))
    assert rows and {r["norm"] for r in rows} == {"l0"}


# -- a real CIFAR-10 ResNet-20 ------------------------------------------------------------------------
def test_resnet20_curves_rows_ensemble_and_exports(capsys: pytest.CaptureFixture, db: str, tmp_path: Path) -> None:
    data, ckpt = shared_file("cifar10_test1000.npz"), shared_file("models/resnet20-12fca82f.th")
    args = ("--model", "resnet20", "--checkpoint", str(ckpt), "--dataset", f"npz:{data}", "--n-examples", "16",
            "--db", db, "--records", str(tmp_path / "rec"), "--quiet")
    out = ok(capsys, "eval", *args, "--attack", "fmn,ddn", "--norm", "l2", "--eps", "0.1,0.5",
             "--attack-kwargs", "steps=20", "--json")
    items = json.loads(out)
    curves = {c.attack: c for c in rc.CurveStore(db).curves()}
    assert set(curves) == {"fmn", "ddn", "fmn+ddn"}
    both = curves["fmn+ddn"]
    assert np.array_equal(both.distances, np.minimum(curves["fmn"].distances, curves["ddn"].distances))
    assert both.extra["radius_dataset"] == "cifar10" and both.eps_grid == tuple(rc.eps_grid("l2", "cifar10"))
    # a standard ResNet-20 falls to tiny L2 perturbations: every clean-correct point within 0.5
    assert both.summary.found == 1.0 and both.summary.median < 0.5
    rows = {(r["attack"], r["eps"]): r["robust_acc"] for r in items if r["kind"] == "row"}
    summary = rc.curve_summary_frame(db).set_index("attack")
    assert "robust_acc@0.5" in summary.columns
    for name, c in curves.items():
        assert rows[(name, 0.5)] == summary.loc[name, "robust_acc@0.5"] == float((c.distances > np.float32(0.5)).mean())
        assert rows[(name, 0.1)] == float((c.distances > np.float32(0.1)).mean())
    assert summary.loc["fmn+ddn", "median_distance"] == pytest.approx(both.summary.median)
    assert (rc.curve_frame(db)["radius_dataset"] == "cifar10").all()  # npz images of the model's data set

    ok(capsys, "eval", *args, "--attack", "deepfool", "--norm", "l2")
    table = json.loads(ok(capsys, "report", "optimality", "--db", db, "--format", "json"))
    assert {r["attack"] for r in table} == {"fmn", "ddn", "deepfool"}
    env = rc.ensemble([curves["fmn"].distances, curves["ddn"].distances,
                       rc.CurveStore(db).curves(attack="deepfool")[0].distances])
    for r in table:
        d = rc.CurveStore(db).curves(attack=r["attack"])[0].distances
        assert r["optimality"] == pytest.approx(rc.optimality(d, env))
        assert math.isfinite(r["optimality"])
    assert torch.get_num_threads() == 1


def test_a_killed_curve_run_resumes_from_its_batches(tmp_path: Path) -> None:
    from robustkit.evaluation.grid import EvalSpec, run_grid

    spec = EvalSpec(attack=["fmn"], norm="l2", n_examples=24, batch_size=8, attack_kwargs={"steps": 10})
    assert spec.eps == []  # only minimum-norm attacks: no default radius

    def killed(label: str, done: int, total: int, robust: int, evaluated: int) -> None:
        assert label == "digits-cnn l2 curve"
        if done == 2:
            raise KeyboardInterrupt

    db = tmp_path / "a" / "board.db"
    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, db=db, progress=killed)
    assert rc.CurveStore(db).curves() == []
    assert len(list((tmp_path / "a" / "runs").rglob("batch_*.npz"))) == 2  # what the killed run kept
    (resumed,) = run_grid(spec, db=db)
    (fresh,) = run_grid(spec, db=tmp_path / "b" / "board.db")
    assert np.array_equal(resumed.curves[0].distances, fresh.curves[0].distances)
    assert len(list((tmp_path / "a" / "runs").rglob("batch_*.npz"))) == 0  # cleared once stored


def test_sharded_curve_cell_equals_single_process(tmp_path: Path) -> None:
    """Under torchrun the curve cell is sharded like any cell: the same distances, curves and rows."""
    import os
    import subprocess
    import sys

    args = ["eval", "--quiet", "--json", "--batch-size", "8", "--n-examples", "32", "--attack", "fmn,pgd",
            "--norm", "l2", "--eps", "0.5", "--attack-kwargs", "steps=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "robustkit", *args, "--db", str(tmp_path / "one" / "b.db")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "robustkit", *args, "--db", str(tmp_path / "two" / "b.db")]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    (one,), (two,) = (rc.CurveStore(tmp_path / d / "b.db").curves() for d in ("one", "two"))
    assert np.array_equal(one.distances, two.distances) and one.attack == two.attack == "fmn"
    rows = [{(r.attack, r.robust_acc, r.clean_acc) for r in Leaderboard(tmp_path / d / "b.db").rows()}
            for d in ("one", "two")]
    assert rows[0] == rows[1] and {a for a, _, _ in rows[0]} == {"pgd", "fmn", "worst-case"}
