"""Host synchronizations per iteration of the iterative attacks (issue 22): at most two.

On a GPU every operation whose result the host must read (``nonzero``, ``.item()``, ``bool(t)``,
boolean-mask indexing, ``masked_select``, ``unique``) waits for the queued kernels, so a loop
with many of them runs at the speed of its launches. A ``TorchDispatchMode`` counts those
operations on CPU during whole attack runs at two step counts; the difference, divided by the
extra steps, is the count per iteration (setup and the final measurement cancel out). The early
stop check (which points are still attacked) is one per iteration; FAB's projection may ask
once whether its Newton iterations have converged. Host copies such as ``.tolist()`` or
``.cpu()`` do not reach the dispatcher on CPU tensors, so this test cannot see them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from robustkit import ThreatModel
from robustkit.attack import Attack
from robustkit.attacks import APGD, APGDT, FAB, FABT, PGD, Square

aten = torch.ops.aten
SYNCING = {
    aten.nonzero.default,
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.item.default,
    aten.is_nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        syncs = func in SYNCING
        if func in INDEXING:  # a boolean mask index is a nonzero in disguise
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if syncs:
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


LINF = ThreatModel("linf", 2 / 255)
L2 = ThreatModel("l2", 0.1)
# name: (attack with k iterations, runs of k iterations each: one per target class)
ATTACKS: dict[str, tuple[Callable[[int], Attack], int]] = {
    "pgd": (lambda k: PGD(LINF, steps=k), 1),
    "pgd-no-early-stop": (lambda k: PGD(LINF, steps=k, early_stop=False), 1),
    "apgd-ce": (lambda k: APGD(LINF, steps=k), 1),
    "apgd-ce-l1": (lambda k: APGD(ThreatModel("l1", 1.0), steps=k), 1),
    "apgd-ce-no-early-stop": (lambda k: APGD(LINF, steps=k, early_stop=False), 1),
    "apgd-t": (lambda k: APGDT(LINF, steps=k, n_target_classes=2), 2),
    "fab": (lambda k: FAB(LINF, steps=k), 1),
    "fab-t": (lambda k: FABT(LINF, steps=k, n_target_classes=2), 2),
    "fab-t-l2": (lambda k: FABT(L2, steps=k, n_target_classes=2), 2),
    "square": (lambda k: Square(LINF, n_queries=k, lookahead=1), 1),
    "square-l2": (lambda k: Square(L2, n_queries=k, lookahead=1), 1),
    "square-no-early-stop": (lambda k: Square(LINF, n_queries=k, early_stop=False), 1),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_at_most_two_host_syncs_per_iteration(name: str) -> None:
    make, runs = ATTACKS[name]
    model = small_model()
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    counts = {}
    for steps in (4, 24):
        with SyncCounter() as counter:
            result = make(steps)(model, x, y)
        counts[steps] = counter
        # a point robust at the end was attacked in every iteration of every run
        assert (~result.success).any(), "every point broke: the later iterations were not measured"
    per_iteration = (counts[24].count - counts[4].count) / (20 * runs)
    print(f"{name}: {per_iteration:.2f} host syncs per iteration ({counts[24].ops} in {runs} x 24 steps)")
    assert per_iteration <= 2
