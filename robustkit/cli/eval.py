"""`robustkit eval`: a grid of models x eps x attacks into the leaderboard (robustkit.evaluation)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator

import click
from rich.table import Table
from rich.text import Text

from robustkit.cli.console import ProgressBars, err, out
from robustkit.radii import STANDARD_RADII
from robustkit.units import eps_label


@click.command("eval")
@click.option("--model", help="Model name(s), comma-separated: registered names, timm:NAME, torchvision:NAME, "
              "robustbench:NAME. [default: digits-cnn]")
@click.option("--checkpoint", help="Checkpoint file(s), one per model: .safetensors, or .pt/.pth (weights_only).")
@click.option("--sha256", help="Expected sha256 of the checkpoint file.")
@click.option("--normalize", help="default (the model's), cifar10, imagenet, none, or m1,m2,m3:s1,s2,s3.")
@click.option("--threat-model", help="RobustBench threat model of robustbench: models (Linf, L2, corruptions); "
              "sets the default --norm and --eps. [default: Linf]")
@click.option("--model-dir", type=click.Path(file_okay=False),
              help="RobustBench's weights folder: <model-dir>/<dataset>/<threat-model>/<name>.pt. [default: ./models]")
@click.option("--dataset", help="Registered name or npz:PATH. [default: digits]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the torchvision dataset files.")
@click.option("--download", is_flag=True, default=None,
              help="Let torchvision download the dataset and RobustBench the weights of robustbench: models.")
@click.option("--split", type=click.Choice(["test", "train"]), help="[default: test]")
@click.option("--n-examples", type=int, help="Evaluate the first N examples (default: all).")
@click.option("--attack", help="Attack name(s), comma-separated; autoattack[:plus|rand|LIST], "
              "torchattacks:CLASS, pyautoattack[:...]; transfer (with --surrogate): PGD, MI-, DI-, TI-, MDTI-FGSM. "
              "[default: pgd]")
@click.option("--backend", type=click.Choice(["native", "torchattacks", "autoattack"]),
              help="Run the attacks with robustkit (native), torchattacks or pyautoattack. [default: native]")
@click.option("--attack-kwargs", help="Attack options key=value,...; attack.key=value for one attack (pgd.steps=50).")
@click.option("--defense", help="An inference defense wrapping the model, e.g. aaa (see `robustkit list defenses`).")
@click.option("--defense-kwargs", help="Options of the defense, key=value,...")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1", "l0"]),
              help="[default: linf; l2 for --threat-model L2] (l0: fmn only)")
@click.option("--eps", help="Radius or radii, comma-separated, e.g. 2/255,8/255. [default: 0.1; RobustBench's "
              "for robustbench: models, e.g. 8/255 on cifar10 Linf; none with only minimum-norm attacks (fmn, ddn, "
              "alma, cw, deepfool, fab), which store a robustness curve and add rows at the radii given]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--batch-size", type=int, help="[default: 256]")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]")
@click.option("--dist-timeout", type=float, help="Under torchrun: seconds to wait for the other workers before "
              "giving up. [default: 600]")
@click.option("--diagnose/--no-diagnose", default=None, help="Gradient-masking and sanity checks (on for autoattack).")
@click.option("--records", "records_dir", type=click.Path(file_okay=False),
              help="Folder for per-sample records (default: records/ in the leaderboard file's folder, "
              "~/.robustkit/records for the default leaderboard; the resumable batch cache goes there too, in runs/).")
@click.option("--save-adv", type=click.Path(file_okay=False), help="Store adversarial examples here (safetensors).")
@click.option("--surrogate", help="Craft the attacks on these models (comma-separated) and score them on --model "
              "(transfer); one row ATTACK@SURROGATE each. With --attack transfer: every transfer attack from "
              "every surrogate, plus their worst case (row `transfer`).")
@click.option("--surrogate-checkpoint", help="Checkpoints of the surrogates, comma-separated in the same order "
              "(an empty entry for none); without --surrogate, the names come from the checkpoints' sidecars.")
@click.option("--prompt", help="A visual prompt from `robustkit train prompt` (.safetensors) around the "
              "model; without --model, the backbone it was trained on.")
@click.option("--config", type=click.Path(dir_okay=False, exists=True), help="Read the evaluation from a YAML file.")
@click.option("--dump-config", is_flag=True, help="Print the YAML config of this command line and exit.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
@click.option("--overwrite", is_flag=True, help="Recompute cells already in the leaderboard.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def eval_cmd(config: str | None, dump_config: bool, db: str | None, overwrite: bool, quiet: bool, as_json: bool,
             attack_kwargs: str | None, defense_kwargs: str | None, **options: object) -> None:
    """Evaluate clean and robust accuracy over a grid of models × eps × attacks.

    Each attack writes a leaderboard row per cell (model, eps), plus a worst-case row when there
    are several attacks; a killed run continues where it stopped when run again. Minimum-norm
    attacks (fmn, ddn, alma, cw, deepfool, fab) run once per model without eps and store a
    robustness curve (per-sample distances, robust accuracy on an eps grid, median distance),
    plus their per-sample ensemble (fmn+ddn); at each --eps their rows come from the distances.

    \b
    Examples:
      robustkit eval
      robustkit eval --model resnet20 --checkpoint resnet20-12fca82f.th \\
          --dataset npz:cifar10_test1000.npz --n-examples 200 --attack fgsm,pgd --eps 2/255,8/255
      robustkit eval --model wrn28 --checkpoint w.safetensors --dataset cifar10 --data-dir ~/data \\
          --attack pgd --attack-kwargs steps=50,restarts=2 --eps 8/255
      robustkit eval --model resnet4b --checkpoint resnet4b.pth --dataset cifar10 --attack autoattack --eps 8/255
      robustkit eval --model resnet20 --checkpoint resnet20-12fca82f.th --attack fmn,ddn --norm l2   # curves
      robustkit eval ... --attack fmn,apgd-ce --norm linf --eps 4/255,8/255   # curve, rows, worst case
      robustkit eval --model robustbench:Carmon2019Unlabeled --dataset cifar10 --threat-model Linf \\
          --model-dir ~/models --attack autoattack                  # RobustBench's zoo, weights and eps
      robustkit eval ... --attack autoattack:apgd-ce,square --attack-kwargs square.n_queries=1000
      robustkit eval ... --attack autoattack --backend autoattack     # pyautoattack, to compare
      robustkit eval ... --attack PGD --backend torchattacks --attack-kwargs steps=10,alpha=0.01
      robustkit eval --model digits-cnn --checkpoint runs/pubdef/model.safetensors --attack transfer \\
          --surrogate digits-cnn,digits-cnn --surrogate-checkpoint runs/s1/model.safetensors,runs/s2/model.safetensors
      robustkit eval --config eval.yaml
      torchrun --nproc-per-node 4 -m robustkit eval --config eval.yaml   # sharded
    """
    # lazy: the CLI must not import torch at import time
    from robustkit.evaluation.grid import EvalSpec, dump_json, parse_kwargs, run_grid

    given = {k: v for k, v in options.items() if v is not None}
    if attack_kwargs is not None:
        given["attack_kwargs"] = parse_kwargs(attack_kwargs)
    if defense_kwargs is not None:
        given["defense_kwargs"] = parse_kwargs(defense_kwargs)
    base = dataclasses.asdict(EvalSpec.from_yaml(config)) if config else {}
    spec = EvalSpec(**{**base, **given})
    if dump_config:
        click.echo(spec.to_yaml(), nl=False)
        return
    curve_cells = any(spec.minimum_norm(a) for a in spec.attack)
    cells = len(spec.model) * (sum(math.isfinite(e) for e in spec.eps) + curve_cells)
    with ProgressBars(enabled=not (quiet or as_json), cells=cells) as bars, stage_log(not (quiet or as_json)):
        reports = run_grid(spec, db=db, overwrite=overwrite, progress=bars)
    if not reports:  # a rank other than 0 under torchrun
        return
    if as_json:
        click.echo(dump_json(reports))
        return
    for report in reports:
        if hasattr(report, "curves"):  # a CurveReport (no torch import at module level)
            _print_curves(report)
            continue
        for r in report.existing:
            err.print(Text(f"{r.model} {r.attack} eps={_eps_str(r.eps)}: already in the leaderboard (shown "
                           "below); pass --overwrite to recompute.", style="yellow"), soft_wrap=True)
        _print_cell(report)


class _StageLines(logging.Handler):
    """AutoAttack's per-stage lines on stderr (above the bars), as the reference prints them; on
    rank 0 only under torchrun."""

    def emit(self, record: logging.LogRecord) -> None:
        if int(os.environ.get("RANK", "0") or 0):
            return
        err.print(Text(f"autoattack: {record.getMessage()}", style="cyan"), soft_wrap=True)


@contextlib.contextmanager
def stage_log(enabled: bool) -> Iterator[None]:
    """Show the cascade's per-stage robust accuracy while ``robustkit eval`` runs."""
    logger = logging.getLogger("robustkit.attacks.autoattack")
    if not enabled:
        yield
        return
    handler, level = _StageLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _print_cell(report) -> None:  # noqa: ANN001
    rows = report.existing + report.rows
    if not rows:
        return
    for warning in report.warnings:  # before the numbers they qualify (random weights, an unusual eps)
        err.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
    first = rows[0]
    defense = f" + {first.defense}" if first.defense else ""
    title = f"{first.model}{defense} on {first.dataset} (n={first.n_examples}), {first.norm} eps={_eps_str(first.eps)}"
    table = Table(title=title)
    table.add_column("attack")
    table.add_column("clean acc", justify="right")
    table.add_column("robust acc", justify="right")
    table.add_column("seconds", justify="right")
    for r in rows:
        table.add_row(r.attack, f"{100 * r.clean_acc:.2f}%", f"{100 * r.robust_acc:.2f}%", f"{r.seconds:.1f}")
        for stage, acc in (r.extra or {}).get("per_stage", {}).get(r.attack, {}).items():
            table.add_row(f"  after {stage}", "", f"{100 * acc:.2f}%", "")
    out.print(table)


def _print_curves(report) -> None:  # noqa: ANN001
    """The minimum-norm attacks' curves of one model: distances and accuracy at the standard radii."""
    # lazy: the CLI must not import pandas at import time
    from robustkit.results.curves import radius_dataset, robust_at

    for c in report.existing:
        err.print(Text(f"{c.model} {c.attack} {c.norm} curve: already in the leaderboard (shown below); pass "
                       "--overwrite to recompute.", style="yellow"), soft_wrap=True)
    curves = report.existing + report.curves
    if not curves:
        return
    for warning in report.warnings:
        err.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
    first = curves[0]
    radii = STANDARD_RADII.get((radius_dataset(first), first.norm), ())
    defense = f" + {first.defense}" if first.defense else ""
    table = Table(title=f"{first.model}{defense} on {first.dataset} (n={first.n_examples}), {first.norm} "
                        f"minimum-norm curves")
    for col in ("attack", "clean acc", "found", "median dist", "mean dist", *[f"acc@{_eps_str(r)}" for r in radii],
                "seconds"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for c in curves:
        s = c.summary
        table.add_row(c.attack, f"{100 * s.clean_acc:.2f}%", f"{100 * s.found:.1f}%", _dist(s.median, c.norm),
                      _dist(s.mean, c.norm), *[f"{100 * float(robust_at(c.distances, r).mean()):.2f}%" for r in radii],
                      f"{c.seconds:.1f}")
    out.print(table)
    records = first.extra.get("records")
    if records:
        err.print(Text(f"per-sample distances: {records}", style="dim"), soft_wrap=True)


def _dist(value: float, norm: str) -> str:
    """A distance, in k/255 for Linf (the images' unit)."""
    if value != value:  # nan
        return "-"
    if norm == "linf" and value != float("inf"):
        return f"{value * 255:.2f}/255"
    return f"{value:.4g}"


def _eps_str(eps: float) -> str:
    return eps_label(eps)

