"""Data mixing (robustkit.training.mixing) and ``--mix`` in the training loop: soft labels that sum to 1
and weigh each source by what the mixed image really holds, mixup's identity at lam = 1, CutMix's
area rule, SDMP's flipped pairing, one training step of every method with a mix, clear errors."""

from __future__ import annotations

import pytest
import torch

from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.errors import UsageError
from robustkit.training.loop import TrainConfig, train
from robustkit.training.mixing import MIXES, box, check_mix, cutmix, make_mixer, mixup, one_hot, sdmp

METHODS = ["standard", "pgd-at", "trades", "mart", "fgsm-rs", "fgsm-at"]


pytestmark = pytest.mark.usefixtures("one_thread")


def constant_batch(n: int = 10, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image i is the constant value c_i with label i: a mixed image's mean is then exactly the
    content-weighted mean of its sources' values, whatever the mix (blend, crop or resize)."""
    c = torch.linspace(0.05, 0.95, n)
    x = c.view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return x, torch.arange(n), c


@pytest.mark.parametrize("name", MIXES)
def test_targets_sum_to_one_and_weigh_sources_by_their_real_share(name: str) -> None:
    x, y, c = constant_batch()
    mixer = make_mixer(name, 10)
    assert mixer is not None
    for seed in range(5):
        xm, t = mixer(x, y, torch.Generator().manual_seed(seed))
        assert xm.shape == x.shape and t.shape == (10, 10)
        torch.testing.assert_close(t.sum(1), torch.ones(10))
        assert (t >= 0).all()
        # mean pixel of each mixed image = sum_k t[i, k] c_k: the label weights are the content shares
        torch.testing.assert_close(xm.mean((1, 2, 3)), t @ c, atol=2e-3, rtol=0)
        assert 0 <= float(xm.min()) and float(xm.max()) <= 1


def test_mixup_with_lambda_one_is_the_identity() -> None:
    d = load_dataset("digits", split="train", n_examples=16)
    t = one_hot(d.y, 10)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    xm, tm = mixup(d.x, t, 1.0, perm)
    assert torch.equal(xm, d.x) and torch.equal(tm, t)
    xm, tm = mixup(d.x, t, 0.3, perm)
    torch.testing.assert_close(xm, 0.3 * d.x + 0.7 * d.x[perm])
    torch.testing.assert_close(tm, 0.3 * t + 0.7 * t[perm])


def test_cutmix_label_weight_is_the_pasted_area() -> None:
    x, y, _ = constant_batch(4, size=32)
    t = one_hot(y, 4)
    perm = torch.tensor([1, 2, 3, 0])
    for seed, lam in enumerate([0.1, 0.3, 0.5, 0.75, 0.9]):
        g = torch.Generator().manual_seed(seed)
        y0, y1, x0, x1 = box(32, 32, lam, torch.Generator().manual_seed(seed))
        xm, tm = cutmix(x, t, lam, perm, g)
        area = (y1 - y0) * (x1 - x0) / 32**2
        assert area <= (1 - lam) + 1e-9  # clipping at the border only shrinks the box
        for i in range(4):
            from_partner = float((xm[i, 0] == x[perm[i], 0, 0, 0]).float().mean())
            assert from_partner == pytest.approx(area)
            assert float(tm[i, i]) == pytest.approx(1 - area) and float(tm[i, perm[i]]) == pytest.approx(area)
    # a box that fits: its area is (1 - lam) up to the integer rounding of the sides
    fits = [box(32, 32, 0.75, torch.Generator().manual_seed(s)) for s in range(200)]
    inner = [(b[1] - b[0]) * (b[3] - b[2]) for b in fits if b[0] > 0 and b[2] > 0 and b[1] < 32 and b[3] < 32]
    assert inner and all(a == 16 * 16 for a in inner)


def test_sdmp_pairs_each_image_with_the_flipped_batch() -> None:
    x, y, _ = constant_batch(6)
    _, t = sdmp(x, one_hot(y, 6), torch.Generator().manual_seed(0))
    for i in range(6):
        partner = 5 - i
        assert float(t[i, i] + t[i, partner]) == pytest.approx(1.0)
        assert 0.1 - 1e-6 <= float(t[i, i]) <= 0.95  # lam in [0.1, 0.9]; a clipped box keeps more


def test_unknown_mix_and_bad_alpha_are_one_line_errors() -> None:
    assert check_mix("none") is None and check_mix("CutMix") == "cutmix"
    with pytest.raises(UsageError, match="Did you mean 'cutmix'"):
        check_mix("cutmx")
    with pytest.raises(UsageError, match="mix-alpha"):
        make_mixer("mixup", 10, alpha=0)
    with pytest.raises(UsageError, match="Unknown --mix"):
        TrainConfig(mix="manifold")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_a_mix(method: str) -> None:
    mix = MIXES[METHODS.index(method) % len(MIXES)]
    base = dict(method=method, n_examples=64, epochs=1, batch_size=32, val_size=0, device="cpu",
                schedule="constant", attack_steps=2)
    result = train(TrainConfig(mix=mix, **base))
    (row,) = result.history
    assert row["loss"] == row["loss"] and row["steps"] == 2  # finite (not NaN), both batches trained
    plain = train(TrainConfig(**base))
    a, b = result.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "--mix changed nothing"


def test_mix_is_written_to_the_sidecar_and_reproducible(tmp_path) -> None:
    import json

    kw = dict(method="standard", n_examples=64, epochs=1, batch_size=32, val_size=0, device="cpu", mix="sdmp")
    r1 = train(TrainConfig(out=str(tmp_path / "a"), **kw))
    r2 = train(TrainConfig(out=str(tmp_path / "b"), **kw))
    side = json.loads((tmp_path / "a" / "model.json").read_text())
    assert side["recipe"]["config"]["mix"] == "sdmp"
    for k, v in r1.model.state_dict().items():
        assert torch.equal(v, r2.model.state_dict()[k])


def test_cli_rejects_unknown_mix_and_mix_with_dat(capsys: pytest.CaptureFixture) -> None:
    for args in (["train", "standard", "--mix", "cutmx"], ["train", "dat", "--mix", "mixup", "--out", "unused"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and "mix" in err, err
