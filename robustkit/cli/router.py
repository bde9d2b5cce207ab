"""``robustkit train NAME ...``: the training procedures whose options differ from the training
methods' (prompt, rift, pubdef, distill) each have their own command; :class:`TrainCommand`
hands ``train NAME ...`` to it and lists them in ``robustkit train --help``."""

from __future__ import annotations

from typing import Any

import click

from robustkit.cli.distill import train_distill_cmd
from robustkit.cli.helpstyle import format_option_groups
from robustkit.cli.prompt import train_prompt_cmd
from robustkit.cli.pubdef import train_pubdef_cmd
from robustkit.cli.rift import train_rift_cmd
from robustkit.cli.train_common import HELP_GROUPS

# NAME -> (its command, one line for `robustkit train --help`)
SUBCOMMANDS: dict[str, tuple[click.Command, str]] = {
    "prompt": (train_prompt_cmd, "train an EVP prompt for a frozen backbone (--model M --checkpoint W --dataset D)"),
    "rift": (train_rift_cmd,
             "RiFT: fine-tune the least robust-critical module of an AT model (--model M --checkpoint W)"),
    "pubdef": (train_pubdef_cmd,
               "PubDef: train on transfer attacks from public models (--surrogate A,B [--surrogate-checkpoint ...])"),
    "distill": (train_distill_cmd, "distill a teacher into a student: KD + feature matching, --method pgd-at for "
                "robust KD (--teacher T --student S)"),
}


class TrainCommand(click.Command):
    """``robustkit train``, except that ``robustkit train NAME ...`` runs the command
    :data:`SUBCOMMANDS` names."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if args and args[0] in SUBCOMMANDS:
            return SUBCOMMANDS[args[0]][0].make_context(f"{info_name or 'train'} {args[0]}", list(args[1:]),
                                                        parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def subcommands(self) -> list[click.Command]:
        """The commands ``train NAME`` runs (so that the help style reaches them too)."""
        return [command for command, _ in SUBCOMMANDS.values()]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The common options first, then the optimizer, the methods' own and DAT's (train_common.HELP_GROUPS)."""
        format_option_groups(self, ctx, formatter, HELP_GROUPS)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Other training procedures (own options: robustkit train NAME --help)"):
            formatter.write_dl([(name, text) for name, (_, text) in SUBCOMMANDS.items()])
