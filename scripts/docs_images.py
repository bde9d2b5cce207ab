"""Regenerate the README's figures in docs/images/ from real models and images (../shared/data).

    # curve.png: FMN (Linf, L2; 100 steps) on resnet20 and resnet4b, the first 64 CIFAR-10 test images
    python scripts/docs_images.py curve
    # plot.png and scaling.png: from a leaderboard holding eps sweeps, e.g. made with
    #   M=../shared/data/models D=npz:../shared/data/cifar10_test1000.npz
    #   robustkit eval --db lb.db --model resnet20,resnet4b \
    #       --checkpoint $M/resnet20-12fca82f.th,$M/abcrown_resnet4b.pth --dataset $D --n-examples 32 \
    #       --attack fgsm,pgd,apgd-ce --eps 1/255,2/255,4/255,8/255        (and --norm l2 --eps 0.1,0.25,0.5,1.0)
    #   robustkit eval --db lb.db --model digits-cnn --n-examples 64 --attack fgsm,pgd,apgd-ce \
    #       --eps 0.02,0.05,0.1,0.2,0.3
    python scripts/docs_images.py board --db lb.db

The curve is computed here from the attack's per-sample distances (robust accuracy at eps = the
share of points classified correctly whose smallest adversarial perturbation found is larger than
eps), the frame that ``robustkit plot --curve`` draws from stored curves.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "images"
MODELS = {"resnet4b": "abcrown_resnet4b.pth", "resnet20": "resnet20-12fca82f.th"}
GRID_TOP = {"linf": 16 / 255, "l2": 2.0}


def curve_frame_from_fmn(n: int = 64, steps: int = 100, cache: Path | None = None) -> pd.DataFrame:
    """One curve per model and norm: FMN's distances on the first ``n`` CIFAR-10 test images
    (kept in ``cache``, when given, so that an interrupted run resumes)."""
    import torch

    from robustkit import ThreatModel, load_dataset
    from robustkit.attacks import FMN
    from robustkit.models import file_sha256, load_model

    data = load_dataset(f"npz:{SHARED / 'cifar10_test1000.npz'}", n_examples=n)
    rows = []
    for name, file in MODELS.items():
        path = SHARED / "models" / file
        model = load_model(name, path).eval()
        with torch.no_grad():
            correct = (model(data.x).argmax(1) == data.y).numpy()
        for norm, top in GRID_TOP.items():
            start = time.perf_counter()
            saved = cache / f"fmn-{name}-{norm}-{n}-{steps}.npy" if cache else None
            if saved is not None and saved.exists():
                distance = np.load(saved)
            else:
                result = FMN(ThreatModel(norm, math.inf), steps=steps)(model, data.x, data.y)
                distance = np.where(correct, result.distance.numpy(), 0.0)
                if saved is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    np.save(saved, distance)
            print(f"{name} fmn {norm}: median distance {np.median(distance):.4g}, "
                  f"{time.perf_counter() - start:.0f} s")
            for eps in np.linspace(0, top, 161):
                rows.append({"model": name, "defense": "", "checkpoint": file_sha256(path), "dataset": data.name,
                             "norm": norm, "attack": "fmn", "n": n, "eps": float(eps),
                             "robust_acc": float((distance > eps).mean()), "clean_acc": float(correct.mean())})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["curve", "board"])
    parser.add_argument("--db", help="Leaderboard file (board).")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, help="Folder keeping each attack's distances (curve).")
    args = parser.parse_args()
    from robustkit.results.plot import plot_curves, plot_leaderboard

    if args.what == "curve":
        frame = curve_frame_from_fmn(cache=args.cache)
        print(plot_curves(frame, args.out / "curve.png"))
        return
    from robustkit.results.leaderboard import Leaderboard
    from robustkit.results.scaling import plot_scaling, scaling_reports

    frame = Leaderboard(args.db, create=False).frame()
    frame["dataset"] = frame["dataset"].map(lambda d: f"npz:{Path(d[4:]).name}" if d.startswith("npz:") else d)
    print(plot_leaderboard(frame, args.out / "plot.png"))
    plot_scaling(scaling_reports(frame), str(args.out / "scaling.png"))
    print(args.out / "scaling.png")


if __name__ == "__main__":
    main()
