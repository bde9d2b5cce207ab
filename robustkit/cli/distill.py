"""``robustkit train distill``: options -> :class:`~robustkit.training.distill.DistillConfig` -> the training loop.

Takes every option of ``robustkit train`` (``--student`` instead of ``--model``; ``--mask-ratio``
is the student's input mask here, not the FGSM mask trick's) plus the teacher and the objectives.
"""

from __future__ import annotations

from typing import Any

import click

from robustkit.cli.train_common import VALUE_OPTIONS, resolve_config, run_training, train_options

_NOT_HERE = {"--model", "--mask-ratio", "--mask-pattern"}
_DISTILL_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--student", "model", str, "The student: registered name, timm:NAME or torchvision:NAME (default digits-cnn)."),
    ("--teacher", "teacher", str, "The teacher's registered name (default digits-cnn: packaged robust weights)."),
    ("--teacher-checkpoint", "teacher_checkpoint", str,
     "The teacher's weights (.safetensors or weights_only .pt; a robustkit sidecar is read when present)."),
    ("--teacher-normalize", "teacher_normalize", str, "The teacher's normalization (default: the model's)."),
    ("--objectives", "objectives", str, "Comma-separated: kd (logits), feature (penultimate), patch (spatial map); "
     "default kd,feature."),
    ("--temperature", "temperature", float, "KD temperature T (default 4)."),
    ("--kd-weight", "kd_weight", float, "Weight of the kd objective (default 1)."),
    ("--feature-weight", "feature_weight", float, "Weight of the feature objective (default 1)."),
    ("--patch-weight", "patch_weight", float, "Weight of the patch objective (default 1)."),
    ("--ce-weight", "ce_weight", float, "Weight of the cross-entropy on the labels (default 0: teacher only)."),
    ("--feature-loss", "feature_loss", str, "mse (default), smooth-l1 or cosine, on L2-normalized features."),
    ("--mask-ratio", "student_mask_ratio", float, "Fraction of the student's input patches masked (DMAE uses "
     "0.75; default 0: off)."),
    ("--mask-patch", "student_mask_patch", int, "Side of a masked patch in pixels (default: image side / 14)."),
]


@click.command("distill")
@click.option("--method", help="How the student's input is made: standard (clean; default), pgd-at, trades, "
              "fgsm-rs, ... (robust distillation; the teacher sees the clean image).")
@click.option("--trick", "tricks", multiple=True, help="FGSM-AT trick (repeatable): stride, smooth-act, weight-reg.")
@click.option("--eval", "eval_attacks", multiple=True, help="Evaluate the final student with these attacks "
              "(repeatable or comma-separated) and write leaderboard rows.")
@train_options(_DISTILL_OPTIONS + [o for o in VALUE_OPTIONS if o[0] not in _NOT_HERE])
@click.pass_context
def train_distill_cmd(ctx: click.Context, method: str | None, tricks: tuple[str, ...], eval_attacks: tuple[str, ...],
                      config_file: str | None, dump_config: bool, quiet: bool, **options: Any) -> None:
    """Distill a teacher into a student: logit KD plus feature matching through learned projections
    (DMAE-style input masking, Proteus-style objectives), optionally with adversarial training.

    Writes what `robustkit train` writes (the student's model.safetensors + sidecar, metrics,
    checkpoints) and projection.safetensors (the trained projections).

    \b
    Examples:
      robustkit train distill --teacher digits-cnn --student digits-cnn --dataset digits --epochs 5 \\
          --optimizer adam --lr 1e-3 --out runs/kd
      robustkit train distill --method pgd-at --eps 0.1 --teacher digits-cnn --student digits-cnn \\
          --objectives kd,feature,patch --mix cutmix --epochs 5 --optimizer adam --lr 1e-3 --out runs/rkd
      robustkit train distill --teacher mnist-cnn-a --teacher-checkpoint runs/t/model.safetensors \\
          --student mnist-madry-tiny --dataset npz:../shared/data/mnist.npz --mask-ratio 0.75 --out runs/dmae
    """
    # lazy: these import torch (the CLI must not at import time)
    from robustkit.training.distill import DistillConfig
    from robustkit.training.loop import train

    config = resolve_config(DistillConfig, ctx, options, tricks, eval_attacks, config_file, dump_config,
                            method=method, out_prefix="distill")
    if config is None:
        return
    run_training(config, quiet, runner=train)
