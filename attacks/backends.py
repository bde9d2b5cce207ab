"""Other libraries' attacks behind robustkit's Attack contract, to compare implementations.

``torchattacks:PGD`` runs ``torchattacks.PGD`` (any class, options passed through) and
``pyautoattack:standard`` (or ``plus``, ``rand``, ``apgd-ce,square``) runs pyautoattack's
``AutoAttack``; ``--backend torchattacks|autoattack`` on the command line rewrites attack names
into these. eps and the norm come from the threat model; the seed is applied to the global RNG
these libraries use, inside ``torch.random.fork_rng`` so the caller's RNG state is untouched.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from robustkit.attack import Attack, AttackResult, Forward
from robustkit.errors import DependencyError, UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

from .autoattack import VersionOrList

_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def _import(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(module, install) from None


class _Logits(nn.Module):
    """The model as robustkit's Forward calls it (autocast, tuple outputs), for other libraries."""

    def __init__(self, forward: Forward):
        super().__init__()
        self.forward_fn = forward
        self.net = forward.model  # so libraries find the parameters' device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(x)


def _torchattacks_class(name: str, classes: list[str]) -> str | None:
    """torchattacks' spelling of a class name given in any case, with or without hyphens."""
    key = name.lower().replace("-", "")
    return next((c for c in classes if c.lower().replace("-", "") == key), None)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG (which these libraries draw from) and restore it afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@ATTACKS.register("torchattacks")
class TorchAttacks(Attack):
    """Any torchattacks attack by class name (``torchattacks:PGD``; default PGD, or PGDL2 under L2);
    ``options`` go to its constructor."""

    open_options = True  # every other option goes to the torchattacks class (attack_spec.option_hints)
    name = "torchattacks"
    supported_norms = ("linf", "l2")
    supports_targeted = False

    def __init__(self, threat: ThreatModel, *, attack: str | None = None, seed: int = 0, early_stop: bool = True,
                 autocast: str | None = None, channels_last: bool = False, **options: Any):
        super().__init__(threat, seed=seed, early_stop=early_stop, autocast=autocast, channels_last=channels_last)
        ta = _import("torchattacks", "pip install --no-deps torchattacks==3.5.1")
        attack = attack or ("PGDL2" if threat.norm == "l2" else "PGD")
        found = _torchattacks_class(attack, ta.__all__)
        if found is None:
            close = difflib.get_close_matches(attack, ta.__all__, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"torchattacks has no attack {attack!r}.{hint} It has {', '.join(ta.__all__)}.")
        self.attack_name = found
        self.cls = getattr(ta, self.attack_name)
        params = inspect.signature(self.cls.__init__).parameters
        self.options = dict(options)
        if "eps" in params:
            self.options["eps"] = threat.eps
        if "norm" in params:
            self.options["norm"] = _NORMS[threat.norm]
        elif threat.norm != "linf" and not self.attack_name.endswith(threat.norm.upper()):
            raise UsageError(f"torchattacks {self.attack_name} is an Linf attack; for {threat.norm} use its "
                             f"{threat.norm.upper()} class (e.g. PGDL2) or another attack.")
        if "seed" in params:
            self.options["seed"] = seed
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise UsageError(f"torchattacks {self.attack_name} takes no option {', '.join(unknown)}; "
                             f"it takes {', '.join(p for p in params if p not in ('self', 'model'))}.")

    @staticmethod
    def canonical_variant(variant: str) -> str:
        """The class name as torchattacks spells it (when torchattacks is installed)."""
        try:
            # optional extra (torchattacks, installed by hand)
            import torchattacks
        except ImportError:
            return variant
        return _torchattacks_class(variant, torchattacks.__all__) or variant

    @staticmethod
    def variant_options(variant: str) -> dict[str, Any]:
        return {"attack": variant}

    def config(self) -> dict[str, Any]:
        # optional extra (torchattacks, installed by hand)
        import torchattacks

        return {"attack": self.attack_name, "version": torchattacks.__version__,
                **{k: v for k, v in self.options.items() if k not in ("eps", "norm", "seed")}}

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        attack = self.cls(_Logits(forward).eval(), **self.options)
        with _seeded(x.device, self.seed):
            x_adv = attack(x, y)
        with torch.no_grad():
            success = self.is_success(forward(x_adv), y, None)
        return AttackResult(x_adv=x_adv.detach(), success=success)


@ATTACKS.register("pyautoattack")
class PyAutoAttack(VersionOrList, Attack):
    """pyautoattack's ``AutoAttack`` (``pyautoattack:standard|plus|rand`` or an attack list, which
    runs with the standard version's settings, like robustkit's ``autoattack:LIST``)."""

    name = "pyautoattack"
    supports_targeted = False

    def __init__(self, threat: ThreatModel, *, version: str = "standard", attacks: list[str] | str | None = None,
                 **kwargs: Any):
        super().__init__(threat, **kwargs)
        _import("pyautoattack", "pip install 'robustkit[oracles]'")
        self.version, self.attacks = self.resolve(version, attacks)

    def config(self) -> dict[str, Any]:
        # optional extra (oracles: pyautoattack)
        import pyautoattack

        cfg: dict[str, Any] = {"version": self.version, "package": getattr(pyautoattack, "__version__", "")}
        if self.attacks:
            cfg["attacks"] = self.attacks
        return cfg

    def perturb(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                generator: torch.Generator) -> AttackResult:
        # optional extra (oracles: pyautoattack)
        from pyautoattack import AutoAttack

        model = _Logits(forward).eval()
        version = "standard" if self.attacks else self.version
        adversary = AutoAttack(model, norm=_NORMS[self.threat.norm], eps=self.threat.eps, version=version,
                               seed=self.seed, device=x.device)
        if self.attacks:  # the standard settings, with this list of attacks
            adversary.attacks_to_run = list(self.attacks)
        adversary.verbose = False
        with _seeded(x.device, self.seed):
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]
        with torch.no_grad():
            success = self.is_success(forward(x_adv), y, None)
        return AttackResult(x_adv=x_adv.detach(), success=success)
