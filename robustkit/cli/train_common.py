"""What ``robustkit train`` and its subcommands share: the option table and its decorator (options
are declared one way), the values the command line sets, the default --out, and the run display
(progress bar, warnings, the per-epoch table)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import StepBar, err, out
from robustkit.units import eps_label, parse_eps

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
    ("--val-size", "val_size", int, "Held-out images for per-epoch metrics and CO checks; 0: none (default 256)."),
    ("--norm", "norm", str, "linf or l2 (default linf)."),
    ("--eps", "eps", str, "Radius, e.g. 8/255 or 0.3."),
    ("--eps-warmup-epochs", "eps_warmup_epochs", float, "Ramp the training eps linearly from 0 over these epochs."),
    ("--epochs", "epochs", int, "Epochs (default 10)."),
    ("--batch-size", "batch_size", int, "Batch size (default 128)."),
    ("--lr", "lr", float, "Peak learning rate (default 0.05)."),
    ("--optimizer", "optimizer", str, "sgd, adam, adamw or lamb (default sgd)."),
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
    ("--mask-ratio", "mask_ratio", float, "Fraction of pixels the mask trick masks, ours (default 0.4)."),
    ("--mask-pattern", "mask_pattern", str, "random (per batch) or fixed (default random)."),
    ("--stride", "stride", int, "First-conv stride of the stride trick, ours (default 2)."),
    ("--activation", "activation", str, "Smooth-act trick activation: silu (ours), softplus, gelu, elu "
     "(default silu)."),
    ("--reg-lambda", "reg_lambda", float, "Weight-reg trick strength, ours (default 0.1)."),
    ("--reg-p", "reg_p", float, "Weight-reg trick exponent: lambda * sum |w|^p, ours (default 2)."),
    ("--mix", "mix", str, "Mix every training batch, soft labels: mixup, cutmix or sdmp (default none)."),
    ("--mix-alpha", "mix_alpha", float, "Beta(alpha, alpha) of mixup and cutmix, as both papers (default 1)."),
    ("--on-co", "on_co", str, "On catastrophic overfitting: continue, stop or rollback (default continue)."),
    ("--co-every", "co_every", int, "Also check for CO every N steps; 0: at epoch ends only (default 0)."),
    ("--co-patience", "co_patience", int, "Consecutive suspect checks that flag CO (default 2)."),
    ("--seed", "seed", int, "Seed (default 0)."),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N or mps (default auto)."),
    ("--out", "out", str, "Output folder (default runs/METHOD-MODEL)."),
    ("--eval-n-examples", "eval_n_examples", int, "Evaluate --eval on the first N held-out examples."),
    ("--db", "db", str, "Leaderboard file for --eval (default ~/.robustkit/leaderboard.db)."),
]
FLAG_OPTIONS = [("--resume", "resume", "Continue the run in --output from its last epoch checkpoint."),
                 ("--channels-last", "channels_last", "Use the channels_last memory format."),
                 ("--same-budget", "same_budget", "advprop, fast-advprop: divide --epochs by the method's passes per "
                  "image (fast-advprop 1.2), so the run costs what standard training costs (the reference's "
                  "exact_same_training_budget).")]


# `robustkit train --help`: the options a first run needs first, then by concern (helpstyle.format_option_groups)
HELP_GROUPS: list[tuple[str, list[str]]] = [
    ("Common options", ["--model", "--checkpoint", "--dataset", "--data-dir", "--n-examples", "--norm", "--eps",
                        "--epochs", "--batch-size", "--lr", "--output", "--device", "--seed", "--eval", "--resume",
                        "--config", "--dump-config", "--quiet"]),
    ("Data and held-out metrics", ["--normalize", "--split", "--val-dataset", "--val-split", "--val-size",
                                   "--eval-n-examples", "--db"]),
    ("Optimization", ["--optimizer", "--momentum", "--weight-decay", "--schedule", "--warmup-epochs", "--grad-clip",
                      "--ema", "--autocast", "--channels-last", "--eps-warmup-epochs"]),
    ("The method's attack and loss", ["--attack-steps", "--attack-step-size", "--beta", "--mix", "--mix-alpha",
                                      "--same-budget"]),
    ("FGSM-AT tricks (--trick)", ["--trick", "--mask-ratio", "--mask-pattern", "--stride", "--activation",
                                  "--reg-lambda", "--reg-p"]),
    ("Catastrophic overfitting", ["--on-co", "--co-every", "--co-patience"]),
    ("dat and dat-fgsm", ["--grad-compression", "--quant-bits", "--quant-bucket", "--lr-scaling", "--base-batch-size",
                          "--clean-weight", "--unlabeled", "--n-unlabeled", "--dist-timeout"]),
]


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


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


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
        # lazy: imports torch (the CLI must not at import time)
        from robustkit.evaluation.attack_spec import split_attacks

        values["eval_attacks"] = [a for item in eval_attacks for a in split_attacks(item) if a.lower() != "none"]
    if isinstance(values.get("attack_step_size"), str):
        values["attack_step_size"] = parse_eps(values["attack_step_size"])
    return values


def resolve_config(cls: Any, ctx: click.Context, options: dict[str, Any], tricks: tuple[str, ...],
                   eval_attacks: tuple[str, ...], config_file: str | None, dump_config: bool, *,
                   method: str | None, out_prefix: str) -> Any:
    """The config ``cls`` of a ``robustkit train NAME`` command: ``--config FILE``, then ``method``,
    then the command line, ``--out`` defaulting to ``runs/OUT_PREFIX-MODEL``. With ``--dump-config``
    it prints the YAML and returns None."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(cls.from_yaml(Path(config_file)).to_dict())
    if method is not None:
        values["method"] = method
    values.update(command_line_values(ctx, options, tricks, eval_attacks))
    if not values.get("out") and not dump_config:
        values["out"] = default_out(out_prefix, values.get("model", "digits-cnn"))
    config = cls.from_dict(values)
    if dump_config:
        click.echo(config.to_yaml(), nl=False)
        return None
    return config


def default_out(prefix: str, model: object) -> str:
    """``runs/PREFIX-MODEL``, the output folder when --out is not given."""
    return f"runs/{prefix}-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(model))


class _ConsoleWarnings(logging.Handler):
    """Prints the training loop's warnings (e.g. a skipped --eval) as yellow lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text(f"warning: {record.getMessage()}", style="yellow"), soft_wrap=True)


def show_warnings() -> None:
    logger = logging.getLogger("robustkit.training.loop")
    if not any(isinstance(h, _ConsoleWarnings) for h in logger.handlers):
        logger.addHandler(_ConsoleWarnings(logging.WARNING))


def run_training(config: Any, quiet: bool, *, runner: Any, show: bool = True) -> None:
    # lazy: imports torch (the CLI must not at import time)
    from robustkit.training.loop import TrainEvent

    if show:
        show_warnings()  # e.g. --resume with no checkpoint, a skipped --eval
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
    tricks = f" + {', '.join(config.tricks)}" if getattr(config, "tricks", None) else ""
    table = Table(title=f"{config.method}{tricks} on {config.model}, {config.dataset}, {config.norm} "
                        f"eps={eps_label(config.eps)}")
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
    rows = report.existing + report.rows
    if not rows:
        return
    first = rows[0]
    table = Table(title=f"--eval: {first.model} on {first.dataset} (n={first.n_examples}), {first.norm} "
                        f"eps={eps_label(first.eps)}")
    for col in ("attack", "clean acc", "robust acc", "seconds"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for r in rows:
        table.add_row(r.attack, f"{r.clean_acc:.2%}", f"{r.robust_acc:.2%}", f"{r.seconds:.1f}")
    console.print(table)


def _pct(v: float) -> str:
    return "" if v != v else f"{v:.1%}"
