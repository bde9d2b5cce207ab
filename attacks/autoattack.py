"""AutoAttack (Croce & Hein, ICML 2020, arXiv 2003.01690): a cascade of parameter-free attacks.

Each stage attacks only the points every earlier stage failed on; a point is robust when all
stages fail. The versions follow pyautoattack's ``AutoAttack._set_version``:

* ``standard``: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (5,000
  queries); 100 iterations and one restart each. L1: APGD-CE with 5 restarts and APGD-T with 5
  target classes, both on the 3·eps, 2·eps, eps schedule (``use_largereps``).
* ``plus``: APGD-CE and APGD-DLR with 5 restarts, FAB (5 restarts), Square, APGD-T, FAB-T.
* ``rand``: APGD-CE and APGD-DLR with EOT over 20 forward passes, for randomized defenses.
* a custom list (``autoattack:apgd-ce,square``): those attacks, in that order, with their
  ``standard`` settings (the reference's custom version uses its constructor defaults instead,
  e.g. 5 APGD restarts).

Every stage is seeded with the cascade's seed, as the reference does. Stages whose attack does
not support the norm (Square under L1) are left out and listed in ``config()['skipped']``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from robustkit.attack import Attack, AttackResult, Forward, tell_stage
from robustkit.errors import UsageError
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel

log = logging.getLogger(__name__)  # AutoAttack's per-stage report, as the run goes (the CLI shows it)

# stage -> options, per version (the reference's settings, Linf and L2)
_STANDARD = {"apgd-ce": {}, "apgd-t": {"n_target_classes": 9}, "fab-t": {"n_target_classes": 9},
             "square": {"n_queries": 5000, "rescale_schedule": False}}
_L1_STANDARD = {"apgd-ce": {"restarts": 5, "use_largereps": True},
                "apgd-t": {"n_target_classes": 5, "use_largereps": True}}
VERSIONS: dict[str, dict[str, dict[str, Any]]] = {
    "standard": _STANDARD,
    "plus": {"apgd-ce": {"restarts": 5}, "apgd-dlr": {"restarts": 5}, "fab": {"restarts": 5},
             "square": _STANDARD["square"], "apgd-t": _STANDARD["apgd-t"], "fab-t": _STANDARD["fab-t"]},
    "rand": {"apgd-ce": {"eot_iter": 20}, "apgd-dlr": {"eot_iter": 20}},
}
STAGES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def standard_options(stage: str, norm: str) -> dict[str, Any]:
    """The standard version's options for one stage (used by custom lists too)."""
    table = {**_STANDARD, **_L1_STANDARD} if norm == "l1" else _STANDARD
    return dict(table.get(stage, {}))


class VersionOrList:
    """Variants of an AutoAttack name: ``NAME:plus`` (a version) or ``NAME:apgd-ce,square`` (a list)."""

    list_variant = True  # a custom list takes the rest of a comma-separated attack list

    @staticmethod
    def is_version(variant: str) -> bool:
        return variant in VERSIONS

    @staticmethod
    def canonical_variant(variant: str) -> str:
        if variant in VERSIONS:
            return "" if variant == "standard" else variant
        return ",".join(ATTACKS.canonical(a.strip()) for a in variant.split(",") if a.strip())

    @staticmethod
    def variant_options(variant: str) -> dict[str, Any]:
        return {"version": variant} if variant in VERSIONS else {"attacks": variant}

    @staticmethod
    def resolve(version: str, attacks: list[str] | str | None) -> tuple[str, list[str] | None]:
        """``("custom", stage names)`` for a list, else ``(version, None)``; an unknown version is an error."""
        if attacks:
            return "custom", parse_stages(attacks)
        if version not in VERSIONS:
            raise UsageError(f"Unknown AutoAttack version {version!r}; use standard, plus, rand or a list of "
                             f"attacks such as autoattack:apgd-ce,square.")
        return version, None


def parse_stages(attacks: list[str] | str) -> list[str]:
    """Canonical stage names of a custom list; only AutoAttack's own attacks are accepted."""
    names = [ATTACKS.canonical(a.strip()) for a in (attacks.split(",") if isinstance(attacks, str) else attacks)]
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise UsageError(f"AutoAttack cannot run {', '.join(bad)}; its attacks are {', '.join(STAGES)}.")
    return names


@ATTACKS.register("autoattack", aliases=("aa",))
class AutoAttack(VersionOrList, Attack):
    """The AutoAttack cascade: ``version`` standard / plus / rand, or ``attacks`` (a custom list).

    ``stage_options`` overrides one stage's options, e.g. ``{"square": {"n_queries": 1000}}``
    (``--attack-kwargs square.n_queries=1000`` on the command line).
    """

    name = "autoattack"
    supports_targeted = False
    takes_budget = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        version: str = "standard",
        attacks: list[str] | str | None = None,
        stage_options: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(threat, **kwargs)
        version, stages = self.resolve(version, attacks)
        if stages is not None:
            plan = {n: standard_options(n, threat.norm) for n in stages}
        else:
            plan = {n: dict(o) for n, o in VERSIONS[version].items()}
            if version == "standard" and threat.norm == "l1":
                plan = {n: standard_options(n, "l1") for n in plan}
        for stage, options in (stage_options or {}).items():  # stages it does not run: ignored
            plan.get(ATTACKS.canonical(stage), {}).update(options)
        self.version = version
        self.skipped = [n for n in plan if threat.norm not in ATTACKS.get(n).supported_norms]
        self.stages: list[tuple[str, Attack]] = []
        for stage, options in plan.items():
            if stage in self.skipped:
                continue
            try:
                attack = ATTACKS.get(stage)(threat, seed=self.seed, autocast=self.autocast,
                                            channels_last=self.channels_last, **options)
            except TypeError as e:
                raise UsageError(f"Bad options for {stage} in AutoAttack: {e}.") from None
            self.stages.append((stage, attack))

    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages]

    def config(self) -> dict[str, Any]:
        stages = {n: {k: v for k, v in a.config().items() if k != "autocast"} for n, a in self.stages}
        cfg: dict[str, Any] = {"version": self.version, "stages": stages}  # the precision is recorded once, here
        if self.skipped:
            cfg["skipped"] = self.skipped
        return cfg

    def perturb(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
        budget: int | None = None,
    ) -> AttackResult:
        """``budget``: the rows a stage may run at once (default ``len(x)``); the points that
        earlier stages broke leave room for packed target classes and Square's lookahead."""
        x_adv = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
        stages: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        for name, attack in self.stages:
            rows = (~broken).nonzero().flatten()
            tell_stage(attack, len(rows))  # for progress displays: no sync (rows is on the host already)
            if len(rows):
                stage_gen = torch.Generator(device=x.device).manual_seed(attack.seed)
                room = {"budget": budget or len(x)} if attack.takes_budget else {}
                out = attack.perturb(forward, x[rows], y[rows], None, stage_gen, **room)
                adv = attack.threat.clip(out.x_adv.detach(), x[rows])
                with torch.no_grad():  # judged in fp32: a point fp16 alone calls broken goes to the next stage
                    hit = attack.is_success(forward.fp32(adv), y[rows], None)
                x_adv[rows[hit]] = adv[hit]  # robust points keep x, as in the reference
                broken[rows[hit]] = True
                if out.queries is not None:
                    queries[rows] += out.queries
            stages[name] = broken.clone()
            if log.isEnabledFor(logging.INFO):  # one host sync per stage, only when someone listens
                robust = int((~broken).sum())
                log.info("robust after %s: %d of %d attacked points (%.1f%%), %.1f s", name, robust, len(x),
                         100 * robust / max(len(x), 1), time.perf_counter() - started)
        return AttackResult(x_adv=x_adv, success=broken, queries=queries, stages=stages)
