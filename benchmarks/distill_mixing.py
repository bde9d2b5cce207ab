"""Distillation from the packaged robust digits-cnn and data mixing, against training alone.

    python benchmarks/distill_mixing.py [--epochs 10] [--seeds 0,1] [--runs ce,pgd-at,kd,rkd,...]

Every run trains a fresh ``digits-cnn`` student on scikit-learn's 8x8 digits (1,297 training
images) with the same recipe: Adam lr 1e-3, no weight decay, batch 64, constant lr, ``--epochs``
epochs, Linf eps 0.1 for the adversarial ones (PGD-10, step eps/4, as ``robustkit train pgd-at``).

* ``ce`` / ``pgd-at``: the student alone (``robustkit train standard|pgd-at``).
* ``kd`` / ``rkd``: ``robustkit train distill`` from the packaged digits-cnn (PGD-AT at eps 0.1,
  97.6% clean) with the default objectives kd + feature (T = 4, no label loss); ``rkd`` adds
  ``--method pgd-at`` (the student's input is its own PGD-10 example, the teacher sees the clean
  image). ``kd-T1`` / ``rkd-T1``: the same at temperature 1.
* ``ce+MIX`` / ``pgd-at+MIX``: the same as ``ce`` / ``pgd-at`` with ``--mix MIX`` (mixup, cutmix,
  sdmp; alpha 1).

Scored on the 500 digits test images: clean accuracy, PGD-20 (random start, step 2.5 eps / 20) and
APGD-CE (100 steps) accuracy at eps 0.1. Reports, never asserts. Writes
``benchmarks/results/distill_mixing.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from robustkit.attacks import APGD, PGD
from robustkit.data import load_dataset
from robustkit.models import load_model
from robustkit.threat import ThreatModel
from robustkit.training.distill import DistillConfig
from robustkit.training.loop import TrainConfig, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distill_mixing.md"
EPS = 0.1
RUNS = ("ce", "pgd-at", "kd", "rkd", "kd-T1", "rkd-T1", "ce+mixup", "ce+cutmix", "ce+sdmp", "pgd-at+mixup",
        "pgd-at+cutmix", "pgd-at+sdmp")


def config(run: str, epochs: int, seed: int) -> TrainConfig:
    common = dict(model="digits-cnn", dataset="digits", epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3,
                  weight_decay=0.0, schedule="constant", eps=EPS, val_size=0, seed=seed, device="cpu")
    if run.startswith(("kd", "rkd")):
        return DistillConfig(method="pgd-at" if run.startswith("rkd") else "standard", teacher="digits-cnn",
                             temperature=1.0 if run.endswith("-T1") else 4.0, **common)
    method, _, mix = run.partition("+")
    return TrainConfig(method="standard" if method == "ce" else method, mix=mix or None, **common)


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    threat = ThreatModel("linf", EPS)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    pgd = PGD(threat, steps=20, seed=0)(model, x, y)
    apgd = APGD(threat, steps=100, seed=0)(model, x, y)
    return {"clean": clean, "pgd": 1 - float(pgd.success.float().mean()),
            "apgd": 1 - float(apgd.success.float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--out", default=str(RESULTS), help="Markdown file to write.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    test = load_dataset("digits", split="test")
    rows: list[tuple[str, list[dict[str, float]], float]] = [("teacher (packaged digits-cnn)",
                                                               [scores(load_model("digits-cnn"), test.x, test.y)], 0.0)]
    for run in runs:
        results, seconds = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            result = train(config(run, args.epochs, seed))
            seconds.append(time.perf_counter() - t0)
            results.append(scores(result.model, test.x, test.y))
            print(run, seed, results[-1], f"{seconds[-1]:.0f}s", file=sys.stderr, flush=True)
        rows.append((run, results, statistics.mean(seconds)))
    lines = [
        "# Distillation and data mixing on digits (`benchmarks/distill_mixing.py`)", "",
        f"Student digits-cnn, {args.epochs} epochs, Adam 1e-3, batch 64; seeds {args.seeds}; Linf eps {EPS}; "
        "500 digits test images. Mean (min-max) over seeds; seconds: training time per run.", "",
        f"torch {torch.__version__}, {platform.platform()}, 1 thread (shared CPU).", "",
        "| run | clean | PGD-20 | APGD-CE-100 | seconds |", "|---|---|---|---|---|",
    ]  # fmt: skip

    def cell(rs: list[dict[str, float]], key: str) -> str:
        vals = [r[key] for r in rs]
        if len(vals) == 1:
            return f"{vals[0]:.1%}"
        return f"{statistics.mean(vals):.1%} ({min(vals):.1%}-{max(vals):.1%})"

    for name, rs, sec in rows:
        lines.append(f"| {name} | {cell(rs, 'clean')} | {cell(rs, 'pgd')} | {cell(rs, 'apgd')} | {sec:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
