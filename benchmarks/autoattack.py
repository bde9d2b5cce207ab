"""AutoAttack standard: robustkit's native cascade against pyautoattack on the same model and images.

    python benchmarks/autoattack.py [--n 100] [--model resnet4b] [--repeat 2] [--device cpu|cuda]
                                    [--autocast bf16] [--square-queries 1000]

Both run the standard version (APGD-CE, APGD-T, FAB-T, Square-5000) at Linf 8/255 with seed 0 on
the first n CIFAR-10 test images of ../shared/data, in one process, alternating (robustkit,
pyautoattack, robustkit, ...) so that a change in the machine's load hits both. Prints a Markdown
table: robust accuracy, seconds of every run, seconds per stage (robustkit), the ratio of the
medians (pyautoattack seconds / robustkit seconds) and per-sample agreement; then Square alone on
the same images (robustkit's Square against pyautoattack's SquareAttack, queries per second).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from common import cifar10, machine, model, timed

from robustkit import ThreatModel
from robustkit.attacks import AutoAttack, Square


def stage_seconds(attack: AutoAttack) -> dict[str, float]:
    """Wraps every stage's ``perturb`` to add up its seconds (the stages run in order)."""
    seconds: dict[str, float] = {}
    for name, stage in attack.stages:
        perturb = stage.perturb

        def timed_perturb(*args, _perturb=perturb, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            out = _perturb(*args, **kwargs)
            seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start
            return out

        stage.perturb = timed_perturb
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--model", default="resnet4b")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], help="robustkit only (an option, off by default)")
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

    times_rk, times_aa, stages = [], [], []
    for _ in range(args.repeat):
        ours = AutoAttack(threat, seed=0, autocast=args.autocast)
        stages.append(stage_seconds(ours))
        t, res = timed(lambda ours=ours: ours(net, x, y))
        times_rk.append(t)
        peer = PyAA(net, norm="Linf", eps=args.eps, version="standard", seed=0, device=dev)
        peer.verbose = False
        t, adv = timed(lambda peer=peer: peer.run_standard_evaluation(x, y, batch_size=len(x))[0])
        times_aa.append(t)
    rob_rk, rob_aa = ~res.success, robust(adv)
    after = ", ".join(f"{s} {100 * float((~b).float().mean()):.1f}%" for s, b in res.stages.items())
    per_stage = ", ".join(f"{s} {statistics.median(run[s] for run in stages):.1f}" for s in stages[0])
    med_rk, med_aa = statistics.median(times_rk), statistics.median(times_aa)

    # Square alone on the same images (robustkit: rows freed by broken points go to lookahead)
    sq = Square(threat, n_queries=args.square_queries, seed=0, rescale_schedule=False)
    t_sq, sq_res = timed(lambda: sq(net, x, y))
    peer_sq = SquareAttack(net, p_init=0.8, n_queries=args.square_queries, eps=args.eps, norm="Linf", n_restarts=1,
                           seed=0, verbose=False, device=dev, resc_schedule=False)
    t_psq, psq_adv = timed(lambda: peer_sq.perturb(x, y))
    q_rk = float(sq_res.queries.sum())

    print(f"Machine: {machine()}; model {args.model}, first {args.n} CIFAR-10 test images, Linf {args.eps:.4g}, "
          f"autocast {args.autocast or 'off'}, {args.repeat} runs each, alternating\n")
    print("| implementation | robust acc | seconds (each run) | median s | notes |")
    print("|---|---|---|---|---|")
    print(f"| robustkit autoattack | {100 * float(rob_rk.float().mean()):.2f}% | "
          f"{', '.join(f'{t:.1f}' for t in times_rk)} | {med_rk:.1f} | robust after {after}; stage s {per_stage} |")
    print(f"| pyautoattack standard | {100 * float(rob_aa.float().mean()):.2f}% | "
          f"{', '.join(f'{t:.1f}' for t in times_aa)} | {med_aa:.1f} | |")
    print(f"\nratio of medians, pyautoattack s / robustkit s: **{med_aa / med_rk:.2f}x**; per-sample agreement "
          f"{100 * float((rob_rk == rob_aa).float().mean()):.1f}%")
    print(f"\nSquare alone ({args.square_queries} queries, {args.n} images): robustkit {t_sq:.1f} s, robust "
          f"{100 * float((~sq_res.success).float().mean()):.1f}%, {q_rk / t_sq:.0f} queries/s; pyautoattack "
          f"{t_psq:.1f} s, robust {100 * float(robust(psq_adv).float().mean()):.1f}%; ratio {t_psq / t_sq:.2f}x")


if __name__ == "__main__":
    main()
