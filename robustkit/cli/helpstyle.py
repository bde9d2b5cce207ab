"""One help style for every command, applied once to the whole command tree (:func:`tidy`):
defaults as click's ``[default: x]`` (a help text's ``(default x)`` becomes that), one spelling
for one idea (``--output`` everywhere; ``--out`` still works, unlisted), and options in titled
groups where a command has many (:func:`format_option_groups`). No torch here."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import click

# "(default x)", "(default: x)" and "(default; more)" in a help text; "x (default)" after a choice
_DEFAULT_PAREN = re.compile(r"\s*\(default:?\s+([^()]*?)\)")
_DEFAULT_SEMI = re.compile(r"\s*\(default;\s*([^()]*?)\)")
_DEFAULT_AFTER = re.compile(r"([\w.~/-]+) \(default(?:;\s*([^()]*?))?\)")
_DEFAULT_BRACKET = re.compile(r"\s*\[default:\s*([^\]]*)\]")
_DEFAULT_NUMBER = re.compile(r"\s*[(\[](\d+(?:\.\d+)?)[)\]]\.?$")
# a second name kept working but left out of --help: (primary, alias)
ALIASES = (("--output", "--out"),)


class _Option(click.Option):
    """A click option whose help lists only its ``listed`` names (the others are aliases) and shows
    ``default_text`` as ``[default: x]`` (click would write ``[default: (x)]``)."""

    listed: list[str] | None = None
    default_text: str | None = None

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, show = self.opts, self.show_default
        if self.listed:
            self.opts = [o for o in opts if o in self.listed]
        if self.default_text:
            self.show_default = False
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts, self.show_default = opts, show
        if record is None or not self.default_text:
            return record
        return record[0], f"{record[1]}  [default: {self.default_text}]".strip()


def _no_default(opt: click.Option) -> bool:
    """No default value of its own (None, False, or click 8.3's UNSET): the help may name one."""
    d = opt.default
    return d is None or d is False or d == () or type(d).__name__ == "Sentinel"


def _set_default_text(opt: click.Option, text: str) -> None:
    if _no_default(opt) and not getattr(opt, "default_text", None):
        opt.__class__ = _Option
        opt.default_text = text.strip().rstrip(".")  # type: ignore[attr-defined]


def tidy_option(opt: click.Option) -> None:
    """Move a default written in ``opt``'s help into click's ``[default: x]``; name ``--output``."""
    help_text = opt.help or ""
    for pattern in (_DEFAULT_BRACKET, _DEFAULT_PAREN):
        m = pattern.search(help_text)
        if m and _no_default(opt):
            _set_default_text(opt, m.group(1))
            help_text = (help_text[:m.start()] + help_text[m.end():]).replace(" .", ".").strip()
    m = _DEFAULT_SEMI.search(help_text)
    if m is None:
        m = _DEFAULT_AFTER.search(help_text)
        if m and _no_default(opt):
            _set_default_text(opt, m.group(1).rstrip(","))
            rest = f" ({m.group(2)})" if m.group(2) else ""
            help_text = help_text[:m.start()] + m.group(1) + rest + help_text[m.end():]
    else:  # "random (default; one source per example)": the word before is the default
        before = re.search(r"([\w.-]+)\s*$", help_text[:m.start()])
        if before and _no_default(opt):
            _set_default_text(opt, before.group(1))
            help_text = help_text[:m.start()] + f" ({m.group(1)})" + help_text[m.end():]
    m = _DEFAULT_NUMBER.search(help_text)
    if m and _no_default(opt):  # "... sign included (8)."
        _set_default_text(opt, m.group(1))
        help_text = help_text[:m.start()] + "."
    for primary, alias in ALIASES:
        help_text = re.sub(rf"{alias}\b(?!-)", primary, help_text) if alias in opt.opts else help_text
    opt.help = help_text.strip() or None
    for primary, alias in ALIASES:
        if alias in opt.opts and primary not in opt.opts:
            opt.opts = [primary] + opt.opts
        elif primary in opt.opts and alias not in opt.opts:
            opt.opts = opt.opts + [alias]
        if alias in opt.opts:
            opt.__class__ = _Option
            opt.listed = [o for o in opt.opts if o != alias]  # type: ignore[attr-defined]


def _commands(command: click.Command) -> Iterable[click.Command]:
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _commands(sub)
    for sub in getattr(command, "subcommands", lambda: [])():
        yield from _commands(sub)


def tidy(root: click.Command) -> None:
    """Apply the help style to ``root`` and every command below it (once, at import)."""
    seen: set[int] = set()
    for command in _commands(root):
        if id(command) in seen:
            continue
        seen.add(id(command))
        command.context_settings.setdefault("show_default", True)
        for primary, alias in ALIASES:  # the examples in the text use the listed spelling
            if command.help:
                command.help = re.sub(rf"{alias}\b(?!-)", primary, command.help)
        for param in command.params:
            if isinstance(param, click.Option):
                tidy_option(param)


def format_option_groups(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter,
                         groups: Sequence[tuple[str, Sequence[str]]]) -> None:
    """``--help``'s options in titled sections, in ``groups``' order (each a title and the options'
    first names); options in no group come last, under "Other options"."""
    records: dict[str, tuple[str, str]] = {}
    order: list[str] = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        name = param.opts[0] if param.opts else param.name or ""
        records[name] = record
        order.append(name)
    placed: set[str] = set()
    sections: list[tuple[str, list[Any]]] = []
    for title, names in groups:
        rows = [records[n] for n in names if n in records and n not in placed]
        placed.update(n for n in names if n in records)
        if rows:
            sections.append((title, rows))
    rest = [records[n] for n in order if n not in placed]
    if rest:
        sections.append(("Other options", rest))
    for title, rows in sections:
        with formatter.section(title):
            formatter.write_dl(rows)
