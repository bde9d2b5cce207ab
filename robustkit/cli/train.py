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

import logging
import os
import re
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from robustkit.cli.prompt import TrainCommand  # hands `robustkit train prompt ...` (EVP, own options) to its command

# (option, TrainConfig field, click type, help) for the plain value options.
VALUE_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "Registered model name, timm:NAME or torchvision:NAME (default digits-cnn)."),
    ("--checkpoint", "checkpoint", str, "Initial weights to start from (.safetensors or weights_only .pt)."),
    ("--normalize", "normalize", str, "default (the model's), none, cifar10, imagenet or m1,m2,m3:s1,s2,s3."),
    ("--dataset", "dataset", str, "Registered dataset or npz:PATH (default digits)."),
    ("--data-dir", "data_dir", str, "Folder with the torchvision dataset files."),
    ("--split", "split", str, "Training split (default train)."),
    ("--n-examples", "n_examples", int, "Train on the first N examples."),
    ("--val-dataset", "val_dataset", str, "Held-out data for per-epoch robust accuracy (default: --dataset)."),
    ("--val-split", "val_split", str, "Split of the held-out data (default test)."),
    ("--val-size", "val_size", int, "Held-out images for per-epoch metrics and the CO detector (0: off; 256)."),
    ("--norm", "norm", str, "linf (default) or l2."),
    ("--eps", "eps", str, "Radius, e.g. 8/255 or 0.3."),
    ("--eps-warmup-epochs", "eps_warmup_epochs", float, "Ramp the training eps linearly from 0 over these epochs."),
    ("--epochs", "epochs", int, "Epochs (default 10)."),
    ("--batch-size", "batch_size", int, "Batch size (default 128)."),
    ("--lr", "lr", float, "Peak learning rate (default 0.05)."),
    ("--optimizer", "optimizer", str, "sgd (default), adam, adamw or lamb."),
    ("--momentum", "momentum", float, "SGD momentum (default 0.9)."),
    ("--weight-decay", "weight_decay", float, "Weight decay (default 5e-4)."),
    ("--schedule", "schedule", str, "constant, multistep, cosine, cyclic or warmup (default: the method's)."),
    ("--warmup-epochs", "warmup_epochs", float, "Linear learning-rate warmup in front of the schedule."),
    ("--grad-clip", "grad_clip", float, "Clip the gradient norm to this value."),
    ("--ema", "ema", float, "Keep an EMA of the weights with this decay (e.g. 0.999); saved as final."),
    ("--autocast", "autocast", str, "bf16 (CPU or CUDA) or fp16 (CUDA) mixed precision."),
    ("--attack-steps", "attack_steps", int, "Steps of the training attack (default: the method's)."),
    ("--attack-step-size", "attack_step_size", str, "Step size of the training attack, e.g. 2/255."),
    ("--beta", "beta", float, "TRADES/MART beta (default 6)."),
    ("--mask-ratio", "mask_ratio", float, "Fraction of pixels the mask trick masks (default 0.4, ours)."),
    ("--mask-pattern", "mask_pattern", str, "random (per batch; default) or fixed."),
    ("--stride", "stride", int, "First-conv stride of the stride trick (default 2, ours)."),
    ("--activation", "activation", str, "Smooth-act trick activation: silu (default, ours), softplus, gelu, elu."),
    ("--reg-lambda", "reg_lambda", float, "Weight-reg trick strength (default 0.1, ours)."),
    ("--reg-p", "reg_p", float, "Weight-reg trick exponent: lambda * sum |w|^p (default 2, ours)."),
    ("--mix", "mix", str, "Mix every training batch, soft labels: mixup, cutmix or sdmp (default none)."),
    ("--mix-alpha", "mix_alpha", float, "Beta(alpha, alpha) of mixup and cutmix (default 1, both papers')."),
    ("--on-co", "on_co", str, "On catastrophic overfitting: continue (default), stop or rollback."),
    ("--co-every", "co_every", int, "Also check for CO every N steps (default 0: at epoch ends only)."),
    ("--co-patience", "co_patience", int, "Consecutive suspect checks that flag CO (default 2)."),
    ("--seed", "seed", int, "Seed (default 0)."),
    ("--device", "device", str, "auto (default), cpu, cuda, cuda:N or mps."),
    ("--out", "out", str, "Output folder (default runs/METHOD-MODEL)."),
    ("--eval-n-examples", "eval_n_examples", int, "Evaluate --eval on the first N held-out examples."),
    ("--db", "db", str, "Leaderboard file for --eval (default ~/.robustkit/leaderboard.db)."),
]
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
FLAG_OPTIONS = [("--resume", "resume", "Continue the run in --out from its last epoch checkpoint."),
                 ("--channels-last", "channels_last", "Use the channels_last memory format."),
                 ("--same-budget", "same_budget", "advprop, fast-advprop: divide --epochs by the method's passes per "
                  "image (fast-advprop 1.2), so the run costs what standard training costs (the reference's "
                  "exact_same_training_budget).")]


def train_options(values: list[tuple[str, str, Any, str]]) -> Any:
    """Decorator: ``--config``, ``--dump-config`` and ``--quiet``, the value options ``values``
    (default None: the config's) and the flag options."""

    def add(fn: Any) -> Any:
        for opt, dest, typ, help_text in reversed(values):
            fn = click.option(opt, dest, type=typ, default=None, help=help_text)(fn)
        for opt, dest, help_text in reversed(FLAG_OPTIONS):
            fn = click.option(opt, dest, is_flag=True, default=False, help=help_text)(fn)
        fn = click.option("--quiet", is_flag=True, help="No progress display.")(fn)
        fn = click.option("--dump-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="Read options from this YAML file.")(fn)

    return add


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
    from robustkit.errors import UserError

    try:
        _train(ctx, method, tricks, eval_attacks, config_file, dump_config, quiet, options)
    except UserError as e:
        if _rank() and getattr(e, "worker", None) is None:
            raise click.exceptions.Exit(e.exit_code) from None  # every worker has it; rank 0 prints it
        raise


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _yaml_keys(config_file: str) -> dict[str, Any]:
    """The raw mapping of a config file (to pick the config class), or {} if it cannot be read here."""
    import yaml

    try:
        data = yaml.safe_load(Path(config_file).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def command_line_values(ctx: click.Context, options: dict[str, Any], tricks: tuple[str, ...],
                        eval_attacks: tuple[str, ...]) -> dict[str, Any]:
    """The config fields the command line sets (they override --config): options given there or
    with a non-flag value, tricks, the --eval attack list, and the step size as a number."""
    values = {name: value for name, value in options.items()
              if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
              or (value is not None and not isinstance(value, bool))}  # fmt: skip
    if tricks:
        values["tricks"] = list(tricks)
    if eval_attacks:
        from robustkit.evaluation.attack_spec import split_attacks

        values["eval_attacks"] = [a for item in eval_attacks for a in split_attacks(item) if a.lower() != "none"]
    if isinstance(values.get("attack_step_size"), str):
        from robustkit.threat import parse_eps

        values["attack_step_size"] = parse_eps(values["attack_step_size"])
    return values


def default_out(prefix: str, model: object) -> str:
    """``runs/PREFIX-MODEL``, the output folder when --out is not given."""
    return f"runs/{prefix}-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(model))


def _train(ctx: click.Context, method: str | None, tricks: tuple[str, ...], eval_attacks: tuple[str, ...],
           config_file: str | None, dump_config: bool, quiet: bool, options: dict[str, Any]) -> None:
    from robustkit.errors import UsageError
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
        primary = _rank() == 0
        if primary:
            _show_warnings()
        run_training(config, quiet or not primary, runner=train_dat, show=primary)
    else:
        run_training(config, quiet, runner=train)


class _ConsoleWarnings(logging.Handler):
    """Prints the training loop's warnings (e.g. a skipped --eval) as yellow lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        from robustkit.cli.console import err

        err.print(Text(f"warning: {record.getMessage()}", style="yellow"), soft_wrap=True)


def _show_warnings() -> None:
    logger = logging.getLogger("robustkit.training.loop")
    if not any(isinstance(h, _ConsoleWarnings) for h in logger.handlers):
        logger.addHandler(_ConsoleWarnings(logging.WARNING))


def run_training(config: Any, quiet: bool, *, runner: Any, show: bool = True) -> None:
    from rich.table import Table
    from rich.text import Text

    from robustkit.cli.console import StepBar, err, out
    from robustkit.training.loop import TrainEvent

    if show:
        _show_warnings()  # e.g. --resume with no checkpoint, a skipped --eval
    else:
        logging.getLogger("robustkit.training.loop").addHandler(logging.NullHandler())
    bar = StepBar()
    state: dict[str, Any] = {"co": False, "pgd": None}

    def status() -> str:
        parts = []
        if state.get("loss") is not None:
            parts.append(f"loss {state['loss']:.3f}")
        if state["pgd"] is not None:
            parts.append(f"pgd {state['pgd']:.1%}")
        if state["co"]:
            parts.append("[bold red]CO![/]")
        return "  ".join(parts)

    def on_event(ev: TrainEvent) -> None:
        if ev.kind == "start":
            if ev.epoch:
                err.print(Text(f"Resuming {config.out} after epoch {ev.epoch}.", style="cyan"))
            return
        if ev.kind == "co":
            state["co"] = True
            err.print(Text(f"Catastrophic overfitting (epoch {ev.info['epoch']}, step {ev.info['step']}): "
                                   f"{ev.info['reason']}; --on-co {config.on_co}.", style="yellow"), soft_wrap=True)
        if ev.kind == "check":
            state["pgd"] = ev.info["pgd_acc"]
        if quiet:
            return
        if ev.kind == "step":
            state["loss"] = ev.loss
            bar.update(f"epoch {ev.epoch + 1}/{ev.epochs}", ev.step, ev.steps, status())
        elif ev.kind == "epoch":
            bar.update(status=status())

    with bar:
        result = runner(config, progress=on_event)
    if not show:
        return
    table = Table(title=f"{config.method} on {config.model}, {config.dataset}, {config.norm} eps={config.eps:.4g}")
    for col in ("epoch", "loss", "train acc", "clean", "FGSM", "PGD-10", "CO", "seconds"):
        table.add_column(col, justify="right")
    for r in result.history:
        table.add_row(str(r["epoch"]), f"{r['loss']:.3f}", f"{r['train_acc']:.1%}", _pct(r["clean_acc"]),
                      _pct(r["fgsm_acc"]), _pct(r["pgd_acc"]), "[red]yes[/]" if r["co"] else "", f"{r['seconds']:.1f}")
    out.print(table)
    if result.co_detected:
        err.print(Text("Catastrophic overfitting was detected (see metrics.json)."
                       + (" Training stopped early." if result.stopped_early else ""), style="yellow"))
    if result.weights is not None:
        extra = f", {result.aux_weights.name}" if getattr(result, "aux_weights", None) is not None else ""
        err.print(Text(f"Weights: {result.weights} (sidecar {result.sidecar.name if result.sidecar else '-'}{extra}); "
                       f"metrics: {result.weights.parent / 'metrics.csv'}."))
    for report in result.eval_report or []:
        _print_eval(report, out)


def _print_eval(report: Any, console: Any) -> None:
    from rich.table import Table

    rows = report.existing + report.rows
    if not rows:
        return
    first = rows[0]
    table = Table(title=f"--eval: {first.model} on {first.dataset} (n={first.n_examples}), {first.norm} "
                        f"eps={first.eps:.4g}")
    for col in ("attack", "clean acc", "robust acc", "seconds"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for r in rows:
        table.add_row(r.attack, f"{r.clean_acc:.2%}", f"{r.robust_acc:.2%}", f"{r.seconds:.1f}")
    console.print(table)


def _pct(v: float) -> str:
    return "" if v != v else f"{v:.1%}"
