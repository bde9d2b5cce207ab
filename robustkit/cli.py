"""The ``robustkit`` command: a thin click layer over library calls, with rich output.

User mistakes print one red sentence and exit 2 (usage) or 1 (runtime); tracebacks are for bugs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import UsageError, UserError
from .threat import parse_eps

out = Console()
err = Console(stderr=True)


class EpsType(click.ParamType):
    """eps as a number or a fraction such as 8/255."""

    name = "eps"

    def convert(self, value, param, ctx):  # noqa: ANN001
        return value if isinstance(value, float) else parse_eps(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="robustkit")
def cli() -> None:
    """robustkit: evaluate and improve the adversarial robustness of PyTorch models.

    \b
    Examples:
      robustkit eval                                   # digits-cnn on sklearn digits, PGD Linf 0.1
      robustkit eval --model resnet20 --checkpoint resnet20.th \\
          --dataset npz:cifar10_test1000.npz --attack fgsm,pgd --eps 8/255
      robustkit list models
      robustkit leaderboard --format csv --output results.csv
    """


@cli.command("list")
@click.argument("what", type=click.Choice(["models", "attacks", "defenses", "datasets"]))
def list_cmd(what: str) -> None:
    """List registered names (with aliases).

    \b
    Example:
      robustkit list models
    """
    from .catalog import catalog

    table = Table(title=what, show_lines=False)
    for col in ("name", "aliases", "description"):
        table.add_column(col)
    for name, aliases, description in catalog(what):
        table.add_row(name, ", ".join(aliases), description)
    out.print(table)


class ProgressBars:
    """Rich progress bars per stage (clean pass, each attack), started on the first update."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tasks:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()


@cli.command("eval")
@click.option(
    "--model", default="digits-cnn", show_default=True, help="Registered name, timm:NAME or torchvision:NAME."
)
@click.option(
    "--checkpoint", type=click.Path(dir_okay=False), help=".safetensors, or .pt/.pth loaded with weights_only."
)
@click.option("--sha256", help="Expected sha256 of the checkpoint file.")
@click.option(
    "--normalize",
    default="default",
    show_default=True,
    help="default (the model's), cifar10, imagenet, none, or m1,m2,m3:s1,s2,s3.",
)
@click.option("--dataset", default="digits", show_default=True, help="Registered name or npz:PATH.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the torchvision dataset files.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "train"]))
@click.option("--n-examples", type=int, help="Evaluate the first N examples (default: all).")
@click.option("--attack", default="pgd", show_default=True, help="Attack name(s), comma-separated.")
@click.option(
    "--attack-kwargs", help="Attack options key=value,...; attack.key=value for one attack, e.g. pgd.steps=50,loss=cw."
)
@click.option("--norm", default="linf", show_default=True, type=click.Choice(["linf", "l2", "l1"]))
@click.option("--eps", default="0.1", show_default=True, type=EpsType(), help="Radius, e.g. 8/255.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
@click.option("--overwrite", is_flag=True, help="Recompute cells already in the leaderboard.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def eval_cmd(
    model: str,
    checkpoint: str | None,
    sha256: str | None,
    normalize: str,
    dataset: str,
    data_dir: str | None,
    download: bool,
    split: str,
    n_examples: int | None,
    attack: str,
    attack_kwargs: str | None,
    norm: str,
    eps: float,
    seed: int,
    batch_size: int,
    device: str,
    db: str | None,
    overwrite: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Evaluate a model's clean and robust accuracy; each attack writes a leaderboard row.

    \b
    Examples:
      robustkit eval
      robustkit eval --model resnet20 --checkpoint resnet20-12fca82f.th \\
          --dataset npz:cifar10_test1000.npz --n-examples 200 --attack fgsm,pgd --eps 2/255
      robustkit eval --dataset cifar10 --data-dir ~/data --model wrn28 --checkpoint w.safetensors \\
          --attack pgd --attack-kwargs steps=50,restarts=2 --eps 8/255
    """
    from .experiment import EvalSpec, parse_kwargs, run_eval

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}.")
    spec = EvalSpec(
        model=model,
        checkpoint=checkpoint,
        sha256=sha256,
        normalize=None if normalize == "none" else normalize,
        dataset=dataset,
        data_dir=data_dir,
        split=split,
        n_examples=n_examples,
        download=download,
        attacks=[a.strip() for a in attack.split(",") if a.strip()],
        attack_kwargs=parse_kwargs(attack_kwargs),
        norm=norm,
        eps=eps,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    with ProgressBars(enabled=not (quiet or as_json)) as bars:
        report = run_eval(spec, db=db, overwrite=overwrite, progress=bars)
    rows = report.existing + report.rows
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    for r in report.existing:
        err.print(
            Text(
                f"{r.attack}: already in the leaderboard (shown below); pass --overwrite to recompute.", style="yellow"
            ),
            soft_wrap=True,
        )
    _print_results(rows, report.result)


def _print_results(rows: Sequence, result) -> None:  # noqa: ANN001
    if not rows:
        return
    first = rows[0]
    table = Table(
        title=f"{first.model} on {first.dataset} (n={first.n_examples}), {first.norm} eps={_eps_str(first.eps)}"
    )
    table.add_column("attack")
    table.add_column("clean acc", justify="right")
    table.add_column("robust acc", justify="right")
    table.add_column("seconds", justify="right")
    for r in rows:
        table.add_row(r.attack, f"{100 * r.clean_acc:.2f}%", f"{100 * r.robust_acc:.2f}%", f"{r.seconds:.1f}")
    if result is not None and len(result.broken) > 1:
        table.add_row("worst case", f"{100 * result.clean_acc:.2f}%", f"{100 * result.robust_acc():.2f}%", "")
    out.print(table)


def _eps_str(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and k >= 1 else f"{eps:g}"


@cli.command("leaderboard")
@click.option(
    "--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "csv", "md", "json", "html"])
)
@click.option("--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.option("--dataset", help="Only rows of this dataset.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def leaderboard_cmd(
    fmt: str, output: str | None, dataset: str | None, norm: str | None, model: str | None, db: str | None
) -> None:
    """Show or export the leaderboard.

    \b
    Examples:
      robustkit leaderboard
      robustkit leaderboard --format csv --output results.csv --dataset cifar10
      robustkit leaderboard --format md --norm linf
    """
    from .leaderboard import Leaderboard, export

    frame = Leaderboard(db).frame(dataset=dataset, norm=norm, model=model)
    if fmt == "table" and output is None:
        cols = ["model", "dataset", "norm", "eps_str", "attack", "clean_acc", "robust_acc", "n_examples"]
        table = Table(title=f"leaderboard ({len(frame)} rows)")
        for c in cols:
            table.add_column(c, justify="right" if frame[c].dtype.kind in "fi" else "left")
        for _, r in frame[cols].iterrows():
            table.add_row(
                *(
                    f"{100 * v:.2f}%" if c.endswith("_acc") else f"{v:.1f}" if c == "seconds" else str(v)
                    for c, v in r.items()
                )
            )
        out.print(table)
        return
    text = export(frame, fmt, output)
    if output is None:
        click.echo(text)
    else:
        err.print(Text(f"Wrote {len(frame)} rows to {output}."))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: user errors become one red line and an exit code."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="robustkit", standalone_mode=False)
    except UserError as e:
        err.print(Text(f"Error: {e}", style="bold red"), soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print(Text("Aborted.", style="red"))
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
