"""The ``robustkit`` command line (``robustkit.cli:main``)."""

from robustkit.cli.main import cli, main

__all__ = ["cli", "main"]
