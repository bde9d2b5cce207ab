"""One-Pixel Shortcut (OPS): clean test accuracy of a network trained on clean data vs on OPS data.

    python benchmarks/one_pixel_shortcut.py [--data mnist,digits,cifar10] [--seed 0]

For each data set, the same network is trained twice with ``robustkit.training.loop`` (method
``standard``, same recipe, same seed, so the same initialization and batch order): once on the
clean training images and once on their OPS copy, which is written with
``OnePixelShortcut.save`` and read back through robustkit's ``npz:PATH`` loader. Both models are
scored on the clean test set. How much the OPS model relies on the pixel is measured twice: on
the test images with their own class pixel put in, and with the pixel of class (y+1) mod K put in
(the fraction predicted as that class; about 1/K for a model that ignores the pixel).

CPU-sized defaults (about 3 minutes on one thread): all 60,000 MNIST training images with
``mnist-cnn-a`` (5 epochs), scikit-learn digits (1,297 training images) with ``digits-cnn``
(30 epochs), and the CIFAR-10 training images 0–999 with ``cifar-conv-small`` (60 epochs);
SGD momentum 0.9, weight decay 5e-4, batch 128, learning rate decayed 10× at 1/2 and 3/4 of
the run (the paper's schedule shape), no data augmentation. The paper's setting (all of
CIFAR-10, ResNet-18, 200 epochs, crop+flip augmentation) cannot run here.

Exits 1 unless, on the ``cifar10`` row (the paper's data), the OPS model's clean test accuracy is
at most 3/4 of the clean model's and it follows another class's pixel on more than half of the
test images; the other rows are reported, not checked (see the results file for why MNIST and
digits do not collapse). Writes ``benchmarks/results/one_pixel_shortcut.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from robustkit.data import load_dataset
from robustkit.defenses.one_pixel_shortcut import OnePixelShortcut, apply
from robustkit.training.loop import TrainConfig, train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
RESULTS = HERE / "results" / "one_pixel_shortcut.md"


@dataclass(frozen=True)
class Setting:
    train: str
    test: str
    text: str
    model: str
    epochs: int
    lr: float


SETTINGS = {
    "mnist": Setting(f"npz:{SHARED / 'mnist.npz'}", f"npz:{SHARED / 'mnist.npz'}",
                     "MNIST (60,000 train / 10,000 test)", "mnist-cnn-a", 5, 0.05),
    "digits": Setting("digits", "digits", "sklearn digits 8×8 (1,297 train / 500 test)", "digits-cnn", 30, 0.05),
    "cifar10": Setting(f"npz:{SHARED / 'cifar10_train1000.npz'}", f"npz:{SHARED / 'cifar10_test1000.npz'}",
                       "CIFAR-10 train 0–999 / test 0–999", "cifar-conv-small", 60, 0.05),
}  # fmt: skip


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def run(name: str, s: Setting, seed: int, workdir: Path) -> dict:
    clean = load_dataset(s.train, split="train")
    test = load_dataset(s.test, split="test")
    ops = OnePixelShortcut()
    t0 = time.perf_counter()
    pattern = ops.fit(clean)
    search_s = time.perf_counter() - t0
    npz, _pattern_file = ops.save(clean, workdir / name)
    poisoned = load_dataset(f"npz:{npz}", split="train")
    assert torch.equal(poisoned.x, ops.transform(clean).x), "the npz round trip changed the OPS data"
    out: dict = {"name": name, "setting": s, "pattern": pattern, "search_s": search_s, "n_train": len(clean),
                 "n_test": len(test)}  # fmt: skip
    for tag, dataset in (("clean", s.train), ("ops", f"npz:{npz}")):
        cfg = TrainConfig(
            method="standard", model=s.model, dataset=dataset, split="train", val_size=0, epochs=s.epochs,
            batch_size=128, optimizer="sgd", lr=s.lr, momentum=0.9, weight_decay=5e-4, schedule="multistep",
            milestones=[0.5, 0.75], seed=seed, device="cpu",
        )  # fmt: skip
        t0 = time.perf_counter()
        res = train(cfg)
        out[f"{tag}_minutes"] = (time.perf_counter() - t0) / 60
        out[f"{tag}_train_acc"] = res.history[-1]["train_acc"]
        out[f"{tag}_test_acc"] = accuracy(res.model, test.x, test.y)
        if tag == "ops":
            out["ops_test_with_pixel"] = accuracy(res.model, apply(test.x, test.y, pattern), test.y)
            # Another class's pixel on every test image: how often the model follows the pixel.
            other = (test.y + 1) % clean.num_classes
            out["ops_follows_other_pixel"] = accuracy(res.model, apply(test.x, other, pattern), other)
    print(
        f"{name}: clean model {out['clean_test_acc']:.1%}, OPS model {out['ops_test_acc']:.1%} on the clean test set "
        f"({out['ops_test_with_pixel']:.1%} with the class pixel, follows another class's pixel on "
        f"{out['ops_follows_other_pixel']:.1%}); search {search_s:.2f}s, "
        f"training {out['clean_minutes']:.1f} + {out['ops_minutes']:.1f} min",
        flush=True,
    )
    return out


def render(results: list[dict], args: argparse.Namespace) -> str:
    cores = os.cpu_count()
    lines = [
        "# One-Pixel Shortcut: training on OPS data vs on clean data",
        "",
        f"`{' '.join(['python benchmarks/one_pixel_shortcut.py', *sys.argv[1:]])}` — CPU "
        f"({platform.machine()}, {cores} cores shared with other jobs, {torch.get_num_threads()} torch thread), "
        f"torch {torch.__version__}, seed {args.seed}. Each row trains one network twice with "
        "`robustkit.training.loop` "
        "(method `standard`, same recipe and seed): on the clean training images and on their OPS copy "
        "(written by `OnePixelShortcut.save`, read back through the `npz:PATH` loader). SGD momentum 0.9, "
        "weight decay 5e-4, batch 128, lr ÷10 at 1/2 and 3/4 of the run, no augmentation. Accuracies are on "
        'the clean test images; "with pixel" puts each test image\'s class pixel in; "follows another class\'s '
        'pixel" puts the pixel of class (y+1) mod K in and counts predictions of that class (how much the OPS '
        "model relies on the shortcut; about 1/K for a model that ignores it).",
        "",
        "| data | model, epochs, lr | clean-trained: clean test acc | OPS-trained: clean test acc "
        "| train acc (clean / OPS) | OPS-trained: test acc with pixel | OPS-trained: follows another class's pixel "
        "| OPS search | training (clean / OPS) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s: Setting = r["setting"]
        lines.append(
            f"| {s.text} | {s.model}, {s.epochs}, {s.lr:g} | {r['clean_test_acc']:.1%} | **{r['ops_test_acc']:.1%}** "
            f"| {r['clean_train_acc']:.1%} / {r['ops_train_acc']:.1%} | {r['ops_test_with_pixel']:.1%} "
            f"| {r['ops_follows_other_pixel']:.1%} "
            f"| {r['search_s']:.2f} s "
            f"| {r['clean_minutes']:.1f} / {r['ops_minutes']:.1f} min |"
        )
    lines.append(
        "| *paper*: CIFAR-10 (50,000 / 10,000) | ResNet-18, 200, 0.1, crop+flip | *≈94%* | ***≈16%*** | — | — "
        "| — | — | 4× RTX 2080Ti |"
    )
    lines += [
        "",
        "Paper: Wu et al., ICLR 2023 (arXiv:2205.12141); the ≈94% → ≈16% ResNet-18 figures are the approximate "
        "values we were given for its CIFAR-10 results (we could not open its tables to quote exact cells). Its "
        "abstract states that a ResNet-18 adversarially trained on CIFAR-10-S (OPS on top of error-minimizing "
        "noise) reaches 10.61% test accuracy.",
        "",
        "Reading, per row (OPS-trained clean accuracy as a fraction of the clean-trained one; shortcut "
        '"learned" when the model follows another class\'s pixel on more than half of the test images):',
        "",
    ]
    for r in results:
        learned = r["ops_follows_other_pixel"] > 0.5
        lines.append(
            f"- {r['setting'].text}, {r['setting'].model}: the OPS model keeps "
            f"{r['ops_test_acc'] / max(r['clean_test_acc'], 1e-9):.0%} of the clean model's accuracy; "
            f"shortcut {'learned' if learned else 'not learned'} "
            f"(follows another class's pixel on {r['ops_follows_other_pixel']:.0%})."
        )
    lines += [
        "",
        "What differs from the paper: far less data and far fewer optimizer steps (CIFAR-10 here: 1,000 images, "
        "8 steps per epoch; the paper: 50,000 images, 391 steps per epoch for 200 epochs), small networks, no "
        "augmentation, one seed. Whether the pixel or the content is learned first decides the outcome, and on "
        "MNIST and 8×8 digits the content is learned about as fast as the pixel.",
        "",
        "Pixels the search chose (class: (row, col) colour bits, channel 0 first):",
        "",
    ]
    for r in results:
        p = r["pattern"]
        cells = ", ".join(
            f"{k}: {pos} {''.join(str(int(v)) for v in col)}"
            for k, (pos, col) in enumerate(zip(p.positions, p.colors, strict=True))
        )
        lines.append(f"- {r['setting'].text}: {cells}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"unknown data set {unknown[0]!r}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    if any(SETTINGS[n].train.startswith("npz:") for n in names) and not SHARED.is_dir():
        print(f"needs {SHARED} (../shared/data next to the checkout)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(n, SETTINGS[n], args.seed, Path(tmp)) for n in names]
    text = render(results, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    checked = [r for r in results if r["name"] == "cifar10"]
    ok = all(r["ops_test_acc"] <= 0.75 * r["clean_test_acc"] and r["ops_follows_other_pixel"] > 0.5 for r in checked)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
