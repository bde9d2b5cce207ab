"""Square Attack: schedule and patterns as the reference, query counting, early stop, seeding,
the threat set; slow: robust accuracy against pyautoattack's ``SquareAttack``."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from robustkit import ThreatModel
from robustkit.attack import Forward, attack_mode
from robustkit.attacks import Square
from robustkit.attacks.square import centred_squares, eta, p_selection
from robustkit.models import load_model

from conftest import cifar10_test, shared_file

LINF = ThreatModel("linf", 8 / 255)


class Counting(nn.Module):
    """Wraps a model and counts the rows it is asked to classify, and the calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.rows = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        self.calls += 1
        return self.model(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def robust_model() -> nn.Module:
    return load_model("resnet4b", shared_file("models/abcrown_resnet4b.pth")).eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return cifar10_test(24)  # image 22 is misclassified by resnet4b


def test_p_schedule_is_the_references() -> None:
    # budget 10,000: p_init halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 iterations
    expected = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 501: 16, 1001: 32, 2001: 64, 4001: 128,
                6001: 256, 8000: 256, 8001: 512, 9999: 512}
    for it, divisor in expected.items():
        assert p_selection(0.8, it, 10000) == pytest.approx(0.8 / divisor)
    # other budgets are rescaled to 10,000 iterations (it·10000/n_queries, rounded down)
    assert p_selection(0.8, 1, 1000) == pytest.approx(0.8)  # 10
    assert p_selection(0.8, 2, 1000) == pytest.approx(0.4)  # 20
    assert p_selection(0.8, 100, 1000) == pytest.approx(0.8 / 16)  # 1000
    assert p_selection(0.8, 101, 1000) == pytest.approx(0.8 / 32)
    assert p_selection(0.8, 11, 1000, rescale=False) == pytest.approx(0.4)


def test_window_size() -> None:
    # CIFAR (32x32), 5000 queries rescaled to 10,000: s = round(sqrt(p·1024)); L2 windows are odd and >= 3
    linf, l2 = Square(LINF, rescale_schedule=True), Square(ThreatModel("l2", 0.5), rescale_schedule=True)
    assert [linf.window_size(it, 32, 32) for it in (0, 6, 26, 101, 4999)] == [29, 20, 14, 10, 1]
    assert [l2.window_size(it, 32, 32) for it in (0, 6, 26, 101, 4999)] == [29, 21, 15, 11, 3]
    assert linf.window_size(0, 8, 8) == 7 and Square(LINF, p_init=1.0).window_size(0, 8, 8) == 8
    # the default is AutoAttack's: the iteration count is not rescaled
    default = Square(LINF)
    assert default.rescale_schedule is False and default.config()["rescale_schedule"] is False
    assert [default.window_size(it, 32, 32) for it in (10, 11, 51, 201, 4999)] == [29, 20, 14, 10, 3]


def test_l2_patterns_are_the_references() -> None:
    ref = pytest.importorskip("pyautoattack.square").SquareAttack(None, norm="L2", eps=0.5, device="cpu")
    for rows, cols in [(1, 3), (2, 3), (3, 3), (4, 7), (5, 9), (16, 32)]:
        torch.testing.assert_close(centred_squares(rows, cols), ref.eta_rectangles(rows, cols))
    for s in (1, 3, 6, 7, 31):
        torch.manual_seed(0)
        ref_eta = ref.eta(s)  # transposed at random
        assert min(float((ref_eta - eta(s)).abs().max()), float((ref_eta - eta(s).T).abs().max())) < 1e-6


def test_query_counts(robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    n_queries = 40
    model = Counting(robust_model)
    with torch.no_grad():
        correct = robust_model(x).argmax(1) == y
    result = Square(LINF, n_queries=n_queries, seed=0, lookahead=1)(model, x, y)
    q = result.queries
    assert (~correct).any() and (q[~correct] == 0).all(), "points misclassified from the start cost 0 queries"
    assert (q[correct] >= 1).all() and (q <= n_queries + 1).all()
    survivors = correct & ~result.success
    broken = correct & result.success
    assert survivors.any() and broken.any()
    # the initial point + one query per iteration: a survivor costs n_queries + 1
    assert (q[survivors] == n_queries + 1).all()
    # early stop: broken points leave the batch as soon as they are misclassified
    assert (q[broken] < n_queries + 1).all()
    # one proposal at a time, the counts are the model's work (the base class classifies the
    # batch before and after); lookahead also evaluates proposals it then drops
    assert model.rows == 2 * len(x) + int(q.sum())


def test_query_counts_add_up_over_restarts(robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    result = Square(LINF, n_queries=10, restarts=2, seed=0)(robust_model, x, y)
    survivors = ~result.success
    assert survivors.any() and (result.queries[survivors] == 2 * 11).all()


def test_early_stop_does_not_change_the_result(
    robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = images
    x, y = x[:8], y[:8]
    for threat in (ThreatModel("linf", 16 / 255), ThreatModel("l2", 1.0)):
        fast = Square(threat, n_queries=25, seed=1)(robust_model, x, y)
        model = Counting(robust_model)
        full = Square(threat, n_queries=25, seed=1, early_stop=False)(model, x, y)
        assert torch.equal(fast.x_adv, full.x_adv) and torch.equal(fast.success, full.success)
        assert torch.equal(fast.queries, full.queries)
        assert model.rows > 2 * len(x) + int(full.queries.sum())  # broken points were still evaluated


def test_same_seed_same_result(robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    x, y = x[:8], y[:8]
    for threat in (LINF, ThreatModel("l2", 0.5)):
        a = Square(threat, n_queries=20, seed=5)(robust_model, x, y)
        b = Square(threat, n_queries=20, seed=5)(robust_model, x, y)
        c = Square(threat, n_queries=20, seed=6)(robust_model, x, y)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


def test_linf_perturbation_sits_on_the_vertices(
    robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = images
    result = Square(LINF, n_queries=20, seed=0)(robust_model, x, y)
    attacked = result.queries > 0
    delta = (result.x_adv - x)[attacked]
    xa = result.x_adv[attacked]
    # every coordinate is moved by ±eps, unless the [0, 1] box stops it
    at_vertex = (delta.abs() - LINF.eps).abs() < 1e-6
    assert (at_vertex | (xa == 0) | (xa == 1)).all()
    assert LINF.contains(result.x_adv, x).all()


def test_l2_stays_in_the_ball(robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    threat = ThreatModel("l2", 0.5)
    result = Square(threat, n_queries=30, seed=0)(robust_model, x, y)
    assert threat.contains(result.x_adv, x).all()
    norms = threat.norm_of(result.x_adv - x)[result.queries > 0]
    assert (norms <= 0.5 + 1e-5).all() and (norms > 0.4).all()  # the budget is used (less what the box cuts)


def test_targeted(robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    with torch.no_grad():
        second = robust_model(x).argsort(1, descending=True)[:, 1]
    result = Square(ThreatModel("linf", 16 / 255), n_queries=30, seed=0)(robust_model, x, y, target=second)
    assert result.success.any()
    with torch.no_grad():
        pred = robust_model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == second)


def test_refuses_bad_settings() -> None:
    from robustkit.errors import UsageError

    with pytest.raises(UsageError, match="n_queries"):
        Square(LINF, n_queries=0)
    with pytest.raises(UsageError, match="p_init"):
        Square(LINF, p_init=0)
    with pytest.raises(UsageError, match="supports the norms"):
        Square(ThreatModel("l1", 1.0))


# -- against the reference (slow) ----------------------------------------------------------------
def _reference_square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_queries: int, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """pyautoattack's SquareAttack on the correctly classified points: (success, queries)."""
    square = pytest.importorskip("pyautoattack.square")
    ref = square.SquareAttack(model, norm="Linf", n_queries=n_queries, eps=8 / 255, p_init=0.8,
                              n_restarts=1, seed=seed, device="cpu")
    ref.init_hyperparam(x)
    torch.manual_seed(seed)
    queries, adv = ref.attack_single_run(x, y)
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    return success, queries


@pytest.mark.slow
@pytest.mark.parametrize("model_name,checkpoint,n_images", [
    ("resnet4b", "models/abcrown_resnet4b.pth", 1000),  # fewer images make ±1.5pp a coin toss
    ("resnet20", "models/resnet20-12fca82f.th", 200),
])
def test_square_matches_pyautoattack(model_name: str, checkpoint: str, n_images: int) -> None:
    model = load_model(model_name, shared_file(checkpoint)).eval()
    x, y = cifar10_test(n_images)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    start = time.time()
    ours = Square(LINF, n_queries=1000, seed=0, rescale_schedule=True)(model, x, y)  # the reference's default
    t_ours = time.time() - start
    start = time.time()
    ref_success, ref_queries = _reference_square(model, x[correct], y[correct], 1000, seed=0)
    t_ref = time.time() - start
    ref_robust = float((~ref_success).sum()) / n_images
    q_ours = ours.queries[ours.success & correct].float().mean()
    q_ref = ref_queries[ref_success].float().mean()
    print(f"\nSquare Linf 8/255, 1000 queries, {model_name}, {n_images} images: robust accuracy "
          f"robustkit {ours.robust_accuracy:.2%} ({t_ours:.0f} s), pyautoattack {ref_robust:.2%} ({t_ref:.0f} s); "
          f"mean queries of successes {q_ours:.1f} vs {q_ref:.1f}")
    assert abs(ours.robust_accuracy - ref_robust) <= 0.015


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_lookahead_follows_the_same_trajectory(
    robust_model: nn.Module, images: tuple[torch.Tensor, torch.Tensor], norm: str, eps: float
) -> None:
    """Evaluating 8 proposals per point at once gives exactly the one-at-a-time result (points,
    success, query counts) in fewer, larger batches; float64, so that the batch size cannot
    flip a comparison by rounding."""
    model = Counting(robust_model.double())
    x, y = images
    x = x.double()
    with torch.no_grad():
        keep = robust_model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    runs, calls = {}, {}
    for lookahead in (1, 8):
        model.calls = 0
        attack = Square(ThreatModel(norm, eps), n_queries=200, seed=0, lookahead=lookahead)
        with attack_mode(model):
            runs[lookahead] = attack.perturb(Forward(model), x, y, None, torch.Generator().manual_seed(0),
                                             budget=8 * len(x))
        calls[lookahead] = model.calls
    robust_model.float()
    one, eight = runs[1], runs[8]
    assert 0 < int(one.success.sum()) < len(x)
    assert torch.equal(one.success, eight.success) and torch.equal(one.queries, eight.queries)
    assert torch.equal(one.x_adv, eight.x_adv) and torch.equal(one.loss, eight.loss)
    assert calls[8] < calls[1] / 2
