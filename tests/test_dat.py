"""DAT (distributed adversarial training): world size 2 equals one process with the same global
batch (SGD and LAMB), the 8-bit quantizer's average is unbiased and its step close to the exact
one, a killed worker ends the run with a clear message and a rerun resumes, plus the pieces (the
reference LAMB variant, per-example random starts, sharding, pseudo-labels, options).

CPU, gloo, two processes (torch.multiprocessing or torchrun), the tiny ``digits-cnn`` (no
BatchNorm) on scikit-learn's digits, one thread each.
"""

from __future__ import annotations

import json
import math
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
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.defenses import DAT, DATFGSM, UNLABELED, TrickOptions, build_strategy
from robustkit.errors import DataError, UsageError
from robustkit.results.leaderboard import Leaderboard
from robustkit.threat import ThreatModel
from robustkit.training.compression import dequantize, levels, quantize, register_compression
from robustkit.training.dat import (
    DATConfig,
    WorkerLostError,
    _sigterm_raises,
    epoch_indices,
    example_starts,
    load_unlabeled,
    start_keys,
    train_dat,
)
from robustkit.training.loop import build_training_model
from robustkit.training.optim import LAMB

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> DATConfig:
    base = dict(model="digits-cnn", dataset="digits", n_examples=128, epochs=1, batch_size=64, val_size=0,
                eps=0.1, warmup_epochs=0.0, schedule="constant", device="cpu", attack_steps=3)
    base.update(kw)
    return DATConfig(**base)


EQUIVALENCE = {
    "sgd": dict(optimizer="sgd", lr=0.05),
    "lamb": dict(optimizer="lamb", lr=0.01),
    "sgd-qsgd": dict(optimizer="sgd", lr=0.05, grad_compression="qsgd"),
    "sgd-qsgd512": dict(optimizer="sgd", lr=0.05, grad_compression="qsgd", quant_bucket=512),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_RUN = dict(n_examples=512, epochs=4, warmup_epochs=1.0, attack_steps=10, optimizer="sgd", lr=0.05)


def _worker(rank: int, port: int, folder: str) -> None:
    """One of two gloo workers: the DAT runs of EQUIVALENCE; many backward passes through the qsgd
    hook with fixed per-rank data (the mean gradient and its exact value saved by rank 0); then a
    longer run during which the test kills rank 1 (rank 0 saves the error it raises)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for name, options in EQUIVALENCE.items():
        train_dat(small(out=f"{folder}/{name}", dist_timeout=60, **options))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g)
    local = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    exact = [t.clone() for t in local]
    squares = torch.stack([t.norm() ** 2 for t in local])
    for t in exact:
        dist.all_reduce(t)
        t.div_(2)
    dist.all_reduce(squares)
    ddp = nn.parallel.DistributedDataParallel(net)
    register_compression(ddp, "qsgd", bits=8, seed=rank)
    draws = 400
    total = [torch.zeros_like(p) for p in net.parameters()]
    for _ in range(draws):
        ddp.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        for acc, p in zip(total, net.parameters(), strict=True):
            acc += p.grad
    single = [p.grad.clone() for p in net.parameters()]
    if rank == 0:
        torch.save({"exact": exact, "mean": [t / draws for t in total], "single": single,
                    "squares": squares, "draws": draws}, f"{folder}/quantizer.pt")
    try:
        train_dat(small(out=f"{folder}/killed", dist_timeout=30, **KILL_RUN))
    except WorkerLostError as e:
        Path(f"{folder}/killed.txt").write_text(f"{time.monotonic()}\n{e}")
    # Rank 1 was SIGKILLed: this process group (the test's, not robustkit's) still has gloo threads
    # waiting on the dead peer, and tearing the interpreter down around them can abort (SIGABRT) after
    # everything above is written. Leave without that teardown; the files are what the tests check.
    os._exit(0)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two workers; kill rank 1 once the last run has its first checkpoint."""
    folder = tmp_path_factory.mktemp("dat2")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(folder)), nprocs=2, join=False, start_method="spawn")
    workers = ctx.processes
    try:
        deadline = time.monotonic() + 300
        while not (folder / "killed" / "checkpoint" / "state.json").exists():
            assert all(w.is_alive() for w in workers), "a worker failed before the kill"
            assert time.monotonic() < deadline, "no checkpoint of the last run after 300 s"
            time.sleep(0.05)
        os.kill(workers[1].pid, signal.SIGKILL)
        (folder / "killed-at.txt").write_text(str(time.monotonic()))
        workers[0].join(120)
        assert workers[0].exitcode == 0, f"rank 0 ended with {workers[0].exitcode}"
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
            w.join()
    return folder


@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_two_workers_equal_one_process_with_the_global_batch(two_workers: Path, name: str) -> None:
    one = train_dat(small(**EQUIVALENCE[name]))  # 1 process, batch 64; the workers took 32 each
    two = load_file(two_workers / name / "model.safetensors")
    assert two.keys() == one.model.net.state_dict().keys()
    for key, w in one.model.net.state_dict().items():
        torch.testing.assert_close(two[key], w, rtol=1e-5, atol=1e-6)
    assert one.history[0]["steps"] == 2 and one.history[0]["world_size"] == 1
    metrics = (two_workers / name / "metrics.csv").read_text().splitlines()
    assert metrics[1].split(",")[1] == "2"  # the same two global steps
    side = (two_workers / name / "model.json").read_text()
    assert '"world_size": 2' in side and '"backend": "gloo"' in side


def test_quantized_average_is_unbiased(two_workers: Path) -> None:
    q = torch.load(two_workers / "quantizer.pt", weights_only=True)
    s = levels(8)
    for exact, mean, single, sq in zip(q["exact"], q["mean"], q["single"], q["squares"], strict=True):
        # one rank's element has variance <= (||g_r|| / s)^2 / 4; the average of two: / 4 again
        sigma = math.sqrt(float(sq)) / (2 * s) / 2
        assert float((mean - exact).abs().max()) <= 6 * sigma / math.sqrt(q["draws"]) + 1e-7
        assert float((single - exact).abs().max()) <= math.sqrt(float(sq)) / s + 1e-6  # at most one level off
    err_one = sum(float((a - b).norm() ** 2) for a, b in zip(q["single"], q["exact"], strict=True))
    err_mean = sum(float((a - b).norm() ** 2) for a, b in zip(q["mean"], q["exact"], strict=True))
    assert err_one > 0 and err_mean < err_one / 50  # the draws are random and average out


def test_quantized_step_stays_close_to_the_exact_one(two_workers: Path) -> None:
    exact = load_file(two_workers / "sgd" / "model.safetensors")
    torch.manual_seed(0)  # the initial weights: a fresh model with the run's seed
    init = build_training_model(small(), load_dataset("digits", split="train", n_examples=128)).net.state_dict()
    step = torch.cat([(exact[k] - init[k]).flatten() for k in init])
    assert float(step.norm()) > 0
    # one norm per parameter (DAT): the 32768-weight layer alone allows a relative error of
    # sqrt(32768 / (4 * 127**2) / 2) = 0.5; one per 512 elements (QSGD's buckets): 0.06
    for name, bound in (("sgd-qsgd", 0.5), ("sgd-qsgd512", 0.1)):
        quantized = load_file(two_workers / name / "model.safetensors")
        diff = torch.cat([(quantized[k] - exact[k]).flatten() for k in init])
        assert 0 < float(diff.norm()) < bound * float(step.norm()), name


def test_a_killed_worker_stops_the_other_and_a_rerun_resumes(two_workers: Path) -> None:
    stopped, message = (two_workers / "killed.txt").read_text().split("\n", 1)
    assert float(stopped) - float((two_workers / "killed-at.txt").read_text()) < 30  # gloo saw it at once
    out = two_workers / "killed"
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["epoch"]
    # the text inside the parentheses is gloo's (it varies: read error, connection closed, ...)
    assert message.startswith(f"Worker 0 of 2 stopped during epoch {saved + 1}: it lost the other workers (")
    assert message.endswith(f"); the last checkpoint in {out} is after epoch {saved}; run the same command with "
                            "--resume to continue from it.")
    resumed = train_dat(small(out=str(out), resume=True, **KILL_RUN))  # one worker: the batch is global
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["world_size"] for r in resumed.history] == [2] * saved + [1] * (4 - saved)


# -- the quantizer ---------------------------------------------------------------------------------


def test_quantizer_is_unbiased_and_n_bit() -> None:
    g = torch.randn(40, generator=torch.Generator().manual_seed(0))
    g[3] = 0.0
    gen = torch.Generator().manual_seed(1)
    draws = 3000
    total = torch.zeros_like(g)
    for _ in range(draws):
        codes, norm = quantize(g, 8, gen)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 255
        total += dequantize(codes, norm, 8)
    sigma = float(g.norm()) / levels(8) / 2
    assert float((total / draws - g).abs().max()) < 5 * sigma / math.sqrt(draws)
    assert float((total / draws)[3]) == 0.0
    codes, norm = quantize(g, 3, gen)
    assert levels(3) == 3 and int(codes.max()) <= 7
    assert float((dequantize(codes, norm, 3) - g).abs().max()) <= float(g.norm()) / 3 + 1e-6
    codes, norm = quantize(torch.zeros(5), 8, gen)
    assert float(norm) == 0 and dequantize(codes, norm, 8).eq(0).all()
    one_hot = torch.tensor([0.0, -2.0, 0.0])  # exactly on a level: no randomness left
    assert torch.equal(dequantize(*quantize(one_hot, 8, gen), 8), one_hot)
    for bad in (1, 9, 8.0):
        with pytest.raises(UsageError, match="--quant-bits"):
            levels(bad)  # type: ignore[arg-type]


# -- LAMB as DAT's reference ---------------------------------------------------------------------------


def test_lamb_reference_variant_no_bias_correction_and_clamped_norm() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(50) * 3  # ||w|| ~ 21 > 10: the clamp matters
    g = torch.randn(50)
    w = nn.Parameter(w0.clone())
    opt = LAMB([w], lr=0.01, weight_decay=1e-4, bias_correction=False, max_weight_norm=10.0)
    w.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.001 * g * g
    update = m / (v.sqrt() + 1e-6) + 1e-4 * w0
    expected = w0 - 0.01 * (min(float(w0.norm()), 10.0) / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected)
    w2 = nn.Parameter(w0.clone())
    opt2 = LAMB([w2], lr=0.01, weight_decay=1e-4)  # default: bias-corrected, no clamp
    w2.grad = g.clone()
    opt2.step()
    assert not torch.allclose(w2.detach(), expected)


# -- sharding and random starts ----------------------------------------------------------------------


def test_shards_and_starts_do_not_depend_on_the_worker_count() -> None:
    n, per_global = 96, 32
    one = epoch_indices(n, 0, 1, seed=5, epoch=3)
    shards = [epoch_indices(n, r, 2, seed=5, epoch=3) for r in range(2)]
    for b in range(n // per_global):
        merged = torch.cat([s[b * 16 : (b + 1) * 16] for s in shards])
        assert sorted(merged.tolist()) == sorted(one[b * 32 : (b + 1) * 32].tolist())
    assert not torch.equal(one, epoch_indices(n, 0, 1, seed=5, epoch=4))  # re-seeded every epoch
    threat = ThreatModel("linf", 0.1)
    x = torch.rand(6, 1, 8, 8)
    idx = torch.tensor([4, 9, 1, 7, 3, 0])
    full = example_starts(threat, x, start_keys(11, idx))
    parts = torch.cat([example_starts(threat, x[i : i + 2], start_keys(11, idx[i : i + 2])) for i in (0, 2, 4)])
    torch.testing.assert_close(full, parts, rtol=0, atol=0)
    assert threat.contains(full, x).all()
    assert not torch.equal(full, example_starts(threat, x, start_keys(12, idx)))


# -- the strategies --------------------------------------------------------------------------------------


def test_dat_strategies_defaults_loss_and_pseudo_labels() -> None:
    threat = ThreatModel("linf", 8 / 255)
    pgd, fgsm = build_strategy("dat", threat), build_strategy("dat-fgsm", threat)
    assert isinstance(pgd, DAT) and build_strategy("dat-pgd", threat).name == "dat"
    assert (pgd.steps, pgd.step_size, pgd.clean_weight, pgd.eval_mode_attack) == (10, 2 / 255, 1.0, True)
    assert isinstance(fgsm, DATFGSM)
    assert (fgsm.steps, fgsm.step_size, fgsm.clean_weight, fgsm.eval_mode_attack) == (1, 1.25 * 8 / 255, 0.0, False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, UNLABELED, 3, UNLABELED, 5])
    labels = pgd.pseudo_label(net, x, y)
    assert labels[[0, 1, 3, 5]].tolist() == [0, 1, 3, 5]
    assert labels[[2, 4]].tolist() == net(x[[2, 4]]).argmax(1).tolist()
    out = pgd.step(net, x, labels, None, start=x.clone())
    x_adv = pgd.perturb_from(net, x, labels, x.clone())
    expected = F.cross_entropy(net(x_adv), labels) + F.cross_entropy(net(x), labels)
    torch.testing.assert_close(out.loss, expected)
    assert set(out.parts) == {"task", "adv", "clean"}
    assert set(fgsm.step(net, x, labels, torch.Generator().manual_seed(0)).parts) == {"task", "adv"}
    with pytest.raises(UsageError, match="does not take --trick"):
        build_strategy("dat", threat, tricks=TrickOptions(("weight-reg",)))
    with pytest.raises(UsageError, match="--clean-weight"):
        build_strategy("dat", threat, clean_weight=-1)


# -- one process: resume, unlabeled data, options -----------------------------------------------------


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    cfg = dict(n_examples=64, batch_size=32, epochs=3, warmup_epochs=1.0, schedule="multistep", ema=0.9)
    straight = train_dat(small(**cfg))

    def stop_after_first(event) -> None:  # noqa: ANN001
        if event.kind == "epoch" and event.epoch == 0:
            raise _Stop

    with pytest.raises(_Stop):
        train_dat(small(out=str(tmp_path / "r"), **cfg), progress=stop_after_first)
    with pytest.raises(UsageError, match="--resume"):
        train_dat(small(out=str(tmp_path / "r"), **cfg))
    resumed = train_dat(small(out=str(tmp_path / "r"), resume=True, **cfg))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)


def test_unlabeled_data_gets_pseudo_labels(tmp_path: Path) -> None:
    test = load_dataset("digits", split="test", n_examples=40)
    np.savez_compressed(tmp_path / "u.npz", x=test.x.numpy())
    result = train_dat(small(unlabeled=f"npz:{tmp_path / 'u.npz'}", n_unlabeled=32, batch_size=32))
    row = result.history[0]
    assert row["pseudo_labeled"] == 32 and row["steps"] == math.ceil((128 + 32) / 32)
    assert 0 <= row["train_acc"] <= 1
    digits = load_dataset("digits", n_examples=4)
    assert load_unlabeled(f"npz:{tmp_path / 'u.npz'}", digits, n=5).shape == (5, 1, 8, 8)
    np.savez_compressed(tmp_path / "bad.npz", x=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="images are"):
        load_unlabeled(f"npz:{tmp_path / 'bad.npz'}", digits)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(grad_compression="zip"), "--grad-compression"),
        (dict(quant_bits=12), "--quant-bits"),
        (dict(lr_scaling="cubic"), "--lr-scaling"),
        (dict(unlabeled="data.npz"), "npz:PATH"),
        (dict(n_unlabeled=5), "--n-unlabeled"),
        (dict(warmup_epochs=5.0, epochs=3), "--warmup-epochs 5"),
        (dict(on_co="rollback"), "epoch ends only"),
        (dict(method="pgd-at"), "DATConfig trains"),
        (dict(dist_timeout=0), "--dist-timeout"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        small(**options)


def test_lr_scaling_and_weight_decay_defaults() -> None:
    assert small(lr=0.01, batch_size=1024, lr_scaling="linear").peak_lr() == pytest.approx(0.04)
    assert small(lr=0.01, batch_size=1024, lr_scaling="sqrt").peak_lr() == pytest.approx(0.02)
    assert small(lr=0.01, batch_size=1024).peak_lr() == 0.01
    assert small().resolved_weight_decay() == 1e-4 and small(optimizer="sgd").resolved_weight_decay() == 5e-4
    d = DATConfig()
    assert (d.optimizer, d.lr, d.warmup_epochs, d.milestones, d.grad_compression, d.quant_bits) == (
        "lamb", 0.01, 5.0, [0.75, 0.9, 0.95], "none", 8)


def test_cli_dat_options_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "pgd-at", "--grad-compression", "qsgd"])
    assert e.value.code == 2
    assert "--grad-compression is an option of `robustkit train dat`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "dat", "--eps", "8/255", "--grad-compression", "qsgd", "--dump-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "optimizer: lamb" in text and "grad_compression: qsgd" in text and "- pgd" in text
    (tmp_path / "dat.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "dat.yaml"), "--eval", "none", "--dump-config"])
    assert e.value.code == 0 and "eval_attacks: []" in capsys.readouterr().out


# -- failure: a killed worker, then --resume ---------------------------------------------------------------


def test_a_failing_worker_ignores_sigterm_until_it_has_said_why() -> None:
    """torchrun sends SIGTERM to every worker once one fails; a worker already leaving with its own
    error must not die of it before the CLI prints that error."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        with _sigterm_raises(True):
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == before  # a run that ends well restores it
        with pytest.raises(WorkerLostError), _sigterm_raises(True):
            raise WorkerLostError("lost")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)



def _torchrun(out: Path, db: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "robustkit", "train", "dat", "--dataset", "digits", "--n-examples", "256", "--batch-size", "64",
           "--epochs", "6", "--warmup-epochs", "1", "--val-size", "0", "--eps", "0.1", "--attack-steps", "5",
           "--out", str(out), "--db", str(db), "--dist-timeout", "30", "--quiet", "--eval-n-examples", "100", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})


def _worker_pid(launcher: int, rank: int) -> int | None:
    children = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
def test_torchrun_a_killed_worker_stops_the_run_clearly_and_a_rerun_resumes(tmp_path: Path) -> None:
    out, db = tmp_path / "run", tmp_path / "board.db"
    proc = _torchrun(out, db)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint" / "state.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        pid = _worker_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 60, "the surviving worker did not stop in time"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "Worker 0 of 2 stopped during epoch" in err and "run the same command with --resume" in err, err[-3000:]
    saved = int(json.loads((out / "checkpoint" / "state.json").read_text())["epoch"])
    assert 1 <= saved < 6
    rerun = _torchrun(out, db, "--resume")
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"Resuming {out} after epoch {saved}" in err
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    board = Leaderboard(db).rows()
    assert len(board) == 1 and board[0].attack == "pgd" and board[0].n_examples == 100
