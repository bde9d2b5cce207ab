"""EVP visual prompting on CPU: a frozen CIFAR-10 ResNet-20 adapted to MNIST (or sklearn digits).

    python benchmarks/evp.py [--data mnist|digits] [--n 2000] [--epochs 3] [--batch-size 32]

The backbone is the published akamaster ResNet-20 (../shared/data/models/resnet20-12fca82f.th,
91.5% on CIFAR-10), frozen. Target images (1 channel) are repeated to 3 channels and resized to the
backbone's 32x32 input (24x24 inside the prompt's 4-px frame: the paper's 30 px at 224, scaled).
Every run sees the same training images for the same epochs and batch size; accuracy is measured on
the first ``--n-test`` test images. Rows:

* ``frozen + label map``: no training, the paper's frequency label mapping only (CIFAR class ->
  digit), measured on the training images as the prompts start (empty frame);
* ``linear probe``: the backbone's 64-d penultimate features of the image (resized to 32x32, no
  frame) and a new linear head, Adam lr ``--probe-lr`` (0.1; 0.01 gave 62% instead of 74%) with a
  cosine schedule;
* ``EVP``: the prompt with input diversity (p 0.5) and gradient normalization, lr from
  :func:`robustkit.models.prompted.reference_lr` (the paper's 70 at 224/30 px, scaled to the frame);
* ``EVP without DI`` / ``without grad norm`` / ``without both`` (plain SGD on the prompt): the
  ablations. Without the normalization the step size is calibrated so that the first update has
  the same L2 norm as EVP's (``lr / ||g_0||``), which isolates what the normalization does later.

All prompts use the same frequency label map. The PGD-10 column (``--no-pgd`` skips it) is the
Linf ``--eps`` robust accuracy of each model on the first ``--n-pgd`` test images (a prompted model
is a model: the attack perturbs the 28x28 digit). About 8 minutes on one thread of a shared CPU.
Writes ``benchmarks/results/evp.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import SHARED, machine  # noqa: E402

from robustkit.data import Dataset, load_dataset  # noqa: E402
from robustkit.models import load_model  # noqa: E402
from robustkit.models.prompted import reference_lr  # noqa: E402
from robustkit.training.prompt import PromptConfig, accuracy, build_prompted_model, train_prompt  # noqa: E402

RESULTS = HERE / "results" / "evp.md"
#: run name -> (input diversity, grad norm)
PROMPT_RUNS = {"evp": (True, True), "no-di": (False, True), "no-gn": (True, False), "no-tricks": (False, False)}
LABELS = {"evp": "EVP (input diversity + grad norm)", "no-di": "EVP without input diversity",
          "no-gn": "EVP without grad norm", "no-tricks": "prompt without both tricks (plain SGD)"}


def data(name: str, n: int, n_test: int) -> tuple[Dataset, Dataset]:
    if name == "digits":
        path = "digits"
    else:
        path = f"npz:{SHARED / 'mnist.npz'}"
    return load_dataset(path, split="train", n_examples=n), load_dataset(path, split="test", n_examples=n_test)


def backbone() -> nn.Module:
    return load_model("resnet20", SHARED / "models" / "resnet20-12fca82f.th").eval()


class LinearProbe(nn.Module):
    """The frozen backbone's penultimate features (image resized to its input) and a new linear head."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = net.requires_grad_(False).eval()
        self.last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        self.head = nn.Linear(self.last.in_features, num_classes)
        self.size = tuple(net.info.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        grabbed: list[torch.Tensor] = []
        hook = self.last.register_forward_hook(lambda _m, inp, _out: grabbed.append(inp[0]))
        try:
            x = x.expand(-1, self.size[0], -1, -1) if x.shape[1] == 1 else x
            self.backbone(F.interpolate(x, size=self.size[1:], mode="bilinear", align_corners=False, antialias=True))
        finally:
            hook.remove()
        return grabbed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_probe(train: Dataset, args: argparse.Namespace) -> tuple[LinearProbe, float]:
    """The same images, epochs and batch size as the prompts; features computed once (frozen)."""
    torch.manual_seed(args.seed)
    probe = LinearProbe(backbone(), train.num_classes)
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = torch.cat([probe.features(train.x[i : i + 256]) for i in range(0, len(train), 256)])
    opt = torch.optim.Adam(probe.head.parameters(), lr=args.probe_lr)
    order_gen = torch.Generator().manual_seed(args.seed)
    steps = math.ceil(len(train) / args.batch_size)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=order_gen)
        for b in range(steps):
            for group in opt.param_groups:
                group["lr"] = args.probe_lr * 0.5 * (1 + math.cos(math.pi * (epoch + b / steps) / args.epochs))
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            loss = F.cross_entropy(probe.head(feats[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval(), time.perf_counter() - t0


def first_grad_norm(train: Dataset, args: argparse.Namespace) -> float:
    """||g_0||: the L2 norm of the prompt's gradient on the first batch every run sees."""
    cfg = PromptConfig(label_map="frequency", batch_size=args.batch_size, seed=args.seed, val_size=0, epochs=1)
    model, _ = build_prompted_model(cfg, backbone(), train, torch.device("cpu"))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.batch_size]
    loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
    grad, = torch.autograd.grad(loss, model.frame)
    return float(grad.norm())


def pgd_acc(model: nn.Module, test: Dataset, args: argparse.Namespace) -> float:
    from robustkit import ThreatModel
    from robustkit.attacks import PGD

    x, y = test.x[: args.n_pgd], test.y[: args.n_pgd]
    return float(PGD(ThreatModel("linf", args.eps), steps=10, seed=args.seed)(model, x, y).robust_accuracy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    ap.add_argument("--n", type=int, default=2000, help="training images (the first n)")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", default="evp,no-tricks,no-di,no-gn")
    ap.add_argument("--lr", type=float, default=None, help="EVP's lr (default: reference_lr of the frame)")
    ap.add_argument("--probe-lr", type=float, default=0.1, help="Adam lr of the linear probe (0.1 beat 0.01 here)")
    ap.add_argument("--no-pgd", dest="pgd", action="store_false", help="skip the PGD-10 column")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n-pgd", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (SHARED / "models" / "resnet20-12fca82f.th").is_file():
        print(f"needs {SHARED}/models/resnet20-12fca82f.th (../shared/data next to the checkout)", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    train, test = data(args.data, args.n, args.n_test)
    rows: list[dict] = []

    cfg0 = PromptConfig(label_map="frequency", batch_size=256, seed=args.seed, val_size=0, epochs=1)
    t0 = time.perf_counter()
    zero, _ = build_prompted_model(cfg0, backbone(), train, torch.device("cpu"))
    rows.append({"run": "frozen backbone + label map (no training)", "params": 0,
                 "acc": accuracy(zero, test, torch.device("cpu")), "seconds": time.perf_counter() - t0,
                 "model": zero, "note": f"map {zero.label_map.tolist()}"})
    print(rows[-1]["run"], f"{rows[-1]['acc']:.3f}", rows[-1]["note"], flush=True)

    probe, seconds = train_probe(train, args)
    rows.append({"run": "linear probe (frozen features + linear head)",
                 "params": sum(p.numel() for p in probe.head.parameters()),
                 "acc": accuracy(probe, test, torch.device("cpu")), "seconds": seconds, "model": probe,
                 "note": f"Adam lr {args.probe_lr}"})
    print(rows[-1]["run"], f"{rows[-1]['acc']:.3f}", flush=True)

    g0 = None
    for run in [r for r in args.runs.split(",") if r]:
        di, gn = PROMPT_RUNS[run]
        cfg = PromptConfig(label_map="frequency", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           input_diversity=di, grad_norm=gn, seed=args.seed, val_size=0, device="cpu")
        note = ""
        if not gn:
            g0 = g0 if g0 is not None else first_grad_norm(train, args)
            base = args.lr if args.lr is not None else reference_lr(zero.trainable_parameters())
            cfg.lr = base / g0
            note = f"lr {cfg.lr:.4g} = {base:.4g} / ‖g0‖ ({g0:.3g})"
        t0 = time.perf_counter()
        res = train_prompt(cfg, backbone=backbone(), data=train, val=None)
        seconds = time.perf_counter() - t0
        note = note or f"lr {res.lr:.4g}"
        rows.append({"run": LABELS[run], "params": res.model.trainable_parameters(),
                     "acc": accuracy(res.model, test, torch.device("cpu")), "seconds": seconds, "model": res.model,
                     "note": note, "train_acc": res.history[-1]["train_acc"]})
        print(rows[-1]["run"], f"{rows[-1]['acc']:.3f}", f"{seconds:.0f}s", note, flush=True)

    if args.pgd:
        for row in rows:
            row["pgd"] = pgd_acc(row["model"], test, args)
            print(row["run"], "pgd", f"{row['pgd']:.3f}", flush=True)

    text = render(rows, args, time.perf_counter() - t_all)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


def render(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    data_text = ("MNIST training images 0–{n1} (../shared/data/mnist.npz), test images 0–{t1}" if args.data == "mnist"
                 else "scikit-learn digits, the first {n} training and {t} test images")
    pgd = " | PGD-10 acc" if args.pgd else ""
    lines = [
        "# EVP visual prompting: a frozen CIFAR-10 ResNet-20 adapted to "
        + ("MNIST" if args.data == "mnist" else "digits"),
        "",
        f"`{' '.join(['python benchmarks/evp.py', *sys.argv[1:]])}` — backbone: akamaster ResNet-20 "
        "(resnet20-12fca82f.th, CIFAR-10, frozen); data: "
        + data_text.format(n=args.n, n1=args.n - 1, t=args.n_test, t1=args.n_test - 1)
        + f", 1-channel images repeated to 3 and resized to 32x32 (24x24 inside the 4-px prompt frame); "
        f"same budget for every trained row: {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, "
        f"cosine schedule. Machine: {machine()}; total {seconds / 60:.1f} minutes.",
        "",
        f"| run | trainable parameters | test accuracy{pgd} | train seconds | notes |",
        "|---|---|---|---|---|" + ("---|" if args.pgd else ""),
    ]
    for r in rows:
        extra = f" | {100 * r['pgd']:.1f}%" if args.pgd else ""
        lines.append(f"| {r['run']} | {r['params']:,} | {100 * r['acc']:.1f}%{extra} | {r['seconds']:.0f} "
                     f"| {r['note']} |")
    lines += [
        "",
        "Label map (target digit -> CIFAR-10 class) from the backbone's most frequent prediction per digit, "
        "one-to-one (EVP `util/get_index.py`, collisions resolved greedily by count). The prompt rows train "
        "only the frame (3 x (32² − 24²) = 1,344 values); the backbone's weights and BatchNorm statistics "
        "are unchanged (tests/test_prompting.py checks this bit for bit)."
        + (f" PGD-10: Linf eps {args.eps}, step eps/4 (robustkit's default), on the first {args.n_pgd} "
           "test images, attacking the 28x28 input of each model." if args.pgd else ""),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
