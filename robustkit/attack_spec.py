"""Attack names and options as users write them, turned into Attack objects.

* ``pgd``, ``apgd-ce``: a registered attack (aliases allowed);
* ``NAME:VARIANT``: an attack with a variant, e.g. ``autoattack:plus``, ``autoattack:apgd-ce,square``
  (a custom AutoAttack list takes the rest of a comma-separated list), ``torchattacks:PGD``,
  ``pyautoattack:standard``;
* a backend (``--backend torchattacks|autoattack``) rewrites plain names into the library's variant;
* options ``steps=20,pgd.loss=cw,square.n_queries=1000``: a plain key goes to every attack, ``a.key``
  to attack ``a`` or, inside an AutoAttack cascade, to its stage ``a``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

import robustkit.attacks  # noqa: F401  (registers the attacks)

from .attack import Attack
from .attacks.autoattack import STAGES
from .errors import UsageError
from .registry import ATTACKS
from .threat import ThreatModel

BACKENDS = ("native", "torchattacks", "autoattack")


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``steps=20,pgd.loss=cw`` -> typed dict (values read as YAML scalars; ``attack.key`` targets one attack)."""
    out: dict[str, Any] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"Cannot read attack option {part!r}; write key=value pairs separated by commas.")
        prefix, dot, name = key.strip().rpartition(".")
        out[f"{prefix}{dot}{name.replace('-', '_')}"] = yaml.safe_load(value.strip())
    return out


def _takes_list(base: str) -> bool:
    return base in ATTACKS and getattr(ATTACKS.get(base), "list_variant", False)


def split_attacks(value: str | Sequence[str] | None) -> list[str]:
    """Attack names from a comma-separated string (a custom AutoAttack list takes the rest) or a list."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [str(v).strip() for v in value if str(v).strip()]
    parts = [v.strip() for v in value.split(",") if v.strip()]
    for i, part in enumerate(parts):
        base, sep, variant = part.partition(":")
        if sep and _takes_list(base) and "," not in variant and not ATTACKS.get(base).is_version(variant):
            return parts[:i] + [",".join(parts[i:])]
    return parts


def canonical_attack(name: str) -> str:
    """The canonical spelling of an attack name (registered names, canonical variants)."""
    base, sep, variant = name.partition(":")
    key = ATTACKS.canonical(base.strip())
    if not sep:
        return key
    cls = ATTACKS.get(key)
    if not hasattr(cls, "variant_options"):
        raise UsageError(f"The attack {key} has no variants; {name!r} is not an attack name.")
    variant = cls.canonical_variant(variant.strip())
    return f"{key}:{variant}" if variant else key


def with_backend(name: str, backend: str) -> str:
    """``pgd`` under ``--backend torchattacks`` is ``torchattacks:pgd``; ``autoattack[:v]`` under
    ``--backend autoattack`` is ``pyautoattack[:v]``, another name ``pyautoattack:NAME``."""
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend {backend!r}; use {', '.join(BACKENDS)}.")
    base, sep, variant = name.partition(":")
    if backend == "native" or base.lower() in ("torchattacks", "pyautoattack"):
        return name
    if backend == "torchattacks":
        return f"torchattacks:{name}"
    if base in ATTACKS and ATTACKS.canonical(base) == "autoattack":
        return f"pyautoattack:{variant}" if sep else "pyautoattack"
    return f"pyautoattack:{name}"


def options_for(attack: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options meant for ``attack``: plain keys, ``attack.key``, and for a cascade its stages'
    ``stage.key`` as ``stage_options``."""
    out: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    base = attack.partition(":")[0]
    cascade = getattr(ATTACKS.get(base), "list_variant", False) and base != "pyautoattack"
    for key, value in kwargs.items():
        prefix, dot, name = key.rpartition(".")
        if not dot:
            out[key] = value
        elif canonical_attack(prefix) in (attack, base):
            out[name] = value
        elif cascade and ATTACKS.canonical(prefix) in STAGES:
            stages.setdefault(ATTACKS.canonical(prefix), {})[name] = value
    if stages:
        out["stage_options"] = stages
    return out


def build_attack(name: str, threat: ThreatModel, *, seed: int = 0, **kwargs: Any) -> Attack:
    """Instantiate an attack from its (possibly variant) name; unknown options give a one-line error."""
    base, sep, variant = canonical_attack(name).partition(":")
    cls = ATTACKS.get(base)
    if sep:
        kwargs = {**cls.variant_options(variant), **kwargs}
    try:
        return cls(threat, seed=seed, **kwargs)
    except TypeError as e:
        raise UsageError(f"Bad options for attack {name}: {e}.") from None
