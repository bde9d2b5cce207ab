"""Minimum-norm attacks: robustkit vs adv-lib 0.2.8 vs foolbox 3.3.4 on the same model and images.

    python benchmarks/min_norm.py [--n 64] [--models resnet20,resnet4b,mnist] [--device cpu]
                                  [--attacks fmn,ddn,alma,cw,deepfool,fab] [--scale 1.0] [--repeat 1]
                                  [--min-seconds 0]

For each model, the first ``n`` test images it classifies correctly (CIFAR-10 for resnet20 and
resnet4b, MNIST for mnist-cnn-a); every library attacks those points without eps at the same
budget (``--scale`` multiplies the step counts). Prints one Markdown table per model: the
median distance (failures count as inf, so a median of inf means under half succeeded), the
success rate and the seconds of each library (the best of ``--repeat`` interleaved runs, more
for short attacks with ``--min-seconds``), and robustkit's best time over adv-lib's; "–" where
a library lacks the attack (foolbox has no ALMA and no FAB; adv-lib's DeepFool and foolbox's
differ in where the overshoot applies: per step vs on the total perturbation). Every library's
points are judged the same way: the model's prediction on them, the norm of ``x_adv - x`` (L0:
changed coordinates).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from collections.abc import Callable

import numpy as np
import torch
from common import SHARED, cifar10, machine

import robustkit.attacks  # noqa: F401  (registers the attacks)
from robustkit import ThreatModel
from robustkit.models import load_model
from robustkit.registry import ATTACKS

INF = math.inf
MAX_ROUNDS = 30
P = {"l0": 0, "l1": 1, "l2": 2, "linf": INF}
MODELS = {"resnet20": ("resnet20", "resnet20-12fca82f.th"), "resnet4b": ("resnet4b", "abcrown_resnet4b.pth"),
          "mnist": ("mnist-cnn-a", "abcrown_mnist_cnn_a_adv.pth")}
# (attack, norm, budget): the same budget for every library
CASES = [("fmn", norm, {"steps": 100}) for norm in ("linf", "l2", "l1", "l0")] + [
    ("ddn", "l2", {"steps": 100}),
    ("alma", "l2", {"steps": 100}),
    ("alma", "l1", {"steps": 100}),
    ("cw", "l2", {"binary_search_steps": 5, "steps": 100}),
    ("deepfool", "l2", {"steps": 50}),
    ("deepfool", "linf", {"steps": 50}),
    ("fab", "linf", {"steps": 20}),
    ("fab", "l2", {"steps": 20}),
    ("fab", "l1", {"steps": 20}),
]


def mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(SHARED / "mnist.npz") as f:
        return torch.from_numpy(f["x_test"][:n]).float().div(255)[:, None].contiguous(), \
            torch.from_numpy(f["y_test"][:n]).long()


def clean_points(net: torch.nn.Module, key: str, n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (mnist if key == "mnist" else cifar10)(3 * n)
    x, y = x.to(dev), y.to(dev)
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    return x[ok][:n].contiguous(), y[ok][:n]


def adv_lib_attack(name: str, norm: str, budget: dict[str, int]) -> Callable | None:
    sys.modules.setdefault("visdom", types.ModuleType("visdom"))  # imported by adv-lib's optional logger
    import adv_lib.attacks as al

    steps = budget.get("steps")
    return {
        "fmn": lambda m, x, y: al.fmn(m, x, y, norm=P[norm], steps=steps),
        "ddn": lambda m, x, y: al.ddn(m, x, y, steps=steps),
        "alma": lambda m, x, y: al.alma(m, x, y, num_steps=steps, distance=norm),
        "cw": lambda m, x, y: al.carlini_wagner_l2(m, x, y, max_iterations=steps,
                                                   binary_search_steps=budget.get("binary_search_steps", 9)),
        "deepfool": lambda m, x, y: al.df(m, x, y, norm=P[norm], steps=steps),
        "fab": lambda m, x, y: al.fab(m, x, y, norm=P[norm], n_iter=steps),
    }[name]


def foolbox_attack(name: str, norm: str, budget: dict[str, int]) -> Callable | None:
    import foolbox as fb

    steps = budget.get("steps")
    make = {
        ("fmn", "l0"): lambda: fb.attacks.L0FMNAttack(steps=steps),
        ("fmn", "l1"): lambda: fb.attacks.L1FMNAttack(steps=steps),
        ("fmn", "l2"): lambda: fb.attacks.L2FMNAttack(steps=steps),
        ("fmn", "linf"): lambda: fb.attacks.LInfFMNAttack(steps=steps),
        ("ddn", "l2"): lambda: fb.attacks.DDNAttack(steps=steps),
        ("cw", "l2"): lambda: fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=budget.get("binary_search_steps", 9), steps=steps),
        ("deepfool", "l2"): lambda: fb.attacks.L2DeepFoolAttack(steps=steps),
        ("deepfool", "linf"): lambda: fb.attacks.LinfDeepFoolAttack(steps=steps),
    }.get((name, norm))
    if make is None:
        return None
    attack = make()

    def run(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, clipped, _ = attack(fb.PyTorchModel(m, bounds=(0, 1), device=x.device), x, y, epsilons=None)
        return clipped

    return run


def score(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
          norm: str) -> tuple[float, float]:
    """Median distance (inf for failures) and success rate of the points ``x_adv``."""
    with torch.no_grad():
        success = net(x_adv).argmax(1) != y
    dist = ThreatModel(norm, INF).norm_of(x_adv - x)
    dist = torch.where(success, dist, torch.full_like(dist, INF))
    return float(np.median(dist.double().cpu().numpy())), float(success.float().mean())


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "success":
        return f"{value:.0%}"
    if kind == "seconds":
        return f"{value:.1f}"
    return "inf" if value == INF else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--models", default="resnet20,resnet4b,mnist")
    parser.add_argument("--attacks", default="fmn,ddn,alma,cw,deepfool,fab")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per library (the best counts)")
    parser.add_argument("--min-seconds", type=float, default=0.0,
                        help=f"more runs (up to {MAX_ROUNDS}) until robustkit's add up to this")
    args = parser.parse_args()
    dev = torch.device(args.device)
    wanted = args.attacks.split(",")
    print(f"{machine()}; {args.n} clean test images per model, no eps\n")
    for key in args.models.split(","):
        arch, file = MODELS[key]
        net = load_model(arch, SHARED / "models" / file).eval().to(dev)
        for p in net.parameters():
            p.requires_grad_(False)
        x, y = clean_points(net, key, args.n, dev)
        warm = x.clone().requires_grad_(True)  # warm-up: the first timed library should not pay for it
        torch.autograd.grad(net(warm).sum(), warm)
        print(f"### {key} ({len(x)} images)\n")
        print("| attack | norm | budget | median distance: robustkit / adv-lib / foolbox | success | seconds "
              "(best run) | runs | time robustkit / adv-lib |")
        print("|---|---|---|---|---|---|---|---|")
        for name, norm, budget in CASES:
            if name not in wanted:
                continue
            budget = {k: max(1, round(v * args.scale)) if k == "steps" else v for k, v in budget.items()}
            libs = {
                "robustkit": lambda m, xx, yy, name=name, norm=norm, budget=budget: ATTACKS.get(name)(
                    ThreatModel(norm, INF), **budget)(m, xx, yy).x_adv,
                "adv-lib": adv_lib_attack(name, norm, budget),
                "foolbox": foolbox_attack(name, norm, budget),
            }
            seconds: dict[str, list[float]] = {lib: [] for lib, run in libs.items() if run is not None}
            points: dict[str, torch.Tensor] = {}
            # interleaved rounds (a slow spell of the machine hits every library), the order rotated each
            # round (running first costs a few percent here), at least --repeat and until robustkit has
            # run --min-seconds (short attacks: sub-second runs vary by +-20%)
            order = list(seconds)
            while len(seconds["robustkit"]) < args.repeat or (
                    sum(seconds["robustkit"]) < args.min_seconds and len(seconds["robustkit"]) < MAX_ROUNDS):
                for lib in order:
                    start = time.perf_counter()
                    points[lib] = libs[lib](net, x, y)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[lib].append(time.perf_counter() - start)
                order = order[1:] + order[:1]
            cells = {lib: (*score(net, x, y, points[lib], norm), min(seconds[lib])) if lib in seconds else None
                     for lib in libs}
            cols = [" / ".join(fmt(None if c is None else c[i], kind) for c in cells.values())
                    for i, kind in enumerate(("median", "success", "seconds"))]
            ratio = min(seconds["robustkit"]) / min(seconds["adv-lib"])
            steps = ", ".join(f"{k}={v}" for k, v in budget.items())
            rounds = len(seconds["robustkit"])
            print(f"| {name} | {norm} | {steps} | {cols[0]} | {cols[1]} | {cols[2]} | {rounds} | {ratio:.2f} |",
                  flush=True)
        print()


if __name__ == "__main__":
    main()
