"""Catastrophic overfitting (CO) of plain FGSM-AT, and the FGSM-AT tricks that prevent it, on CPU.

    python benchmarks/co_fgsm_tricks.py [--runs fgsm-at,weight-reg,mask,mask+weight-reg] [--seed 0]

Default setting (CPU-sized: ~2 minutes per run on one core): MNIST training images 0–9999 of
../shared/data/mnist.npz, Linf eps 0.3 reached by a linear ramp over the first 2 epochs, the
``mnist-cnn-a`` CNN (the MNIST network of Wong et al.'s "Fast is better than free" code), Adam
lr 1e-3, batch 128, 10 epochs, fixed seed. The detector's held-out batch is MNIST *test* images
0–255, measured after every epoch (PGD-10 with step eps/4 and a random start, and FGSM). Every
run trains the same network from the same initialization with ``robustkit.training.loop``; only the
tricks differ. ``--data cifar10`` / ``digits`` switch to the CIFAR-10 1000-image subset or
scikit-learn's digits (see ``--help``).

The table gives, per run, whether and when the detector flagged CO and the PGD-10 / FGSM accuracy
by epoch. The script exits 1 unless plain fgsm-at is flagged and at least one trick run is not.
Writes ``benchmarks/results/co_fgsm_tricks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from robustkit.training.loop import TrainConfig, train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
RESULTS = HERE / "results" / "co_fgsm_tricks.md"
DATA_TEXT = {
    "cifar10": "CIFAR-10 training images 0–{n_1} (held-out batch: test images 0–{v_1})",
    "digits": "scikit-learn digits, the first {n} training images (held-out batch: the first {v} test images)",
    "mnist": "MNIST training images 0–{n_1} (held-out batch: test images 0–{v_1})",
}


#: run name -> (method, tricks). The expected outcome is checked for the fgsm-at runs only;
#: fgsm-rs and pgd-at are references.
RUNS = {
    "fgsm-at": ("fgsm-at", []),
    "mask": ("fgsm-at", ["mask"]),
    "weight-reg": ("fgsm-at", ["weight-reg"]),
    "mask+weight-reg": ("fgsm-at", ["mask", "weight-reg"]),
    "stride": ("fgsm-at", ["stride"]),
    "smooth-act": ("fgsm-at", ["smooth-act"]),
    "fgsm-rs": ("fgsm-rs", []),
    "pgd-at": ("pgd-at", []),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="fgsm-at,weight-reg,mask,mask+weight-reg")
    ap.add_argument("--data", default="mnist", choices=["mnist", "cifar10", "digits"])
    ap.add_argument("--model", default="mnist-cnn-a")
    ap.add_argument("--eps", default="0.3")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eps-warmup", type=float, default=2.0, help="epochs of linear eps ramp")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--n", type=int, default=10000, help="training images (the first n)")
    ap.add_argument("--val-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--every", type=int, default=1, help="show every k-th epoch in the table")
    ap.add_argument("--mask-ratio", type=float, default=None)
    ap.add_argument("--reg-lambda", type=float, default=None)
    ap.add_argument("--reg-p", type=float, default=None)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_npz, test_npz = SHARED / "cifar10_train1000.npz", SHARED / "cifar10_test1000.npz"
    if args.data == "digits":
        dataset, val_dataset = "digits", "digits"
    elif args.data == "mnist":
        dataset = val_dataset = f"npz:{SHARED / 'mnist.npz'}"
    else:
        dataset, val_dataset = f"npz:{train_npz}", f"npz:{test_npz}"
    if args.data != "digits" and not train_npz.is_file():
        print(f"needs {train_npz} (../shared/data next to the checkout)", file=sys.stderr)
        return 2
    extra = {k: v for k, v in (("mask_ratio", args.mask_ratio), ("reg_lambda", args.reg_lambda),
                               ("reg_p", args.reg_p)) if v is not None}
    results = []
    for run in args.runs.split(","):
        cfg = TrainConfig(
            method=RUNS[run][0], model=args.model, dataset=dataset, n_examples=args.n,
            val_dataset=val_dataset, val_size=args.val_size, eps=args.eps, epochs=args.epochs,
            eps_warmup_epochs=args.eps_warmup,
            batch_size=128, optimizer=args.optimizer, lr=args.lr, momentum=0.9, weight_decay=5e-4,
            schedule=args.schedule, tricks=RUNS[run][1], seed=args.seed, device="cpu", **extra,
        )  # fmt: skip
        t0 = time.perf_counter()
        res = train(cfg)
        seconds = time.perf_counter() - t0
        first = next((c for c in res.checks if c.flagged), None)
        results.append((run, cfg, res, seconds, first))
        h = res.history
        print(f"{run}: {seconds:.0f}s, CO {'at epoch ' + str(first.epoch) if first else 'no'}; last: clean "
              f"{h[-1]['clean_acc']:.3f} fgsm {h[-1]['fgsm_acc']:.3f} pgd {h[-1]['pgd_acc']:.3f}", flush=True)
        print("  pgd  " + " ".join(f"{r['pgd_acc']:.2f}" for r in h), flush=True)
        print("  fgsm " + " ".join(f"{r['fgsm_acc']:.2f}" for r in h), flush=True)

    text = render(results, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    flagged = {run: first is not None for run, _c, _r, _s, first in results}
    tricks = [run for run, cfg, *_ in results if cfg.method == "fgsm-at" and cfg.tricks]
    ok = flagged.get("fgsm-at", False) and any(not flagged[r] for r in tricks)
    return 0 if ok else 1


def render(results: list, args: argparse.Namespace) -> str:
    cfg = results[0][1]
    lines = [
        "# Catastrophic overfitting of FGSM-AT and the bag of tricks",
        "",
        f"`{' '.join(['python benchmarks/co_fgsm_tricks.py', *sys.argv[1:]])}` — {args.model} on "
        f"{DATA_TEXT[args.data].format(n=args.n, v=args.val_size, n_1=args.n - 1, v_1=args.val_size - 1)}, "
        f"Linf eps {args.eps}, {args.epochs} epochs, {args.optimizer} lr {args.lr} ({args.schedule}), batch 128, "
        f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU. "
        f"PGD-10 (step eps/4, random start) and FGSM accuracy "
        f"after every epoch. Tricks at robustkit's defaults: mask ratio {cfg.mask_ratio}, reg lambda "
        f"{cfg.reg_lambda}, p {cfg.reg_p} (ours; see defenses/fgsm_tricks.py).",
        "",
        "| run | CO flagged (first epoch) | flagged at the end | best PGD acc | final clean | final FGSM | final PGD "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, _cfg, res, seconds, first in results:
        h = res.history
        best = max(r["pgd_acc"] for r in h)
        lines.append(
            f"| {run} | {'**yes** (epoch ' + str(first.epoch) + ')' if first else 'no'} | "
            f"{'yes' if res.checks and res.checks[-1].flagged else 'no'} | {best:.1%} | "
            f"{h[-1]['clean_acc']:.1%} | {h[-1]['fgsm_acc']:.1%} | {h[-1]['pgd_acc']:.1%} | {seconds / 60:.1f} |"
        )
    epochs = sorted({e for e in range(args.every, args.epochs + 1, args.every)} | {1, args.epochs})
    lines += ["", "PGD-10 / FGSM accuracy on the held-out batch by epoch (CO-flagged epochs marked *):", ""]
    lines.append("| run | " + " | ".join(f"ep {e}" for e in epochs) + " |")
    lines.append("|---|" + "---|" * len(epochs))
    for run, _cfg, res, _s, _f in results:
        by_epoch = {r["epoch"]: r for r in res.history}
        cells = []
        for e in epochs:
            r = by_epoch.get(e)
            cells.append("—" if r is None else f"{r['pgd_acc']:.0%} / {r['fgsm_acc']:.0%}{'*' if r['co'] else ''}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    first_reason = next((f.reason for run, _c, _r, _s, f in results if f is not None), "")
    if first_reason:
        lines += ["", f"Detector's reason on the fgsm-at run: {first_reason}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
