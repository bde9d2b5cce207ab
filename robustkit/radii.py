"""The radii robustness papers report, per data set and norm: one table behind the default eps of
``robustkit eval``, the ranking radius of the leaderboard and the columns of a curve's summary.
No torch here: the leaderboard's views read it without importing the engine."""

from __future__ import annotations

# RobustBench's boards, keyed by its threat-model names: the one radius each ranks by.
BENCHMARK_EPS: dict[tuple[str, str], float] = {
    ("cifar10", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5, ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255,
}  # fmt: skip

# Every radius papers report: RobustBench's, plus the half radius for Linf on CIFAR, the L2 radii
# where RobustBench has no board (CIFAR-100, ImageNet) and Madry et al.'s on MNIST.
STANDARD_RADII: dict[tuple[str, str], tuple[float, ...]] = {
    ("cifar10", "linf"): (4 / 255, 8 / 255), ("cifar100", "linf"): (4 / 255, 8 / 255),
    ("cifar10", "l2"): (0.5,), ("cifar100", "l2"): (0.5,),
    ("imagenet", "linf"): (4 / 255,), ("imagenet", "l2"): (3.0,),
    ("mnist", "linf"): (0.1, 0.3), ("mnist", "l2"): (2.0,),
}  # fmt: skip


def benchmark_eps(dataset: str, norm: str) -> float | None:
    """RobustBench's eps for ``dataset`` under ``norm`` (``linf``/``l2``), or None if it has no such board."""
    return BENCHMARK_EPS.get((dataset, {"linf": "Linf", "l2": "L2"}.get(norm, "")))


def standard_eps(dataset: str, norm: str) -> float | None:
    """The data set's one standard radius: RobustBench's where it has a board, else the largest the
    papers report (MNIST Linf 0.3); None for data sets and norms without one (digits, L1)."""
    found = benchmark_eps(dataset, norm)
    radii = STANDARD_RADII.get((dataset, norm))
    return found if found is not None else (max(radii) if radii else None)
