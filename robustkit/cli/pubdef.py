"""``robustkit train pubdef``: options -> :class:`~robustkit.training.pubdef.PubDefConfig` ->
:func:`~robustkit.training.pubdef.train_pubdef` (routed by :mod:`robustkit.cli.router`).

It takes every option of ``robustkit train`` plus the source pool (``--surrogate``,
``--surrogate-checkpoint``, ``--transfer-attacks``) and the source selection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from robustkit.cli.console import err
from robustkit.cli.train_common import VALUE_OPTIONS, resolve_config, run_training, train_options

SELECTION_HELP = ("Source selection per batch: random (default; one source drawn uniformly per example, the "
                  "reference's), top1 (the source with the highest loss per example), exp (all sources, weighted "
                  "by their smoothed loss), all (their mean).")


@click.command("pubdef")
@click.option("--surrogate", help="Public (source) models, comma-separated: registered names, timm:NAME, ... "
              "(names from the checkpoints' sidecars when left out).")
@click.option("--surrogate-checkpoint",
              help="Their checkpoints, comma-separated in the same order (empty entry: none).")
@click.option("--transfer-attacks", help="Transfer attacks crafted on every surrogate, comma-separated; transfer = "
              "PGD, MI-, DI-, TI-, MDTI-FGSM. [default: pgd]")
@click.option("--selection", type=click.Choice(["random", "top1", "exp", "all"]), help=SELECTION_HELP)
@click.option("--clean-weight", type=float, help="Weight of the clean loss; the transfer loss gets 1 - it. [0.5]")
@click.option("--exp-alpha", type=float, help="Smoothing of the per-source losses for --selection exp. [0.5]")
@click.option("--trick", "tricks", multiple=True, help="FGSM-AT trick (repeatable): stride, smooth-act, weight-reg.")
@click.option("--eval", "eval_attacks", multiple=True, help="Evaluate the final checkpoint (white-box) with these "
              "attacks and write leaderboard rows.")
@train_options(VALUE_OPTIONS)
def train_pubdef_cmd(tricks: tuple[str, ...], eval_attacks: tuple[str, ...], config_file: str | None,
                     dump_config: bool, quiet: bool, **options: Any) -> None:
    """Train against transfer attacks from public models: PubDef (Sitawarin et al., arXiv 2310.17645).

    Every batch trains on the clean images and on transfer adversarial examples crafted on the
    --surrogate models (never on the model being trained), the source chosen by --selection.
    Evaluate on surrogates held out from training with `robustkit eval --attack transfer
    --surrogate ...`.

    \b
    Example:
      robustkit train standard --dataset digits --seed 1 --epochs 10 --out runs/src1
      robustkit train standard --dataset digits --seed 2 --epochs 10 --out runs/src2
      robustkit train pubdef --dataset digits --eps 0.1 --epochs 10 --out runs/pubdef \\
          --surrogate-checkpoint runs/src1/model.safetensors,runs/src2/model.safetensors
      robustkit eval --checkpoint runs/pubdef/model.safetensors --attack transfer \\
          --surrogate-checkpoint runs/src3/model.safetensors
    """
    # lazy: imports torch (the CLI must not at import time)
    from robustkit.training.pubdef import PubDefConfig, train_pubdef

    config = resolve_config(PubDefConfig, click.get_current_context(), options, tricks, eval_attacks, config_file,
                            dump_config, method="pubdef", out_prefix="pubdef")
    if config is None:
        return
    kept: list[Any] = []

    def runner(cfg: Any, **kwargs: Any) -> Any:
        kept.append(train_pubdef(cfg, **kwargs))
        return kept[-1]

    run_training(config, quiet, runner=runner)
    if kept and kept[-1].sidecar is not None:
        _print_sources(kept[-1].sidecar)


def _print_sources(sidecar: Path) -> None:
    """How often each source was trained on (from the sidecar's recipe)."""


    recipe = json.loads(Path(sidecar).read_text()).get("recipe", {})
    sources, picks = recipe.get("sources") or [], recipe.get("source_picks") or []
    total = sum(picks) or 1
    shown = ", ".join(f"{s} {p / total:.0%}" for s, p in zip(sources, picks, strict=False))
    err.print(Text(f"Sources ({recipe.get('selection')}): {shown}."), soft_wrap=True)
