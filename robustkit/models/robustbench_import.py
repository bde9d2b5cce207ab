"""Import the optional ``robustbench`` package, working around two defects of its 1.1.1 release.

robustbench 1.1.1 (the release on PyPI) cannot be imported on a fresh install:

* ``robustbench/eval.py`` does ``from autoattack import AutoAttack``, but the package it declares,
  ``pyautoattack``, installs the module ``pyautoattack`` (the module ``autoattack`` exists only
  in a git checkout of AutoAttack);
* ``robustbench/loaders.py`` does ``import pkg_resources``, which setuptools removed in
  version 81 (torch pulls in a current setuptools).

Rather than editing files in site-packages or pinning an old setuptools into the user's
environment, :func:`import_robustbench` makes both names resolvable *only while robustbench
itself is being imported*, and only when they are really missing: ``autoattack[.*]`` resolves
to the very same ``pyautoattack[.*]`` module objects (an import alias, no second copy), and
``pkg_resources`` to a stand-in with the one function robustbench calls, ``resource_filename``.
Afterwards both names are removed from ``sys.modules`` again, so no other library sees them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Iterator

from robustkit.errors import DependencyError

#: What to run to get robustbench and everything it needs.
INSTALL = "pip install 'robustkit[robustbench]'"

#: module name robustbench imports -> module that provides it.
ALIASES = {"autoattack": "pyautoattack"}


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias by importing the real module and returning that same object."""

    def __init__(self, target: str):
        self.target = target
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # the import system overwrites it with the alias's spec
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run (the real module is already executed); give it back its own spec."""
        module.__spec__ = self.spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``alias`` and ``alias.sub`` to ``target`` and ``target.sub``."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        for alias, real in self.aliases.items():
            if fullname == alias or fullname.startswith(alias + "."):
                return importlib.util.spec_from_loader(fullname, _AliasLoader(real + fullname[len(alias) :]))
        return None


def _resource_filename(module: str, resource: str) -> str:
    """``pkg_resources.resource_filename``: ``resource`` relative to the folder of ``module``."""
    origin = importlib.import_module(module).__file__ or ""
    return os.path.join(os.path.dirname(origin), resource)


def _missing(module: str) -> bool:
    return module not in sys.modules and importlib.util.find_spec(module) is None


@contextlib.contextmanager
def _compat_shims() -> Iterator[None]:
    """Make ``autoattack`` and ``pkg_resources`` importable for the duration of the block."""
    aliases = {a: t for a, t in ALIASES.items() if _missing(a) and not _missing(t)}
    finder = _AliasFinder(aliases)
    stand_in = None
    if _missing("pkg_resources"):
        stand_in = types.ModuleType("pkg_resources", "robustkit's stand-in: resource_filename only")
        stand_in.resource_filename = _resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if any(name == a or name.startswith(a + ".") for a in aliases):
                del sys.modules[name]
        if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


def import_robustbench() -> types.ModuleType:
    """``robustbench`` (with its model zoo and utils loaded), or a DependencyError saying what to install."""
    if sys.modules.get("robustbench.utils") is not None:
        return sys.modules["robustbench"]
    if importlib.util.find_spec("robustbench") is None:
        raise DependencyError("robustbench", INSTALL)
    try:
        with _compat_shims(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its dependencies' deprecation noise at import time
            module = importlib.import_module("robustbench")
            importlib.import_module("robustbench.model_zoo")
            importlib.import_module("robustbench.utils")
    except ImportError as exc:  # one of robustbench's own dependencies is missing
        raise DependencyError((exc.name or "a robustbench dependency").split(".")[0], INSTALL) from None
    return module
