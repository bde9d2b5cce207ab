"""The ``robustkit`` command: a thin click layer over library calls, with rich output.

User mistakes print one red sentence and exit 2 (usage) or 1 (runtime); tracebacks are for bugs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import UserError
from .threat import parse_eps

if TYPE_CHECKING:
    from .leaderboard import ResultRow

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
@click.option("--source", type=click.Choice(["robustkit", "robustbench"]), default="robustkit", show_default=True,
              help="robustbench: the names of RobustBench's model zoo (needs robustkit[robustbench]).")
@click.option("--dataset", help="With --source robustbench: cifar10, cifar100 or imagenet (default: all).")
@click.option("--threat-model", help="With --source robustbench: Linf, L2, corruptions, ... (default: all).")
def list_cmd(what: str, source: str, dataset: str | None, threat_model: str | None) -> None:
    """List registered names (with aliases), or RobustBench's model zoo.

    \b
    Examples:
      robustkit list models
      robustkit list models --source robustbench --dataset cifar10 --threat-model Linf
    """
    from .catalog import catalog
    from .registry import DEFENSES

    rows = catalog(what, source=source, dataset=dataset, threat_model=threat_model)
    if source == "robustbench":  # names never cut: they are what --model robustbench:NAME takes
        from .models.robustbench import parse_ref

        refs = [parse_ref(name) for name, _, _ in rows]
        split = not (dataset and threat_model)  # else both are in the title
        where = "" if split else f" {refs[0].dataset} {refs[0].threat_model}" if refs else f" {dataset} {threat_model}"
        usage = "robustbench:DATASET/THREAT_MODEL/NAME" if split else "robustbench:NAME"
        table = Table(title=f"RobustBench{where} model zoo ({len(rows)} models, --model {usage})")
        for col in ("dataset", "threat", "name") if split else ("name",):
            table.add_column(col, no_wrap=True)
        table.add_column("architecture", overflow="fold")
        for ref, (_, _, description) in zip(refs, rows, strict=True):
            cells = (ref.dataset, ref.threat_model, ref.name) if split else (ref.name,)
            table.add_row(*cells, Text(description))
        out.print(table)
        return
    kinds = what == "defenses"  # training, inference, architecture or data: where each one plugs in
    table = Table(title=what, show_lines=False)
    for col in ("name", "kind", "aliases", "description") if kinds else ("name", "aliases", "description"):
        table.add_column(col)
    for name, aliases, description in rows:
        kind = [Text(str(getattr(DEFENSES.get(name), "kind", "")))] if kinds else []
        table.add_row(Text(name), *kind, Text(", ".join(aliases)), Text(description))
    out.print(table)


class StepBar:
    """One transient bar on stderr for a run of steps (training epochs, RiFT stages): started by the
    first :meth:`update` that names a step, stopped when the ``with`` block ends."""

    def __init__(self, width: int = 14):
        self.progress = Progress(TextColumn(f"{{task.description:>{width}}}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err,
                                 transient=True)
        self.task: int | None = None

    def update(self, description: str | None = None, step: int | None = None, steps: int | None = None,
               status: str = "") -> None:
        """Show ``step`` of ``steps``; without a description, only the status of a started bar."""
        if self.task is None:
            if description is None:
                return
            self.progress.start()
            self.task = self.progress.add_task(description, total=steps, status="")
        self.progress.update(self.task, description=description, completed=step, total=steps, status=status)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()


class ProgressBars:
    """Rich progress: one bar per cell (with its running robust accuracy) and one overall bar."""

    def __init__(self, enabled: bool, cells: int):
        self.enabled = enabled
        self.cells = cells
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err)
        self.tasks: dict[str, int] = {}

    def __call__(self, cell: str, done: int, total: int, robust: int, evaluated: int) -> None:
        if not self.enabled:
            return
        if not self.tasks:
            self.progress.start()
            self.tasks["overall"] = self.progress.add_task("overall", total=self.cells, status="")
        if cell not in self.tasks:
            self.tasks[cell] = self.progress.add_task(cell, total=total, status="")
        status = f"robust {100 * robust / max(evaluated, 1):.1f}%"
        self.progress.update(self.tasks[cell], completed=done, total=total, status=status)
        if done == total:
            self.progress.advance(self.tasks["overall"])

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()


@cli.command("eval")
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
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="[default: linf; l2 for --threat-model L2]")
@click.option("--eps", help="Radius or radii, comma-separated, e.g. 2/255,8/255. [default: 0.1; RobustBench's "
              "for robustbench: models, e.g. 8/255 on cifar10 Linf]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--batch-size", type=int, help="[default: 256]")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]")
@click.option("--dist-timeout", type=float, help="Under torchrun: seconds to wait for the other workers before "
              "giving up. [default: 600]")
@click.option("--diagnose/--no-diagnose", default=None, help="Gradient-masking and sanity checks (on for autoattack).")
@click.option("--records", "records_dir", type=click.Path(file_okay=False),
              help="Folder for per-sample records (default ~/.robustkit/records).")
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
    are several attacks; a killed run continues where it stopped when run again.

    \b
    Examples:
      robustkit eval
      robustkit eval --model resnet20 --checkpoint resnet20-12fca82f.th \\
          --dataset npz:cifar10_test1000.npz --n-examples 200 --attack fgsm,pgd --eps 2/255,8/255
      robustkit eval --model wrn28 --checkpoint w.safetensors --dataset cifar10 --data-dir ~/data \\
          --attack pgd --attack-kwargs steps=50,restarts=2 --eps 8/255
      robustkit eval --model resnet4b --checkpoint resnet4b.pth --dataset cifar10 --attack autoattack --eps 8/255
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
    from .experiment import EvalSpec, dump_json, parse_kwargs, run_grid

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
    cells = len(spec.model) * len(spec.eps)
    with ProgressBars(enabled=not (quiet or as_json), cells=cells) as bars:
        reports = run_grid(spec, db=db, overwrite=overwrite, progress=bars)
    if not reports:  # a rank other than 0 under torchrun
        return
    if as_json:
        click.echo(dump_json(reports))
        return
    for report in reports:
        for r in report.existing:
            err.print(Text(f"{r.model} {r.attack} eps={_eps_str(r.eps)}: already in the leaderboard (shown "
                           "below); pass --overwrite to recompute.", style="yellow"), soft_wrap=True)
        _print_cell(report)


def _print_cell(report) -> None:  # noqa: ANN001
    rows = report.existing + report.rows
    if not rows:
        return
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
    for warning in report.warnings:
        out.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)


def _eps_str(eps: float) -> str:
    from .leaderboard import eps_str

    return eps_str(eps)


@cli.command("poison")
@click.argument("method")
@click.option("--dataset", default="cifar10", show_default=True, help="Registered name or npz:PATH.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the torchvision dataset files.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--n-examples", type=int, help="Poison the first N examples (default: all).")
@click.option("--pattern", type=click.Path(dir_okay=False, exists=True), help="Reuse a saved pattern (JSON).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The poisoned copy (.npz).")
def poison_cmd(method: str, dataset: str, data_dir: str | None, download: bool, split: str, n_examples: int | None,
               pattern: str | None, output: str) -> None:
    """Write an unlearnable copy of a data set with a data defense (ops: One-Pixel Shortcut).

    Labels are unchanged; train on it with --dataset npz:OUTPUT. The pattern is saved next to
    it as OUTPUT.pattern.json.

    \b
    Example:
      robustkit poison ops --dataset cifar10 --data-dir ~/data --output ops.npz
      robustkit train standard --model resnet20 --dataset npz:ops.npz ...
    """
    from pathlib import Path

    import robustkit.defenses  # noqa: F401  (registers the defenses)
    from robustkit.defenses.kinds import defense_of_kind
    from robustkit.defenses.one_pixel_shortcut import save_npz

    from .data import load_dataset
    from .errors import UsageError

    key, cls = defense_of_kind(method, "data", "robustkit poison")
    if not output.endswith(".npz"):
        raise UsageError(f"--output must be an .npz file, got {output!r}.")
    with err.status(f"Loading {dataset} ({split})…"):
        data = load_dataset(dataset, data_dir=data_dir, split=split, n_examples=n_examples, download=download)
    defense = cls.from_pattern_file(pattern) if pattern else cls()
    if not pattern:
        with err.status(f"Searching the {key} pattern on {len(data)} images…"):
            defense.fit(data)
    with err.status("Applying and saving…"):
        poisoned = defense.transform(data)
        out = save_npz(poisoned, Path(output))
        side = defense.save_pattern(Path(output).with_suffix(".pattern.json"))
    click.echo(f"{key}: wrote {len(poisoned)} images to {out} (labels unchanged) and the pattern to {side}.")


@cli.command("leaderboard")
@click.option(
    "--format", "fmt", default="table", show_default=True,
    type=click.Choice(["table", "csv", "md", "json", "html", "robustbench"]),
    help="robustbench: one RobustBench model-info JSON per model, into the folder --output.",
)
@click.option("--output", type=click.Path(), help="Write to this file (a folder for robustbench) instead of stdout.")
@click.option("--compare", "compare_with", type=click.Path(),
              help="Show robustkit's numbers beside those of RobustBench model-info JSON (a file or a folder).")
@click.option("--dataset", help="Only rows of this dataset.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def leaderboard_cmd(
    fmt: str, output: str | None, compare_with: str | None, dataset: str | None, norm: str | None,
    model: str | None, db: str | None
) -> None:
    """Show or export the leaderboard, or compare it with RobustBench's numbers.

    \b
    Examples:
      robustkit leaderboard
      robustkit leaderboard --format csv --output results.csv --dataset cifar10
      robustkit leaderboard --format md --norm linf
      robustkit leaderboard --format robustbench --output model_info
      robustkit leaderboard --compare robustbench/model_info/cifar10/Linf
    """
    from .leaderboard import Leaderboard, export

    if fmt == "robustbench" or compare_with is not None:
        _robustbench_leaderboard(Leaderboard(db).rows(dataset=dataset, norm=norm, model=model), fmt, output,
                                 compare_with)
        return
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


def _robustbench_leaderboard(rows: list[ResultRow], fmt: str, output: str | None, compare_with: str | None) -> None:
    """``--format robustbench`` (model-info files) and ``--compare`` (a table of differences)."""
    from . import robustbench_format as rbf
    from .errors import UsageError
    from .leaderboard import export

    if compare_with is None:
        if output is None:
            raise UsageError("--format robustbench writes one JSON file per model into a folder; give --output DIR.")
        written, skipped = rbf.export_model_info(rows, output)
        for name in skipped:
            err.print(Text(f"skipped {name}: RobustBench has no leaderboard for it.", style="yellow"), soft_wrap=True)
        err.print(Text(f"Wrote {len(written)} RobustBench model-info file(s) to {output}:"))
        for path in written:
            click.echo(path)
        return
    if fmt == "robustbench":
        raise UsageError("--compare shows a table; use --format table, csv, md, json or html with it.")
    frame, missing = rbf.compare(rows, compare_with)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        err.print(Text(f"{len(missing)} model(s) in {compare_with} have no robustkit result: {shown}",
                       style="yellow"), soft_wrap=True)
    if fmt != "table" or output is not None:
        text = export(frame, fmt, output)
        if output is None:
            click.echo(text, nl=False)
        else:
            err.print(Text(f"Wrote {len(frame)} rows to {output}."))
        return
    table = Table(title="robustkit vs RobustBench model info (accuracy in %)",
                  caption="diff = robustkit - file; attacks and file paths: --format csv")
    heads = {"model": "model", "eps": "eps", "clean_acc": "clean", "clean_acc_file": "file", "clean_diff": "diff",
             "robust_acc": "robust", "robust_acc_file": "file", "robust_diff": "diff", "n_examples": "n"}
    longest = max([len(str(m)) for m in frame["model"]] + [5])
    for column, head in heads.items():
        table.add_column(head, justify="left" if column == "model" else "right", no_wrap=True,
                         min_width=longest if column == "model" else None)
    for _, r in frame.iterrows():
        table.add_row(*(f"{r[c]:+.2f}" if c.endswith("_diff") else f"{r[c]:.2f}" if c.endswith(("_acc", "_file"))
                        else str(r[c]) for c in heads))
    out.print(table)


@cli.command("plot")
@click.option("--metric", default="robust_acc", show_default=True,
              type=click.Choice(["robust_acc", "clean_acc", "seconds"]))
@click.option("--x", "x_axis", default="eps", show_default=True, type=click.Choice(["eps", "n_examples"]))
@click.option("--output", default="robustness.png", show_default=True, type=click.Path(dir_okay=False),
              help="A .png, .svg or .pdf file.")
@click.option("--dataset", help="Only rows of this dataset.")
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), help="Only rows of this norm.")
@click.option("--model", help="Only rows of this model.")
@click.option("--attack", help="Only rows of this attack (e.g. worst-case).")
@click.option("--db", type=click.Path(dir_okay=False), help="Leaderboard file (default ~/.robustkit/leaderboard.db).")
def plot_cmd(metric: str, x_axis: str, output: str, dataset: str | None, norm: str | None, model: str | None,
             attack: str | None, db: str | None) -> None:
    """Plot a metric against eps from the leaderboard, one line per model and attack (needs matplotlib).

    \b
    Example:
      robustkit plot --metric robust_acc --x eps --dataset cifar10 --output curves.svg
    """
    from .leaderboard import Leaderboard
    from .plot import plot_leaderboard

    frame = Leaderboard(db).frame(dataset=dataset, norm=norm, model=model)
    path = plot_leaderboard(frame, output, metric=metric, x=x_axis, attack=attack)
    err.print(Text(f"Wrote {path}."))


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


from .train_cli import train_cmd  # noqa: E402

cli.add_command(train_cmd)

from .report_cli import report_group  # noqa: E402

cli.add_command(report_group)
