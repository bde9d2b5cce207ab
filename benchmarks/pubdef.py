"""PubDef vs PGD-AT vs standard training under transfer attacks from public models, on digits.

    python benchmarks/pubdef.py [--work runs/pubdef-bench] [--eps 0.2] [--epochs 30]

Everything through the ``robustkit`` command, as a user would run it (the commands are printed):

1. public (source) models: ``digits-cnn`` trained normally with seeds 1, 2, 3; ``timm:resnet10t``
   trained normally (seed 2, 5 epochs, another architecture); ``digits-cnn`` PGD-AT seed 4
   (``--epochs`` epochs);
2. target models (``digits-cnn``, seed 0, equal budget: ``--epochs`` epochs, 10 attack steps per
   batch for both defenses): standard, PGD-AT, PubDef (``random`` and ``top1`` selection) trained
   against the sources *seen* = {standard seed 1, PGD-AT seed 4};
3. ``robustkit eval --attack transfer`` (PGD, MI-, DI-, TI-, MDTI-FGSM, 10 steps each, crafted on
   each surrogate, the per-sample worst case over all of them) from the *held-out* surrogates
   {standard seeds 2, 3, resnet10t} and from the seen ones, plus white-box PGD-10, on the 500
   digits test images.

Prints a Markdown table and writes ``benchmarks/results/pubdef.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pubdef.md"
SEEN = ["src1", "srcat"]
HELD_OUT = [("digits-cnn", "src2"), ("digits-cnn", "src3"), ("timm:resnet10t", "src-resnet10t")]


def robustkit(*args: str, out: Path | None = None) -> str:
    """Run ``robustkit ARGS`` (printed); its stdout, also written to ``out``."""
    print("$ robustkit " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "robustkit", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"robustkit {args[0]} failed:\n{done.stderr[-2000:]}")
    if out is not None:
        out.write_text(done.stdout)
    return done.stdout


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"


def train(work: Path, name: str, *args: str) -> None:
    if not (work / name / "model.safetensors").is_file():
        robustkit("train", *args, "--out", str(work / name), "--quiet")


def rows(path: Path) -> dict[str, dict]:
    return {r["attack"]: r for r in json.loads(path.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/pubdef-bench", help="Folder for the models and results.")
    parser.add_argument("--eps", default="0.2")
    parser.add_argument("--epochs", default="30")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eps, epochs = ["--eps", args.eps], ["--epochs", args.epochs]
    for seed in (1, 2, 3):
        train(work, f"src{seed}", "standard", "--dataset", "digits", "--seed", str(seed), "--epochs", "10")
    train(work, "src-resnet10t", "standard", "--model", "timm:resnet10t", "--normalize", "none", "--dataset",
          "digits", "--seed", "2", "--epochs", "5")
    train(work, "srcat", "pgd-at", "--dataset", "digits", *eps, *epochs, "--seed", "4")
    seen = ",".join(str(work / s / "model.safetensors") for s in SEEN)
    targets = {
        "t-std": ("standard", []),
        "t-pgdat": ("pgd-at", []),
        "t-pubdef": ("pubdef", ["--surrogate-checkpoint", seen]),
        "t-pubdef-top1": ("pubdef", ["--surrogate-checkpoint", seen, "--selection", "top1"]),
    }
    for name, (method, extra) in targets.items():
        train(work, name, method, "--dataset", "digits", *eps, *epochs, "--seed", "0", *extra)
    db = str(work / "eval.db")
    table = ["| target | train s | clean | white-box PGD-10 | transfer, seen sources | transfer, held-out "
             "(worst of 15) | weakest held-out source × attack |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in targets:
        ckpt = str(work / name / "model.safetensors")
        common = ["eval", "--db", db, "--checkpoint", ckpt, *eps, "--json"]
        held = rows_of(work, name, "heldout", [*common, "--attack", "transfer", "--surrogate",
                                               ",".join(m for m, _ in HELD_OUT), "--surrogate-checkpoint",
                                               ",".join(str(work / s / "model.safetensors") for _, s in HELD_OUT)])
        seen_rows = rows_of(work, name, "seen", [*common, "--attack", "transfer", "--surrogate-checkpoint", seen])
        white = rows_of(work, name, "wb", [*common, "--attack", "pgd"])
        weakest = min((r for k, r in held.items() if k != "transfer"), key=lambda r: r["robust_acc"])
        metrics = json.loads((work / name / "metrics.json").read_text())["epochs"]
        seconds = sum(e["seconds"] for e in metrics)
        table.append(f"| {name} | {seconds:.0f} | {held['transfer']['clean_acc']:.1%} | "
                     f"{white['pgd']['robust_acc']:.1%} | {seen_rows['transfer']['robust_acc']:.1%} | "
                     f"{held['transfer']['robust_acc']:.1%} | {weakest['attack']} {weakest['robust_acc']:.1%} |")
    text = "\n".join(table)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# PubDef on digits, Linf eps {args.eps}, {args.epochs} epochs\n\n{text}\n\n"
                       f"train s: summed epoch seconds, {machine()}.\n")


def rows_of(work: Path, name: str, kind: str, args: list[str]) -> dict[str, dict]:
    path = work / f"{kind}-{name}.json"
    if not path.is_file() or not path.read_text().strip():
        robustkit(*args, out=path)
    return rows(path)


if __name__ == "__main__":
    main()
