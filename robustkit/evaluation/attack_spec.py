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

import difflib
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

import robustkit.attacks  # noqa: F401  (registers the attacks)
from robustkit.attack import Attack
from robustkit.attacks.autoattack import STAGES
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

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


def is_minimum_norm(name: str) -> bool:
    """Whether attack ``name`` (after its backend rewrite) is a minimum-norm attack: it runs
    without eps and reports per-sample distances (fmn, ddn, alma, cw, deepfool, fab)."""
    base = canonical_attack(name).partition(":")[0]
    return bool(getattr(ATTACKS.get(base), "minimum_norm", False))


def option_hints(cls: type) -> dict[str, Any] | None:
    """The keyword options an attack class takes, with their type hints, following ``**kwargs``
    up the class chain; None for a class that forwards options it cannot name (``open_options``,
    a library backend). A class's ``fixed_options`` (FGSM's ``steps``) are not options of it."""
    if getattr(cls, "open_options", False):
        return None
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]  # self, threat
        types_of = typing.get_type_hints(init)
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                hints.setdefault(p.name, types_of.get(p.name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    fixed = set(getattr(cls, "fixed_options", ()))
    return {k: v for k, v in hints.items() if k not in fixed}


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    hint = typing.get_origin(hint) or hint
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a text", type(None): "none",
             list: "a list", dict: "a mapping"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def check_options(attack: str, cls: type, options: dict[str, Any]) -> None:
    """Unknown options and values of the wrong type, as one sentence naming the option."""
    hints = option_hints(cls)
    if hints is None:
        return
    for key, value in options.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=2, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"{attack} has no option {key!r}.{hint} Its options: {', '.join(sorted(hints))}.")
        if not _fits(value, hints[key]):
            raise UsageError(f"The option {key} of {attack} takes {_describe(hints[key])}, got {value!r}.")


def _takes(attack: str, key: str) -> bool:
    hints = option_hints(ATTACKS.get(attack.partition(":")[0]))
    return hints is None or key in hints


def check_options_used(attacks: Sequence[str], kwargs: dict[str, Any]) -> None:
    """Every option must reach an attack of the run: ``a.key`` needs attack (or cascade stage) ``a``
    in the run, a plain key at least one attack that takes it."""
    bases = {a.partition(":")[0] for a in attacks}
    cascade = any(getattr(ATTACKS.get(b), "list_variant", False) and b != "pyautoattack" for b in bases)
    for key in kwargs:
        prefix, dot, name = key.rpartition(".")
        if name == "seed":
            raise UsageError(f"--attack-kwargs {key}: every attack is seeded from --seed; set that instead.")
        if dot:
            target = ATTACKS.canonical(prefix)
            if target not in bases and canonical_attack(prefix) not in attacks and not (cascade and target in STAGES):
                raise UsageError(f"--attack-kwargs {key}: {prefix} is not in this run (attacks: {', '.join(attacks)}).")
        elif not any(_takes(a, key) for a in attacks):
            known = sorted({k for a in attacks for k in option_hints(ATTACKS.get(a.partition(":")[0])) or ()})
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"No attack of this run ({', '.join(attacks)}) takes the option {key!r}.{hint}")


def options_for(attack: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options meant for ``attack``: plain keys it takes, ``attack.key``, and for a cascade its
    stages' ``stage.key`` as ``stage_options``."""
    out: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    base = attack.partition(":")[0]
    cascade = getattr(ATTACKS.get(base), "list_variant", False) and base != "pyautoattack"
    for key, value in kwargs.items():
        prefix, dot, name = key.rpartition(".")
        if not dot:
            if _takes(attack, key):
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
    check_options(name, cls, {k: v for k, v in kwargs.items() if k != "stage_options"})
    for stage, options in kwargs.get("stage_options", {}).items():
        check_options(f"{stage} in {name}", ATTACKS.get(stage), options)
    try:
        return cls(threat, seed=seed, **kwargs)
    except TypeError as e:
        raise UsageError(f"Bad options for attack {name}: {e}.") from None
