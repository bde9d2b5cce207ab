"""DAT on CPU: throughput with 1 and 2 worker processes, and robust accuracy after a short run.

    python benchmarks/dat.py [--n 4096] [--epochs 5] [--eps 0.1] [--runs pgd-at,dat-1,dat-2,...]

Every run trains ``mnist-cnn-a`` (no BatchNorm) on the first ``--n`` MNIST training images of
../shared/data/mnist.npz with the same global batch (256) and epochs, through the real command
line (``robustkit train``, ``torchrun ... -m robustkit train dat``), one intra-op thread per worker
unless the run says otherwise, and ends with ``--eval pgd`` (robustkit's PGD-10) on the first 1000
MNIST test images at the training eps. Runs:

* ``pgd-at``: single-process PGD-AT with the MNIST recipe of ``co_fgsm_tricks.py`` (Adam lr
  1e-3, constant; robustkit's SGD 0.05 default does not leave chance level in so few steps here).
* ``dat-1`` / ``dat-2``: DAT-PGD with DAT's defaults (LAMB lr 0.01, loss adversarial + clean CE,
  multistep 75/90/95 %) and a 1-epoch warmup, on 1 and 2 worker processes (gloo).
* ``dat-2-qsgd``: ``dat-2`` with 8-bit stochastic gradient quantization.
* ``dat-2-pgdat``: distributed PGD-AT: ``dat-2`` with ``pgd-at``'s optimizer, schedule and loss
  (Adam 1e-3, constant, no warmup, ``--clean-weight 0``).
* ``dat-1x2`` (not in the default list): ``dat-1`` with 2 intra-op threads (the same two cores,
  used by one process).

Throughput is training images per second (adversarial example generation included) averaged over
epochs 2..E (epoch 1 warms up); a 2-worker run's speed-up is against the 1-worker run doing the
same work per image (``dat-1`` for DAT-PGD, ``pgd-at`` for ``dat-2-pgdat``), and its scaling
efficiency is that speed-up over 2. Writes ``benchmarks/results/dat.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
RESULTS = HERE / "results" / "dat.md"

#: run name -> (processes, threads per process, method, extra options)
ADAM = ["--optimizer", "adam", "--lr", "1e-3", "--schedule", "constant", "--weight-decay", "5e-4"]
RUNS: dict[str, tuple[int, int, str, list[str]]] = {
    "pgd-at": (1, 1, "pgd-at", ADAM),
    "dat-1": (1, 1, "dat", ["--warmup-epochs", "1"]),
    "dat-2": (2, 1, "dat", ["--warmup-epochs", "1"]),
    "dat-2-qsgd": (2, 1, "dat", ["--warmup-epochs", "1", "--grad-compression", "qsgd", "--quant-bits", "8"]),
    "dat-2-pgdat": (2, 1, "dat", [*ADAM, "--warmup-epochs", "0", "--clean-weight", "0"]),
    "dat-1x2": (1, 2, "dat", ["--warmup-epochs", "1"]),
}
#: 2-worker run -> the 1-worker run with the same work per image (for speed-up and efficiency)
REFERENCE = {"dat-2": "dat-1", "dat-2-qsgd": "dat-1", "dat-2-pgdat": "pgd-at", "dat-1x2": "dat-1"}
DESCRIPTION = {
    "pgd-at": "PGD-AT, 1 process (Adam 1e-3)",
    "dat-1": "DAT-PGD, 1 worker (LAMB 0.01)",
    "dat-2": "DAT-PGD, 2 workers (LAMB 0.01)",
    "dat-2-qsgd": "DAT-PGD, 2 workers, 8-bit qsgd",
    "dat-2-pgdat": "DAT, 2 workers, PGD-AT's recipe (Adam 1e-3, adv. loss only)",
    "dat-1x2": "DAT-PGD, 1 worker, 2 threads",
}


def command(run: str, args: argparse.Namespace, out: Path) -> list[str]:
    procs, _threads, method, extra = RUNS[run]
    data = f"npz:{SHARED / 'mnist.npz'}"
    common = [method, "--model", "mnist-cnn-a", "--dataset", data, "--n-examples", str(args.n), "--batch-size", "256",
              "--epochs", str(args.epochs), "--eps", str(args.eps), "--val-size", "0", "--eval", "pgd",
              "--eval-n-examples", "1000", "--seed", str(args.seed), "--out", str(out / "run"),
              "--db", str(out / "board.db"), "--quiet", *extra]  # fmt: skip
    if procs == 1:
        return [sys.executable, "-m", "robustkit", "train", *common]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "robustkit", "train", *common]  # fmt: skip


def run_one(run: str, args: argparse.Namespace, root: Path) -> dict[str, object]:
    from robustkit.results.leaderboard import Leaderboard

    out = root / run
    out.mkdir(parents=True)
    cmd = command(run, args, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(RUNS[run][1]), "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{run} failed:\n{proc.stderr[-4000:]}")
    with open(out / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    later = rows[1:] or rows
    seen = sum(float(r["images_per_s"]) * float(r["seconds"]) if "images_per_s" in r else args.n for r in later)
    seconds = sum(float(r["seconds"]) for r in later)
    board = Leaderboard(out / "board.db").rows()
    assert len(board) == 1, board
    return {"run": run, "throughput": seen / seconds, "train_acc": float(rows[-1]["train_acc"]),
            "clean": board[0].clean_acc, "robust": board[0].robust_acc, "wall": wall, "cmd": cmd, "root": root}


def load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def table(results: list[dict[str, object]], args: argparse.Namespace, started: str, ended: str, total: float) -> str:
    import torch

    by = {r["run"]: r for r in results}
    lines = [
        "# DAT: distributed adversarial training on CPU",
        "",
        f"`python benchmarks/dat.py --n {args.n} --epochs {args.epochs} --eps {args.eps} --runs {','.join(by)}` "
        f"(run with nohup in the background; {total / 60:.1f} min in all).",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}, shared with other jobs: load average "
        f"{started} at the start, {ended} at the end), no GPU, torch {torch.__version__}, gloo. "
        f"Every run: `mnist-cnn-a` on MNIST training images 0–{args.n - 1}, Linf eps {args.eps}, global batch 256, "
        f"{args.epochs} epochs, seed {args.seed}; training attack PGD-10 (step eps/4, random start); robust "
        f"accuracy = `--eval pgd` (robustkit PGD-10, step 2.5·eps/10) on MNIST test images 0–999.",
        "",
        "| run | workers × threads | images/s | speed-up (vs) | scaling efficiency | final train acc (adv.) "
        "| clean acc | PGD-10 acc | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = str(r["run"])
        procs, threads, _m, _e = RUNS[name]
        thr = float(r["throughput"])  # type: ignore[arg-type]
        ref = by.get(REFERENCE.get(name, ""))
        speed = eff = ""
        if ref is not None:
            ratio = thr / float(ref["throughput"])  # type: ignore[arg-type]
            speed = f"{ratio:.2f}× ({ref['run']})"
            eff = f"{ratio / (procs * threads):.0%}"
        lines.append(
            f"| {DESCRIPTION[name]} | {procs} × {threads} | {thr:.0f} | {speed} | {eff} | "
            f"{float(r['train_acc']):.1%} | {float(r['clean']):.1%} | {float(r['robust']):.1%} | "  # type: ignore[arg-type]
            f"{float(r['wall']):.0f} |"  # type: ignore[arg-type]
        )
    lines += ["", "Commands (OMP_NUM_THREADS = threads per worker):", ""]
    for r in results:
        cmd = " ".join(str(c) for c in r["cmd"]).replace(sys.executable, "python")  # type: ignore[union-attr]
        cmd = cmd.replace(str(r["root"]), "$OUT")
        lines.append(f"- {r['run']}: `{cmd}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="pgd-at,dat-1,dat-2,dat-2-qsgd,dat-2-pgdat")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eps", default="0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    if not (SHARED / "mnist.npz").is_file():
        raise SystemExit(f"needs {SHARED / 'mnist.npz'}")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    started, t0 = load(), time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="dat-bench-") as tmp:
        for run in runs:
            r = run_one(run, args, Path(tmp))
            print(f"{run}: {float(r['throughput']):.0f} images/s, clean {float(r['clean']):.1%}, "  # type: ignore[arg-type]
                  f"PGD {float(r['robust']):.1%}, {float(r['wall']):.0f} s", flush=True)  # type: ignore[arg-type]
            results.append(r)
    text = table(results, args, started, load(), time.perf_counter() - t0)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
