"""RiFT (Zhu et al., ICCV 2023) on real adversarially trained models: clean and PGD accuracy
before and after, on images that took no part in any choice.

    python benchmarks/rift.py [--models cifar-conv-small,resnet4b,mnist-madry-tiny] [--epochs 10] [--lr 0.001]
    python benchmarks/rift.py --models resnet4b --module layer2.1.conv2 --lr 0.01 --out results/rift_resnet4b_mid.md

Per model: the MRC adversarial set and the fine-tuning data are training images (CIFAR-10
train 0-999, or MNIST train 0-1999); the held-out set that picks the epoch and alpha is test
images 0-499; the report set is test images 500-999, never seen by the procedure. Reference
defaults otherwise (radius 0.1, 10 ascent passes at lr 1, SGD-M lr 0.001, 10 epochs, alpha grid
0..1 step 0.1, PGD-10 at the model's training eps, step 2.5 eps / 10). Reported on the report
set: clean accuracy, PGD-10 and PGD-50 (one random start, step 2.5 eps / steps). Prints a
Markdown table and writes ``benchmarks/results/rift.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED, machine

from robustkit import ThreatModel
from robustkit.data import Dataset
from robustkit.models import load_model
from robustkit.training.rift import RiftConfig, clean_accuracy, robust_accuracy, run_rift

RESULTS = Path(__file__).resolve().parent / "results" / "rift.md"
SETTINGS = {
    # model: (checkpoint, eps, data, description)
    "cifar-conv-small": ("abcrown_cifar_conv_small_pgd.pth", 2 / 255, "cifar10", "ERAN ConvSmall, PGD-trained"),
    "resnet4b": ("abcrown_resnet4b.pth", 2 / 255, "cifar10", "ResNet-4B, adversarially trained at 2/255"),
    "mnist-madry-tiny": ("abcrown_mnist_madry_tiny_adv.pth", 0.3, "mnist", "Madry tiny CNN, adv. trained at 0.3"),
}


def datasets(kind: str) -> tuple[Dataset, Dataset, Dataset]:
    """(fine-tuning, selection, report) sets."""
    if kind == "cifar10":
        def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            with np.load(SHARED / name) as f:
                return (torch.from_numpy(f["x"]).permute(0, 3, 1, 2).float().div(255).contiguous(),
                        torch.from_numpy(f["y"]).long())
        xt, yt = load("cifar10_train1000.npz")
        xs, ys = load("cifar10_test1000.npz")
    else:
        with np.load(SHARED / "mnist.npz") as f:
            xt = torch.from_numpy(f["x_train"][:2000]).float().div(255)[:, None].contiguous()
            yt = torch.from_numpy(f["y_train"][:2000]).long()
            xs = torch.from_numpy(f["x_test"][:1000]).float().div(255)[:, None].contiguous()
            ys = torch.from_numpy(f["y_test"][:1000]).long()
    return (Dataset(kind + "-train", xt, yt, 10), Dataset(kind + "-test[0:500]", xs[:500], ys[:500], 10),
            Dataset(kind + "-test[500:1000]", xs[500:], ys[500:], 10))


def report(model: torch.nn.Module, data: Dataset, eps: float, seed: int) -> dict[str, float]:
    threat, cpu = ThreatModel("linf", eps), torch.device("cpu")
    return {"clean": clean_accuracy(model, data, cpu),
            "pgd10": robust_accuracy(model, data, threat, cpu, steps=10, seed=seed),
            "pgd50": robust_accuracy(model, data, threat, cpu, steps=50, seed=seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cifar-conv-small,resnet4b,mnist-madry-tiny")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mrc-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.001, help="Fine-tuning lr (the reference's 0.001).")
    parser.add_argument("--module", help="Fine-tune this module instead of the smallest-MRC one (one model).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="Markdown file to write.")
    args = parser.parse_args()
    if args.module and "," in args.models:
        parser.error("--module names a module of one model; give one --models name.")
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        ckpt, eps, kind, description = SETTINGS[name]
        train, select, test = datasets(kind)
        at = load_model(name, SHARED / "models" / ckpt).eval()
        before = report(at, test, eps, args.seed)
        config = RiftConfig(model=name, eps=eps, epochs=args.epochs, mrc_epochs=args.mrc_epochs, lr=args.lr,
                            module=args.module, seed=args.seed,
                            device="cpu", val_size=len(select))
        t0 = time.perf_counter()
        result = run_rift(config, model=at, data=train, val=select)
        seconds = time.perf_counter() - t0
        after = report(result.model, test, eps, args.seed)
        mrc = ", ".join(f"{r.module} {r.mrc:.3f}" for r in result.criticality)
        rows.append((name, description, eps, result, before, after, mrc, seconds))
        print(f"{name}: module {result.module}, alpha {result.alpha}, before {before}, after {after}, "
              f"{seconds:.0f} s", file=sys.stderr)
    lines = [
        f"RiFT, reference defaults except the data sizes (fine-tuning lr {args.lr:g}, {args.epochs} epochs, "
        f"{args.mrc_epochs} MRC passes); {machine()}.",
        "Fine-tuning / MRC data: training images; alpha and epoch picked on test 0-499 (selection); "
        "report on test 500-999 (never used by the procedure). PGD: Linf, random start, step 2.5 eps / steps.",
        "",
        f"| model | eps | module ({'--module' if args.module else 'smallest MRC'}) | alpha "
        "| selection clean / PGD-10 before -> after "
        "| report clean before -> after | report PGD-10 | report PGD-50 | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, description, eps, result, before, after, _mrc, seconds in rows:
        sb, sa = result.before, result.after
        eps_text = f"{round(eps * 255)}/255" if eps < 0.1 else f"{eps:g}"
        lines.append(
            f"| {name} ({description}) | {eps_text} | {result.module} | {result.alpha} "
            f"| {sb['clean_acc']:.1%} / {sb['robust_acc']:.1%} -> {sa['clean_acc']:.1%} / {sa['robust_acc']:.1%} "
            f"| {before['clean']:.1%} -> {after['clean']:.1%} | {before['pgd10']:.1%} -> {after['pgd10']:.1%} "
            f"| {before['pgd50']:.1%} -> {after['pgd50']:.1%} | {seconds:.0f} |")
    lines += ["", "MRC per module (mean adversarial CE increase at radius 0.1):", ""]
    lines += [f"- {name}: {mrc}" for name, _d, _e, _r, _b, _a, mrc, _s in rows]
    lines += ["", "Interpolation on the selection set (alpha: clean / PGD-10):", ""]
    for name, _d, _e, result, *_ in rows:
        pts = "; ".join(f"{p.alpha:g}: {p.clean_acc:.1%} / {p.robust_acc:.1%}" for p in result.interpolation)
        lines.append(f"- {name}: {pts}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# RiFT (`benchmarks/rift.py {' '.join(sys.argv[1:])}`)\n\n" + text)


if __name__ == "__main__":
    main()
