"""Cost of an FGSM-AT epoch relative to a standard-training epoch (same model, data, batch size).

    python benchmarks/train_cost.py [--model mnist-cnn-a] [--n 4096] [--epochs 3] [--repeats 3]

Both methods run through ``robustkit.training.loop`` with the per-epoch evaluation switched off
(``val_size=0``), so an epoch's ``seconds`` is the training loop alone: data, attack, forward,
backward, optimizer step. Runs are interleaved (standard, fgsm-at, standard, ...) so load on a
shared machine hits both alike; the ratio uses each method's fastest epoch. The goal is
FGSM-AT / standard <= 2.1: one extra forward and one input-only backward per step.
Also reports fgsm-rs and pgd-at (10 steps) for scale. Writes ``benchmarks/results/train_cost.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from robustkit.training.loop import TrainConfig, train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-cnn-a")
    ap.add_argument("--data", default="mnist", choices=["mnist", "digits", "cifar10"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="standard,fgsm-at,fgsm-rs,pgd-at")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=str(HERE / "results" / "train_cost.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dataset, eps = {
        "mnist": (f"npz:{SHARED / 'mnist.npz'}", 0.3),
        "cifar10": (f"npz:{SHARED / 'cifar10_train1000.npz'}", 8 / 255),
        "digits": ("digits", 0.1),
    }[args.data]
    methods = args.methods.split(",")
    best: dict[str, float] = {m: float("inf") for m in methods}
    for rep in range(args.repeats):
        for method in methods:
            cfg = TrainConfig(method=method, model=args.model, dataset=dataset, n_examples=args.n, eps=eps,
                              epochs=args.epochs, batch_size=args.batch_size, val_size=0, device=args.device,
                              schedule="constant", lr=0.01, seed=rep)
            seconds = [r["seconds"] for r in train(cfg).history]
            best[method] = min(best[method], *seconds)
            print(f"repeat {rep} {method}: epochs {' '.join(f'{s:.2f}s' for s in seconds)}", flush=True)
    base = best["standard"]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    lines = [
        "# Training cost per epoch",
        "",
        f"`python benchmarks/train_cost.py` — {args.model} on {args.data} ({args.n} images, batch {args.batch_size}), "
        f"{device}, torch {torch.__version__}; fastest of {args.repeats}×{args.epochs} epochs per method, runs "
        "interleaved; evaluation off (training loop only).",
        "",
        "| method | seconds / epoch | ratio to standard |",
        "|---|---|---|",
    ]
    for m in methods:
        lines.append(f"| {m} | {best[m]:.2f} | {best[m] / base:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    ratio = best.get("fgsm-at", base) / base
    print(f"FGSM-AT / standard = {ratio:.2f} (goal <= 2.1)")
    return 0 if ratio <= 2.1 else 1


if __name__ == "__main__":
    sys.exit(main())
