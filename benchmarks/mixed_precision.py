"""Robust accuracy under autocast fp32 / bf16 / fp16 (issue 22): the same attacks, the same images.

    python benchmarks/mixed_precision.py [--n 128] [--models resnet20,resnet4b] [--eps 2/255]
        [--attacks pgd,apgd-ce,autoattack] [--apgd-steps 100] [--square-queries 100] [--aa-n 64]
        [--device cpu]

For every model and precision: the fraction of clean-correct points whose CE input gradient at x
is all zero (the fp16 underflow), then robust accuracy (over all n points, clean errors count as
broken) of PGD-10, APGD-CE and AutoAttack standard (on the first ``--aa-n`` images, Square with
``--square-queries``). Prints a Markdown table; seed 0, Linf. On the CPU, autocast fp16 runs
(slowly) through torch's CPU half kernels, which is enough to show the numerics.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import cifar10, machine, model

from robustkit import ThreatModel
from robustkit.attack import Forward, attack_mode
from robustkit.attacks import APGD, PGD, AutoAttack


def zero_grad_fraction(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: str | None) -> float:
    """Fraction of the clean-correct points whose input gradient of the CE loss is all zero."""
    forward = Forward(net, autocast)
    with torch.no_grad():
        keep = Forward(net)(x).argmax(1) == y
    xg = x[keep].clone().requires_grad_(True)
    with attack_mode(net):  # as attacks run it: eval mode, parameters frozen
        (g,) = torch.autograd.grad(F.cross_entropy(forward(xg), y[keep], reduction="sum"), xg)
    return float((g.flatten(1).abs().amax(1) == 0).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--models", default="resnet20,resnet4b")
    p.add_argument("--eps", default="2/255")
    p.add_argument("--attacks", default="pgd,apgd-ce,autoattack")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--square-queries", type=int, default=100)
    p.add_argument("--aa-n", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    num, den = args.eps.split("/") if "/" in args.eps else (args.eps, "1")
    threat = ThreatModel("linf", float(num) / float(den))
    dev = torch.device(args.device)
    x, y = cifar10(args.n)
    x, y = x.to(dev), y.to(dev)
    print(f"# {machine()}; n={args.n} (AutoAttack n={args.aa_n}, Square {args.square_queries} queries), "
          f"Linf {args.eps}, seed 0\n")
    print("| model | precision | zero grads | " + " | ".join(args.attacks.split(",")) + " | seconds |")
    print("|---|---|---|" + "---|" * len(args.attacks.split(",")) + "---|")
    for name in args.models.split(","):
        net = model(name).to(dev)
        for prec in args.precisions.split(","):
            cast = None if prec == "fp32" else prec
            cells, t0 = [], time.perf_counter()
            for attack_name in args.attacks.split(","):
                if attack_name == "pgd":
                    attack, xs, ys = PGD(threat, steps=10, autocast=cast), x, y
                elif attack_name == "apgd-ce":
                    attack, xs, ys = APGD(threat, steps=args.apgd_steps, autocast=cast), x, y
                else:
                    attack = AutoAttack(threat, autocast=cast,
                                        stage_options={"square": {"n_queries": args.square_queries}})
                    xs, ys = x[:args.aa_n], y[:args.aa_n]
                with torch.no_grad():
                    clean = Forward(net)(xs).argmax(1) == ys
                out = attack(net, xs, ys)
                cells.append(f"{100 * float((clean & ~out.success.to(dev)).float().mean()):.1f}%")
            zero = zero_grad_fraction(net, x, y, cast)
            print(f"| {name} | {prec} | {100 * zero:.1f}% | " + " | ".join(cells)
                  + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
