"""What an evaluation will cost, said before it runs: points × attacks × each attack's budget
(gradient steps or queries per point), read from the attacks' configs. Also the model calls one
run of an attack makes on a batch, which is what the progress display counts. No torch here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUERY_ATTACKS = ("square",)  # score-based: one forward pass per query, no gradient


@dataclass(frozen=True)
class Budget:
    """One attack's budget per point: ``grads`` forward+backward passes, ``queries`` forward-only
    passes, ``calls`` model calls per batch (its iterations; None when unknown, e.g. a library
    backend), ``text`` as shown (``pgd 10 steps``)."""

    grads: int
    queries: int
    calls: int | None
    text: str


def _targets(config: dict[str, Any], num_classes: int) -> int:
    n = config.get("n_target_classes", 0)
    return max(int(n) if n else num_classes - 1, 1) if "n_target_classes" in config else 1


def budget_of(name: str, attack: Any, num_classes: int = 10) -> Budget:
    """The budget of ``attack`` (registered under ``name``), at most: early stopping skips broken points."""
    inner = getattr(attack, "attack", None)  # a transfer attack: crafted on a surrogate, then one query
    if inner is not None and hasattr(inner, "config"):
        b = budget_of(name, inner, num_classes)
        return Budget(b.grads, b.queries + 1, b.calls, f"{b.text} on a surrogate")
    stages = getattr(attack, "stages", None)  # a cascade (AutoAttack): its stages, one after another
    if isinstance(stages, list) and stages and all(isinstance(s, tuple) for s in stages):
        parts = [budget_of(n, a, num_classes) for n, a in stages]
        calls = None if any(p.calls is None for p in parts) else sum(p.calls for p in parts)  # type: ignore[misc]
        return Budget(sum(p.grads for p in parts), sum(p.queries for p in parts), calls,
                      f"{name}: " + " + ".join(p.text for p in parts))
    config = attack.config() if hasattr(attack, "config") else {}
    restarts = max(int(config.get("restarts", 1) or 1), 1)
    targets = _targets(config, num_classes)
    eot = max(int(config.get("eot_iter", 1) or 1), 1)
    label = name
    more = (f" × {restarts} restarts" if restarts > 1 else "") + (f" × {targets} targets" if targets > 1 else "")
    more += f" × {eot} EOT" if eot > 1 else ""
    if "n_queries" in config:
        n = int(config["n_queries"]) * restarts * targets
        return Budget(0, n, n, f"{label} {int(config['n_queries'])} queries{more}")
    if "steps" in config:
        steps = int(config["steps"])
        n = steps * restarts * targets * eot
        return Budget(n, 0, n, f"{label} {steps} steps{more}")
    if "step_size" in config:  # one-step attacks (FGSM)
        return Budget(1, 0, 1, f"{label} 1 step")
    return Budget(0, 0, None, f"{label} (budget unknown)")


def _count(n: float) -> str:
    """2,560 / 1.28M / 3.4G: the size of a number at a glance."""
    for div, suffix in ((1e9, "G"), (1e6, "M")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{int(n):,}"


def cost_line(points: int, attacks: Sequence[tuple[str, Any]], *, cells: int = 1, num_classes: int = 10) -> str:
    """``256 points × 2 attacks (pgd 10 steps, square 5000 queries) ≈ 2,560 forward+backward + 1.28M queries``."""
    budgets = [budget_of(n, a, num_classes) for n, a in attacks]
    grads = cells * points * sum(b.grads for b in budgets)
    queries = cells * points * sum(b.queries for b in budgets)
    total = " + ".join(part for part in (f"{_count(grads)} forward+backward" if grads else "",
                                         f"{_count(queries)} queries" if queries else "") if part) or "no model calls"
    unknown = ", plus the library attacks' own" if any(b.calls is None for b in budgets) else ""
    where = f"{cells} cells × " if cells > 1 else ""
    plural = "s" if len(attacks) != 1 else ""
    return (f"{where}{points:,} points × {len(attacks)} attack{plural} ({', '.join(b.text for b in budgets)}) "
            f"≈ {total} at most (broken points stop early{unknown})")
