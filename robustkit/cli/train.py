"""``robustkit train``: options -> :class:`~robustkit.training.loop.TrainConfig` ->
:func:`~robustkit.training.loop.train`.

Thin on purpose: every option is a ``TrainConfig`` field; ``--config FILE`` reads the same
fields from YAML, options given on the command line override it, ``--dump-config`` prints the
resolved YAML and exits. Values are validated by the library (one red line, exit 2).

``dat`` and ``dat-fgsm`` build a :class:`~robustkit.training.dat.DATConfig` (DAT's defaults, its extra
options) and run :func:`~robustkit.training.dat.train_dat`, also under torchrun: then only rank 0 shows
progress and results, and an error every worker shares is printed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from robustkit.cli.router import TrainCommand  # hands `robustkit train NAME ...` to NAME's own command
from robustkit.cli.train_common import (
    VALUE_OPTIONS,
    command_line_values,
    default_out,
    rank,
    run_training,
    show_warnings,
    train_options,
)
from robustkit.errors import UsageError, UserError

# Options of the DAT methods only (DATConfig fields).
_DAT_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--grad-compression", "grad_compression", str,
     "dat: gradient compression between workers: none (default), fp16, bf16 or qsgd."),
    ("--quant-bits", "quant_bits", int, "dat: bits per element of --grad-compression qsgd, sign included (8)."),
    ("--quant-bucket", "quant_bucket", int, "dat: one qsgd norm per N elements (default: per parameter, as DAT)."),
    ("--lr-scaling", "lr_scaling", str, "dat: scale --lr with the global batch: none (default), linear, sqrt."),
    ("--base-batch-size", "base_batch_size", int, "dat: the batch size --lr is meant for when scaled (256)."),
    ("--clean-weight", "clean_weight", float, "dat: weight of the clean CE added to the adversarial CE "
     "(dat 1, dat-fgsm 0)."),
    ("--unlabeled", "unlabeled", str, "dat: npz:PATH of unlabeled images, trained on with pseudo-labels."),
    ("--n-unlabeled", "n_unlabeled", int, "dat: use the first N unlabeled images."),
    ("--dist-timeout", "dist_timeout", float, "dat: seconds to wait for the other workers before giving up (600)."),
]
@click.command("train", cls=TrainCommand)
@click.argument("method", required=False)
@click.option("--trick", "tricks", multiple=True,
              help="FGSM-AT trick (repeatable): mask, stride, smooth-act, weight-reg.")
@click.option("--eval", "eval_attacks", multiple=True, help="Evaluate the final checkpoint with these attacks "
              "(repeatable or comma-separated) and write leaderboard rows.")
@train_options(VALUE_OPTIONS + _DAT_OPTIONS)
@click.pass_context
def train_cmd(ctx: click.Context, method: str | None, tricks: tuple[str, ...], eval_attacks: tuple[str, ...],
              config_file: str | None, dump_config: bool, quiet: bool, **options: Any) -> None:
    """Train a model with METHOD (standard, pgd-at, trades, mart, fgsm-rs, fgsm-at, advprop,
    fast-advprop, dat, dat-fgsm; `robustkit list defenses`), optionally on mixed batches (--mix).

    Saves per-epoch checkpoints, metrics (CSV/JSON) and final .safetensors weights with a JSON
    sidecar in --out; flags catastrophic overfitting (PGD accuracy collapsing while FGSM
    accuracy stays high) on a held-out batch.

    \b
    Examples:
      robustkit train pgd-at --model digits-cnn --dataset digits --eps 0.1 --epochs 5 --out runs/digits-pgd
      robustkit train fgsm-at --trick weight-reg --model mnist-cnn-a --dataset npz:../shared/data/mnist.npz \\
          --n-examples 10000 --eps 0.3 --eps-warmup-epochs 2 --optimizer adam --lr 1e-3 --epochs 10 \\
          --on-co stop --out runs/mnist-fgsm-wr
      robustkit train fgsm-rs --dataset digits --eps 0.1 --epochs 3 --out runs/d --eval pgd
      robustkit train --config train.yaml --resume
      robustkit train trades --model preactresnet18 --eps 8/255 --dump-config > train.yaml
      torchrun --nproc-per-node 2 -m robustkit train dat --model preactresnet18 --dataset cifar10 \\
          --data-dir ~/data --eps 8/255 --batch-size 256 --grad-compression qsgd --out runs/dat

    dat and dat-fgsm (distributed adversarial training, also one process) use LAMB, lr 0.01 and 5
    warmup epochs by default, take --batch-size as the global batch, and evaluate with --eval pgd
    at the end unless told otherwise (--eval none).
    """

    try:
        _train(ctx, method, tricks, eval_attacks, config_file, dump_config, quiet, options)
    except UserError as e:
        if rank() and getattr(e, "worker", None) is None:
            raise click.exceptions.Exit(e.exit_code) from None  # every worker has it; rank 0 prints it
        raise


def _yaml_keys(config_file: str) -> dict[str, Any]:
    """The raw mapping of a config file (to pick the config class), or {} if it cannot be read here."""

    try:
        data = yaml.safe_load(Path(config_file).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _train(ctx: click.Context, method: str | None, tricks: tuple[str, ...], eval_attacks: tuple[str, ...],
           config_file: str | None, dump_config: bool, quiet: bool, options: dict[str, Any]) -> None:
    # lazy: these import torch (the CLI must not at import time)
    from robustkit.training.dat import DATConfig, is_dat_method, train_dat
    from robustkit.training.loop import TrainConfig, train

    raw = _yaml_keys(config_file) if config_file else {}
    dat = is_dat_method(method if method is not None else raw.get("method"))
    cls = DATConfig if dat else TrainConfig
    values: dict[str, Any] = {}
    if config_file:
        values.update(cls.from_yaml(Path(config_file)).to_dict())
    if method is not None:
        values["method"] = method
    if not dat:
        given = [opt for opt, dest, _t, _h in _DAT_OPTIONS if options.get(dest) is not None]
        if given:
            raise UsageError(f"{given[0]} is an option of `robustkit train dat` (and dat-fgsm), not of "
                             f"{values.get('method', 'this method')}.")
    values.update(command_line_values(ctx, options, tricks, eval_attacks))
    if not eval_attacks and dat and "eval_attacks" not in raw and "eval-attacks" not in raw:
        values["eval_attacks"] = ["pgd"]  # DAT ends with a robust-accuracy row in the leaderboard
    if "method" not in values:
        raise UsageError("Name a training method (e.g. `robustkit train pgd-at`) or give --config FILE.")
    if not values.get("out") and (dat or not dump_config):  # dat: its default --eval needs --out
        values["out"] = default_out(values["method"], values.get("model", "digits-cnn"))
    config = cls.from_dict(values)
    if dat and config.mix:
        raise UsageError("--mix is not supported by dat and dat-fgsm; use it with the other training methods.")
    if dump_config:
        click.echo(config.to_yaml(), nl=False)
        return
    if dat:
        primary = rank() == 0
        if primary:
            show_warnings()
        run_training(config, quiet or not primary, runner=train_dat, show=primary)
    else:
        run_training(config, quiet, runner=train)


