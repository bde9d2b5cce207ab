"""``robustkit train rift``: options -> :class:`~robustkit.training.rift.RiftConfig` ->
:func:`~robustkit.training.rift.run_rift`,
then the per-module criticality table and the interpolation table."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import StepBar, err, out
from robustkit.cli.train_common import default_out
from robustkit.units import eps_label, parse_eps


@click.command("rift")
@click.option("--model", help="Registered model name (default: the checkpoint's robustkit sidecar, else digits-cnn).")
@click.option("--checkpoint", help="The adversarially trained weights (.safetensors, weights_only .pt; "
                                   "default: the packaged digits-cnn weights).")
@click.option("--normalize", default="default", show_default=True,
              help="default (the model's), none, cifar10, imagenet or m1,m2,m3:s1,s2,s3.")
@click.option("--dataset", default="digits", show_default=True,
              help="Fine-tuning data (and the MRC adversarial set): registered name or npz:PATH.")
@click.option("--data-dir", help="Folder with the torchvision dataset files.")
@click.option("--split", default="train", show_default=True, help="Fine-tuning split.")
@click.option("--n-examples", type=int, help="Fine-tune on the first N examples.")
@click.option("--val-dataset", help="Held-out data for the epoch choice and the interpolation (default: --dataset).")
@click.option("--val-split", default="test", show_default=True, help="Split of the held-out data.")
@click.option("--val-size", type=int, default=256, show_default=True, help="Held-out images (the first N).")
@click.option("--norm", default="linf", show_default=True, type=click.Choice(["linf", "l2"]))
@click.option("--eps", default="0.1", show_default=True, help="PGD radius, e.g. 8/255 (the paper's) or 0.3.")
@click.option("--attack-steps", type=int, default=10, show_default=True, help="PGD steps (the reference's PGD-10).")
@click.option("--attack-step-size", help="PGD step, e.g. 2/255 (default 2.5 eps / steps).")
@click.option("--mrc-size", type=int, help="Adversarial images for MRC: the first N fine-tuning images (default all).")
@click.option("--mrc-radius", type=float, default=0.1, show_default=True,
              help="Weight-perturbation radius relative to the module's weight norm.")
@click.option("--mrc-epochs", type=int, default=10, show_default=True, help="Gradient-ascent passes per module.")
@click.option("--mrc-lr", type=float, default=1.0, show_default=True, help="Gradient-ascent step (SGD lr).")
@click.option("--mrc-batch-size", type=int, default=512, show_default=True)
@click.option("--module", help="Fine-tune this module instead of the one with the smallest MRC.")
@click.option("--criticality-only", is_flag=True, help="Print the criticality table and stop (nothing written).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs (lr x0.1 at half).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.001, show_default=True, help="Fine-tuning learning rate (SGD).")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--augment", default="auto", show_default=True, type=click.Choice(["auto", "crop-flip", "none"]),
              help="auto: random crop + flip for colour images, none for grey ones.")
@click.option("--alphas", default="0:1:0.1", show_default=True,
              help="Interpolation grid: start:stop:step or a list such as 0,0.5,1.")
@click.option("--robust-tolerance", type=float, default=0.0, show_default=True,
              help="Robust accuracy a chosen point may lose against the AT model (0: none).")
@click.option("--eval-batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--out", help="Output folder (default runs/rift-MODEL).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --output from its last finished stage.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def train_rift_cmd(quiet: bool, **options: Any) -> None:
    """RiFT, robust critical fine-tuning (Zhu et al., arXiv 2308.02533): measure each module's
    robust criticality (worst-case weight perturbation on PGD examples), fine-tune the least
    critical module on clean data, and interpolate between the adversarially trained and the
    fine-tuned weights, keeping the point with the best clean accuracy that loses no PGD accuracy.

    Writes OUT/model.safetensors with its sidecar model.json (evaluate with
    `robustkit eval --checkpoint OUT/model.safetensors`) and OUT/rift.json. Each finished stage
    is kept in OUT/rift-state until then: an interrupted run continues with --resume.

    \b
    Example:
      robustkit train rift --model cifar-conv-small \\
          --checkpoint ../shared/data/models/abcrown_cifar_conv_small_pgd.pth \\
          --dataset npz:../shared/data/cifar10_train1000.npz \\
          --val-dataset npz:../shared/data/cifar10_test1000.npz --val-size 500 \\
          --eps 2/255 --epochs 5 --out runs/rift-conv-small
    """
    # lazy: imports torch (the CLI must not at import time)
    from robustkit.training.rift import RiftConfig, parse_alphas

    options["eps"] = parse_eps(options["eps"])
    if options.get("attack_step_size") is not None:
        options["attack_step_size"] = parse_eps(options["attack_step_size"])
    options["alphas"] = parse_alphas(options["alphas"])
    if not options.get("out") and not options.get("criticality_only"):
        options["out"] = default_out("rift", options.get("model") or "model")
    config = RiftConfig(**options)
    _run(config, quiet)


def _run(config: Any, quiet: bool) -> None:
    # lazy: imports torch (the CLI must not at import time)
    from robustkit.training.rift import run_rift

    with StepBar(width=18) as bar:

        def on_event(ev: dict[str, Any]) -> None:
            if not quiet and ev["kind"] == "step":
                bar.update(ev["stage"], ev["step"], ev["steps"], ev["status"])

        result = run_rift(config, progress=on_event)
    rows = result.criticality
    table = Table(title=f"Module robust criticality of {result.model.name} ({len(rows)} modules; PGD-"
                        f"{config.attack_steps} {config.norm} eps {eps_label(config.eps)}, weight radius "
                        f"{config.mrc_radius:g} x ||w||, {config.mrc_epochs} ascent passes)")
    for col in ("module", "params", "robust loss", "worst loss", "MRC", "robust acc", "worst acc", "acc drop"):
        table.add_column(col, justify="left" if col == "module" else "right", no_wrap=col == "module")
    chosen = result.module
    least = min(r.mrc for r in rows) if rows else 0.0
    for r in rows:
        mark = " *" if r.module == chosen else ""
        style = "bold" if r.module == chosen else None
        table.add_row(r.module + mark, str(r.parameters), f"{r.base_loss:.3f}", f"{r.worst_loss:.3f}",
                      f"{r.mrc:.4f}", f"{r.base_acc:.1%}", f"{r.worst_acc:.1%}", f"{r.acc_drop:+.1%}", style=style)
    out.print(table)
    if config.criticality_only:
        lowest = [r.module for r in rows if r.mrc == least]
        err.print(Text(f"Least robust-critical module: {', '.join(lowest)} (MRC {least:.4f})."))
        return
    pick = "chosen by --module" if config.module else "the smallest MRC"
    ft = Table(title=f"Fine-tuning {chosen} ({pick}) on clean {config.dataset}")
    for col in ("epoch", "lr", "loss", "train acc", "held-out acc", "seconds"):
        ft.add_column(col, justify="right")
    for h in result.history:
        ft.add_row(str(h["epoch"]), f"{h['lr']:.2g}", f"{h['loss']:.3f}", f"{h['train_acc']:.1%}",
                   f"{h['val_acc']:.1%}", f"{h['seconds']:.1f}")
    out.print(ft)
    it = Table(title=f"Interpolation (1 - alpha) AT + alpha FT on {result.n_val} held-out "
                     f"images: best clean accuracy with PGD accuracy >= the AT model's"
                     f"{f' - {config.robust_tolerance:.1%}' if config.robust_tolerance else ''}")
    for col in ("alpha", "clean acc", "PGD acc", "eligible"):
        it.add_column(col, justify="right")
    for p in result.interpolation:
        style = "bold" if p.alpha == result.alpha else None
        it.add_row(f"{p.alpha:g}" + (" *" if p.alpha == result.alpha else ""), f"{p.clean_acc:.1%}",
                   f"{p.robust_acc:.1%}", "yes" if p.eligible else "no", style=style)
    out.print(it)
    b, a = result.before, result.after
    if result.alpha is None:
        verdict = "no interpolation point kept the AT model's robust accuracy; the AT weights are kept"
    else:
        verdict = f"alpha {result.alpha:g}"
    err.print(Text(f"RiFT: {verdict}. Clean {b['clean_acc']:.1%} -> {a['clean_acc']:.1%}, "
                   f"PGD {b['robust_acc']:.1%} -> {a['robust_acc']:.1%} (held-out)."), soft_wrap=True)
    if result.weights is not None:
        err.print(Text(f"Weights: {result.weights} (sidecar {result.sidecar.name if result.sidecar else '-'}). "
                       f"Evaluate with `robustkit eval --checkpoint {result.weights} --dataset "
                       f"{config.val_dataset or config.dataset}`."), soft_wrap=True)
