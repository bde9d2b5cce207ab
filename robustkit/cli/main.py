"""The ``robustkit`` command: a thin click layer over library calls, one module per command group.

User mistakes print one red sentence and exit 2 (usage) or 1 (runtime); tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
from rich.text import Text

from robustkit import __version__
from robustkit.cli.console import err
from robustkit.cli.eval import eval_cmd
from robustkit.cli.helpstyle import tidy
from robustkit.cli.leaderboard import leaderboard_cmd
from robustkit.cli.listing import list_cmd
from robustkit.cli.plot import plot_cmd
from robustkit.cli.poison import poison_cmd
from robustkit.cli.report import report_group
from robustkit.cli.train import train_cmd
from robustkit.errors import UserError


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



for command in (list_cmd, eval_cmd, train_cmd, poison_cmd, leaderboard_cmd, plot_cmd, report_group):
    cli.add_command(command)
tidy(cli)  # one help style: [default: x], --output (--out still works), grouped train options


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

