"""AutoAttack standard: robustkit's native cascade against pyautoattack on the same model and images.

    python benchmarks/autoattack.py [--n 100] [--model resnet4b] [--device cpu|cuda] [--autocast bf16]
                                    [--channels-last]

Both run the standard version (APGD-CE, APGD-T, FAB-T, Square-5000) at Linf 8/255 with seed 0 on
the first n CIFAR-10 test images of ../shared/data. Prints a Markdown table: robust accuracy after
each stage, seconds, the ratio (pyautoattack seconds / robustkit seconds), per-sample agreement,
and Square's queries per second for both.
"""

from __future__ import annotations

import argparse
import logging

import torch
from common import cifar10, machine, model, timed

from robustkit import ThreatModel
from robustkit.attacks import AutoAttack, Square


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--model", default="resnet4b")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], help="robustkit only (an option, off by default)")
    parser.add_argument("--channels-last", action="store_true", help="robustkit only (an option, off by default)")
    parser.add_argument("--square-queries", type=int, default=1000, help="for the queries/second comparison")
    args = parser.parse_args()
    from pyautoattack import AutoAttack as PyAA
    from pyautoattack.square import SquareAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    dev = torch.device(args.device)
    net = model(args.model).to(dev)
    x, y = cifar10(args.n)
    x, y = x.to(dev), y.to(dev)
    threat = ThreatModel("linf", args.eps)

    def robust(adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(adv).argmax(1) == y

    ours = AutoAttack(threat, seed=0, autocast=args.autocast, channels_last=args.channels_last)
    t_rk, res = timed(lambda: ours(net, x, y))
    peer = PyAA(net, norm="Linf", eps=args.eps, version="standard", seed=0, device=dev)
    peer.verbose = False
    t_aa, adv = timed(lambda: peer.run_standard_evaluation(x, y, batch_size=len(x))[0])
    rob_rk, rob_aa = ~res.success, robust(adv)
    stages = ", ".join(f"{s} {100 * float((~b).float().mean()):.1f}%" for s, b in res.stages.items())

    # Square alone on the points AutoAttack's earlier stages left robust: queries per second
    keep = rob_rk & rob_aa
    xs, ys = x[keep], y[keep]
    sq = Square(threat, n_queries=args.square_queries, seed=0, rescale_schedule=False)
    t_sq, sq_res = timed(lambda: sq(net, xs, ys))
    peer_sq = SquareAttack(net, p_init=0.8, n_queries=args.square_queries, eps=args.eps, norm="Linf", n_restarts=1,
                           seed=0, verbose=False, device=dev, resc_schedule=False)
    t_psq, _ = timed(lambda: peer_sq.perturb(xs, ys))
    q_rk = float(sq_res.queries.sum())
    print(f"Machine: {machine()}; model {args.model}, first {args.n} CIFAR-10 test images, Linf {args.eps:.4g}, "
          f"autocast {args.autocast or 'off'}, channels_last {args.channels_last}\n")
    print("| implementation | robust acc | seconds | stages |")
    print("|---|---|---|---|")
    print(f"| robustkit autoattack | {100 * float(rob_rk.float().mean()):.2f}% | {t_rk:.1f} | {stages} |")
    print(f"| pyautoattack standard | {100 * float(rob_aa.float().mean()):.2f}% | {t_aa:.1f} | |")
    print(f"\nratio pyautoattack s / robustkit s: {t_aa / t_rk:.2f}x; per-sample agreement "
          f"{100 * float((rob_rk == rob_aa).float().mean()):.1f}%")
    print(f"Square ({args.square_queries} queries, {len(xs)} robust points): robustkit {q_rk / t_sq:.0f} queries/s "
          f"({t_sq:.1f} s), pyautoattack about {len(xs) * args.square_queries / t_psq:.0f} queries/s ({t_psq:.1f} s, "
          f"every point runs all queries), ratio {t_psq / t_sq:.2f}x")


if __name__ == "__main__":
    main()
