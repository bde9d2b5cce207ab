"""``robustkit train prompt``: options -> :class:`~robustkit.training.prompt.PromptConfig` ->
:func:`~robustkit.training.prompt.train_prompt`.

Its options differ from the other training methods', so ``robustkit train`` hands
``train prompt ...`` to this command (:mod:`robustkit.cli.router`).
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import StepBar, err, out
from robustkit.cli.train_common import default_out


@click.command("prompt")
@click.option("--model", help="The frozen backbone: a registered name, timm:NAME or torchvision:NAME.")
@click.option("--checkpoint", help="The backbone's weights (.safetensors or weights_only .pt).")
@click.option("--normalize", default="default", show_default=True,
              help="The backbone's normalization: default (the model's), none, cifar10, imagenet or m:s.")
@click.option("--dataset", default="digits", show_default=True, help="The target task: registered name or npz:PATH.")
@click.option("--data-dir", help="Folder with the torchvision dataset files.")
@click.option("--split", default="train", show_default=True, help="Training split.")
@click.option("--n-examples", type=int, help="Train on the first N examples.")
@click.option("--val-dataset", help="Held-out data for the per-epoch accuracy (default: --dataset).")
@click.option("--val-split", default="test", show_default=True, help="Split of the held-out data.")
@click.option("--val-size", type=int, default=256, show_default=True, help="Held-out images (0: none).")
@click.option("--prompt-size", type=int,
              help="Frame width in pixels of the backbone's input (default: the paper's 30 at 224, scaled; 4 at 32).")
@click.option("--label-map", default="auto", show_default=True, type=click.Choice(["auto", "frequency", "identity"]),
              help="Target -> source classes: frequency (the paper's), identity, or auto (frequency when the "
                   "class counts differ).")
@click.option("--epochs", type=int, default=1000, show_default=True, help="Epochs (the paper's 1000).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Batch size (the paper's).")
@click.option("--lr", type=float,
              help="Step size (default: the paper's 70 at 224/30 px, scaled by sqrt of the frame size).")
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "constant"]))
@click.option("--input-diversity/--no-input-diversity", default=True, show_default=True,
              help="Random resize and pad of the prompted image during training.")
@click.option("--diversity-prob", type=float, default=0.5, show_default=True, help="Input-diversity probability.")
@click.option("--resize-rate", type=float, default=0.9, show_default=True, help="Input-diversity resize rate.")
@click.option("--grad-norm/--no-grad-norm", default=True, show_default=True,
              help="Normalize the prompt's update to L2 norm lr (off: plain SGD).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--out", help="Output folder (default runs/prompt-MODEL).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --output from its last finished epoch.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def train_prompt_cmd(quiet: bool, **options: Any) -> None:
    """Train an EVP visual prompt: a frame of learnable pixels around the shrunk input image of a
    frozen backbone (Wu et al., arXiv 2212.10556), with input diversity and gradient normalization.

    Writes OUT/prompt.safetensors with its sidecar prompt.json; evaluate the prompted model with
    `robustkit eval --prompt OUT/prompt.safetensors --dataset D --attack ...`.

    \b
    Example:
      robustkit train prompt --model resnet20 --checkpoint ../shared/data/models/resnet20-12fca82f.th \\
          --dataset npz:../shared/data/mnist.npz --n-examples 2000 --label-map frequency \\
          --epochs 3 --batch-size 32 --out runs/evp-mnist
      robustkit eval --prompt runs/evp-mnist/prompt.safetensors --dataset npz:../shared/data/mnist.npz \\
          --n-examples 200 --attack pgd --eps 0.1
    """
    # lazy: imports torch (the CLI must not at import time)
    from robustkit.training.prompt import PromptConfig, train_prompt

    if not options.get("out"):
        options["out"] = default_out("prompt", options.get("model") or "model")
    config = PromptConfig(**options)
    _run(config, quiet, train_prompt)


def _run(config: Any, quiet: bool, runner: Any) -> None:
    with StepBar() as bar:

        def on_event(ev: dict[str, Any]) -> None:
            if not quiet and ev["kind"] == "step":
                bar.update(f"epoch {ev['epoch'] + 1}/{ev['epochs']}", ev["step"], ev["steps"], f"loss {ev['loss']:.3f}")

        result = runner(config, progress=on_event)
    tricks = " + ".join(t for t, on in (("input diversity", config.input_diversity), ("grad norm", config.grad_norm))
                        if on) or "no tricks"
    backbone = config.model or getattr(result.model.backbone, "name", "the backbone")
    table = Table(title=f"EVP prompt on {backbone}, {config.dataset} (frame {result.model.prompt_size} px, "
                        f"{result.model.trainable_parameters()} values, lr {result.lr:.4g}, {tricks})")
    for col in ("epoch", "loss", "train acc", "held-out acc", "seconds"):
        table.add_column(col, justify="right")
    for r in result.history:
        held = "" if r["val_acc"] != r["val_acc"] else f"{r['val_acc']:.1%}"
        table.add_row(str(r["epoch"]), f"{r['loss']:.3f}", f"{r['train_acc']:.1%}", held, f"{r['seconds']:.1f}")
    out.print(table)
    if result.weights is not None:
        err.print(Text(f"Prompt: {result.weights} (sidecar {result.sidecar.name if result.sidecar else '-'}; "
                       f"label map: {result.label_map_kind}). Evaluate with "
                       f"`robustkit eval --prompt {result.weights} --dataset {config.dataset}`."), soft_wrap=True)
