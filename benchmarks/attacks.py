"""Time robustkit's attacks against torchattacks and pyautoattack on the same model and images.

    python benchmarks/attacks.py [--n 200] [--model resnet20|resnet4b] [--device cpu|cuda]

Prints a Markdown table: robust accuracy and seconds of each implementation and the ratio
(peer seconds / robustkit seconds; > 1 means robustkit is faster), plus robustkit's overhead
against a bare k×(forward+backward) loop doing the same PGD steps on every point.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cifar10, machine, model, timed

from robustkit import ThreatModel
from robustkit.attacks import FGSM, PGD


def bare_pgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> None:
    """The reference cost: k×(forward+backward+sign step+projection) on all points, no bookkeeping."""
    for p in net.parameters():
        p.requires_grad_(False)
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(net(adv), y), adv)
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torchattacks

    dev = torch.device(args.device)
    net = model(args.model).to(dev)
    x, y = cifar10(args.n)
    x, y = x.to(dev), y.to(dev)
    threat = ThreatModel("linf", args.eps)
    rows = []

    def acc_ta(adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float((net(adv).argmax(1) == y).float().mean())

    def add(name: str, rk: tuple[float, float], peer: tuple[float, float], peer_name: str) -> None:
        rows.append((name, peer_name, rk[1], peer[1], rk[0], peer[0], peer[0] / rk[0]))

    for steps in (10, 50):
        alpha = 2.5 * args.eps / steps
        rk = PGD(threat, steps=steps, step_size=alpha, random_start=False)
        t_rk, res = timed(lambda rk=rk: rk(net, x, y))
        ta = torchattacks.PGD(net, eps=args.eps, alpha=alpha, steps=steps, random_start=False)
        t_ta, adv = timed(lambda ta=ta: ta(x, y))
        add(f"PGD-{steps} (early drop)", (t_rk, res.robust_accuracy), (t_ta, acc_ta(adv)), "torchattacks")
        full = PGD(threat, steps=steps, step_size=alpha, random_start=False, early_stop=False)
        t_full, res_full = timed(lambda full=full: full(net, x, y))
        t_bare, _ = timed(lambda steps=steps, alpha=alpha: bare_pgd(net, x, y, args.eps, alpha, steps))
        rows.append((f"PGD-{steps} all points (overhead)", "bare loop", res_full.robust_accuracy, float("nan"),
                     t_full, t_bare, t_bare / t_full))
    t_rk, res = timed(lambda: FGSM(threat)(net, x, y))
    t_ta, adv = timed(lambda: torchattacks.FGSM(net, eps=args.eps)(x, y))
    add("FGSM", (t_rk, res.robust_accuracy), (t_ta, acc_ta(adv)), "torchattacks")

    try:
        from pyautoattack.autopgd_base import APGDAttack

        from robustkit.attacks import APGD
    except ImportError:
        APGD = None  # noqa: N806
    if APGD is not None:
        t_rk, res = timed(lambda: APGD(threat, steps=100)(net, x, y))
        ref = APGDAttack(net, norm="Linf", eps=args.eps, n_iter=100, n_restarts=1, loss="ce", seed=0,
                         device=args.device)
        t_aa, adv = timed(lambda: ref.perturb(x, y))
        add("APGD-CE 100", (t_rk, res.robust_accuracy), (t_aa, acc_ta(adv)), "pyautoattack")

    print(f"\n{args.model}, {args.n} CIFAR-10 test images, Linf eps={args.eps:.4f}; {machine()}\n")
    print("| attack | peer | robust acc robustkit | robust acc peer | s robustkit | s peer | peer s / robustkit s |")
    print("|---|---|---|---|---|---|---|")
    for name, peer, a_rk, a_peer, t_rk, t_peer, ratio in rows:
        peer_acc = "–" if a_peer != a_peer else f"{100 * a_peer:.1f}%"
        print(f"| {name} | {peer} | {100 * a_rk:.1f}% | {peer_acc} | {t_rk:.2f} | {t_peer:.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
