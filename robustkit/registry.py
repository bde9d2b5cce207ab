"""Typed name registries for attacks, defenses, models and datasets, extensible by entry points.

Third-party packages add entries through the entry-point groups ``robustkit.attacks``,
``robustkit.defenses``, ``robustkit.models`` and ``robustkit.datasets``: each entry point
names an object that is registered under the entry point's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from robustkit.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with aliases, did-you-mean errors and lazy entry points."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaded_entry_points = False

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (lower-case) and its aliases."""

        def decorate(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        key = name.lower()
        if key in self._items and self._items[key] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[key] = obj
        for alias in aliases:
            self._aliases[alias.lower()] = key

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.group):
            if ep.name.lower() not in self._items:
                self._items[ep.name.lower()] = ep.load()

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; raises UnknownNameError."""
        self._load_entry_points()
        key = name.lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise UnknownNameError(self.kind, name, self.names(with_aliases=True))
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        key = name.lower()
        return self._aliases.get(key, key) in self._items

    def names(self, *, with_aliases: bool = False) -> list[str]:
        self._load_entry_points()
        names = list(self._items)
        if with_aliases:
            names += list(self._aliases)
        return sorted(names)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, target in self._aliases.items() if target == name)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_entry_points()
        return iter(sorted(self._items.items()))


ATTACKS: Registry = Registry("attack", "robustkit.attacks")
DEFENSES: Registry = Registry("defense", "robustkit.defenses")
MODELS: Registry = Registry("model", "robustkit.models")
DATASETS: Registry = Registry("dataset", "robustkit.datasets")
