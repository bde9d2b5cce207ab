"""User-facing errors: one clear sentence each; the CLI prints it and exits without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in what the user asked for or supplied (not a bug)."""

    exit_code = 1


class UsageError(UserError):
    """Bad command-line input: unknown name, out-of-range value, bad combination (exit 2)."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A name that is not in a registry; the message lists a did-you-mean where one is close."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(
            f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}."
            if len(known) <= 30
            else f"Unknown {kind} {name!r}.{hint} See `robustkit list {kind}s`."
        )


class DataError(UserError):
    """Missing, malformed or out-of-range data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unsafe, not a state dict, or does not fit the architecture."""


class DependencyError(UserError):
    """An optional dependency that is not installed."""

    def __init__(self, package: str, install: str):
        super().__init__(f"This needs the optional package {package!r}; install it with `{install}`.")


class ResultExistsError(UserError):
    """The leaderboard already has this evaluation cell."""
