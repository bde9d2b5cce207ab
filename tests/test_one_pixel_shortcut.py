"""One-Pixel Shortcut (defenses/one_pixel_shortcut.py): the search objective against a direct
evaluation of the reference's formula, planted answers, the per-class pattern, the npz round trip
through robustkit's loader, the registry entry and one-sentence errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit.data import Dataset, load_dataset
from robustkit.defenses.one_pixel_shortcut import (
    OnePixelShortcut,
    OPSPattern,
    apply,
    class_scores,
    corner_colors,
    save_npz,
    search_pixels,
)
from robustkit.errors import DataError, UsageError, UserError
from robustkit.registry import DEFENSES


def _random_data(n: int = 60, c: int = 3, h: int = 6, w: int = 5, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 0.01 + 0.98 * torch.rand(n, c, h, w, generator=g)  # no value is a corner colour
    y = torch.arange(n) % k
    return x, y


def _reference_scores(x: torch.Tensor, y: torch.Tensor, k: int) -> np.ndarray:
    """The reference's objective, written out loop by loop: mean(d) / std(d) over the class's
    images and channels, d = |colour - pixel|, colour bits with channel 0 most significant."""
    xs = x.permute(0, 2, 3, 1).double().numpy()
    ys = y.numpy()
    n, h, w, c = xs.shape
    out = np.zeros((k, h, w, 2**c))
    for cls in range(k):
        imgs = xs[ys == cls]
        for r in range(h):
            for col in range(w):
                for b in range(2**c):
                    colour = np.array([(b >> (c - 1 - i)) & 1 for i in range(c)], dtype=float)
                    d = np.abs(colour - imgs[:, r, col, :])
                    out[cls, r, col, b] = d.mean() / d.std()
    return out


def _changed_positions(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per image, the (H, W) mask of positions where any channel changed."""
    return (before != after).any(dim=1)


# -- the objective and the search ------------------------------------------------------------


def test_scores_match_the_reference_formula():
    x, y = _random_data(n=40, c=3, h=4, w=3, k=3)
    ours = class_scores(x, y, 3).numpy()
    ref = _reference_scores(x, y, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_corner_colour_order_is_the_references():
    assert corner_colors(3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1],
                                         [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]  # fmt: skip


def test_search_finds_the_planted_pixels_and_skips_taken_pairs():
    x, y = _random_data(n=80, c=3, h=6, w=5, k=4, seed=1)
    g = torch.Generator().manual_seed(2)
    # Class 0 and class 1: pixel (2, 3) nearly black -> white is a large, stable deviation there.
    for cls in (0, 1):
        x[y == cls, :, 2, 3] = 0.02 * torch.rand(int((y == cls).sum()), 3, generator=g)
    # Class 1 also has a weaker plant at (4, 1): nearly white, so black is its best colour.
    x[y == 1, :, 4, 1] = 1 - 0.1 * torch.rand(int((y == 1).sum()), 3, generator=g)
    # Class 2: pixel (0, 0) near (0, 1, 0) -> the opposite corner (1, 0, 1) wins.
    x[y == 2, :, 0, 0] = torch.tensor([0.01, 0.99, 0.01]) + 0.005 * torch.rand(20, 3, generator=g)
    p = search_pixels(x, y, 4)
    assert p.positions[0] == (2, 3) and p.colors[0] == (1.0, 1.0, 1.0)
    # (2, 3) with white is taken by class 0, so class 1 falls back to its second plant.
    assert p.positions[1] == (4, 1) and p.colors[1] == (0.0, 0.0, 0.0)
    assert p.positions[2] == (0, 0) and p.colors[2] == (1.0, 0.0, 1.0)
    assert p.counts == (20, 20, 20, 20) and p.image_shape == (3, 6, 5)
    # Every class's pick is its best pair among those not taken by earlier classes.
    scores = class_scores(x, y, 4).view(4, -1)
    taken: set[int] = set()
    for k in range(4):
        (r, c), colour = p.positions[k], p.colors[k]
        b = int(sum(int(v) << (2 - i) for i, v in enumerate(colour)))
        idx = (r * 5 + c) * 8 + b
        free = [j for j in range(scores.shape[1]) if j not in taken]
        assert scores[k, idx] == scores[k, free].max() and math.isclose(p.scores[k], float(scores[k, idx]))
        taken.add(idx)


def test_constant_pixels_score_infinite_and_ties_go_to_the_first_pair():
    x = torch.zeros(12, 1, 4, 4)
    x[:, :, 1:3, 1:3] = torch.rand(12, 1, 2, 2)
    y = torch.arange(12) % 3
    p = search_pixels(x, y, 3)
    # The black border gives a constant deviation with white: std 0, score inf; first free pair wins.
    assert p.positions == ((0, 0), (0, 1), (0, 2))
    assert p.colors == ((1.0,), (1.0,), (1.0,)) and all(math.isinf(s) for s in p.scores)
    assert not torch.isnan(class_scores(x, y, 3)).any()


def test_empty_class_gets_a_free_pair_after_the_others():
    x, y = _random_data(n=30, k=3)
    p = search_pixels(x, y, 4)  # class 3 has no images
    assert p.counts[3] == 0 and p.num_classes == 4
    pairs = {(pos, col) for pos, col in zip(p.positions, p.colors, strict=True)}
    assert len(pairs) == 4
    assert p.positions[:3] == search_pixels(x, y, 3).positions


# -- applying the pattern ----------------------------------------------------------------------


def test_one_pixel_per_image_same_per_class_as_searched():
    x, y = _random_data(n=60, k=4)
    p = search_pixels(x, y, 4)
    out = apply(x, y, p)
    changed = _changed_positions(x, out)
    assert (changed.flatten(1).sum(1) == 1).all()  # exactly one position per image
    assert ((x != out).sum(dim=(1, 2, 3)) == 3).all()  # all its channels changed
    for i in range(len(x)):
        k = int(y[i])
        r, c = p.positions[k]
        assert changed[i, r, c]
        assert out[i, :, r, c].tolist() == list(p.colors[k])
    # Different classes got different (position, colour) pairs.
    assert len({(pos, col) for pos, col in zip(p.positions, p.colors, strict=True)}) == 4


def test_x_is_not_modified_and_a_new_tensor_comes_back():
    x, y = _random_data()
    before, y_before = x.clone(), y.clone()
    ops = OnePixelShortcut()
    data = Dataset("synthetic", x, y, 4)
    poisoned = ops.transform(data)
    assert torch.equal(x, before) and torch.equal(y, y_before)
    assert poisoned.x.data_ptr() != x.data_ptr() and poisoned.y.data_ptr() != y.data_ptr()
    assert poisoned.name == "synthetic+ops" and poisoned.num_classes == 4 and torch.equal(poisoned.y, y)
    assert torch.equal(poisoned.x, apply(x, y, ops.pattern))


def test_the_same_pattern_applies_to_other_images_of_the_classes():
    x, y = _random_data(seed=3)
    p = search_pixels(x, y, 4)
    x2, y2 = _random_data(n=8, seed=4)
    out = apply(x2, y2, p)
    for i in range(8):
        r, c = p.positions[int(y2[i])]
        assert out[i, :, r, c].tolist() == list(p.colors[int(y2[i])])


def test_digits_transform_changes_only_the_class_pixels():
    data = load_dataset("digits", split="train")
    ops = OnePixelShortcut()
    out = ops.transform(data)
    p = ops.pattern
    assert p is not None and p.counts == tuple(int(v) for v in torch.bincount(data.y, minlength=10))
    changed = _changed_positions(data.x, out.x)
    assert (changed.flatten(1).sum(1) <= 1).all()
    for k in range(10):
        r, c = p.positions[k]
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[r, c] = True
        assert not changed[data.y == k][:, ~mask].any()
        assert (out.x[data.y == k][:, :, r, c] == torch.tensor(p.colors[k])).all()


# -- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_poisoned_data_loads_back_through_the_npz_loader(tmp_path, channels):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (40, channels, 7, 6), generator=g).float() / 255
    y = torch.arange(40) % 5
    ops = OnePixelShortcut()
    npz, pattern_file = ops.save(Dataset("u8", x, y, 5), tmp_path / "out")
    with np.load(npz) as f:
        assert f["x"].dtype == np.uint8 and f["y"].dtype == np.int64
    back = load_dataset(f"npz:{npz}", split="train")
    expected = ops.transform(Dataset("u8", x, y, 5))
    assert torch.equal(back.x, expected.x) and torch.equal(back.y, y) and back.num_classes == 5
    again = OnePixelShortcut.from_pattern_file(pattern_file)
    assert again.pattern == ops.pattern


def test_float_data_is_saved_as_float_nchw(tmp_path):
    data = load_dataset("digits", split="train", n_examples=200)  # values k/16: not multiples of 1/255
    poisoned = OnePixelShortcut().transform(data)
    path = save_npz(poisoned, tmp_path / "digits_ops.npz")
    with np.load(path) as f:
        assert f["x"].dtype == np.float32 and f["x"].shape == (200, 1, 8, 8)
    back = load_dataset(f"npz:{path}", split="train")
    assert torch.equal(back.x, poisoned.x) and torch.equal(back.y, poisoned.y)


def test_pattern_json_round_trip_keeps_infinite_scores(tmp_path):
    x = torch.zeros(6, 1, 3, 3)
    y = torch.arange(6) % 2
    p = search_pixels(x, y, 2)
    assert math.isinf(p.scores[0])
    path = p.save(tmp_path / "p.json")
    assert '"inf"' in path.read_text()
    assert OPSPattern.load(path) == p


# -- registry and errors ---------------------------------------------------------------------------


def test_registry_entry_is_a_data_defense():
    assert DEFENSES.get("ops") is OnePixelShortcut
    assert DEFENSES.get("one-pixel-shortcut") is OnePixelShortcut
    assert OnePixelShortcut.kind == "data"


def _one_sentence(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert msg and "\n" not in msg and msg.endswith(".")


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda x, y: search_pixels(x, y + 1, 4), DataError),  # label 4 with 4 classes
        (lambda x, y: search_pixels(x, y - 1, 4), DataError),  # label -1
        (lambda x, y: search_pixels(x[0], y, 4), DataError),  # 3-D images
        (lambda x, y: search_pixels(x, y[:-1], 4), DataError),  # one label short
        (lambda x, y: search_pixels(x, y.float(), 4), DataError),  # float labels
        (lambda x, y: search_pixels(x, y.view(-1, 1), 4), DataError),  # 2-D labels
        (lambda x, y: search_pixels(x * 2, y, 4), DataError),  # outside [0, 1]
        (lambda x, y: search_pixels(x.masked_fill(x > 0.5, math.nan), y, 4), DataError),
        (lambda x, y: search_pixels(x[:0], y[:0], 4), DataError),  # no images
        (lambda x, y: search_pixels(x[:, :, :0], y, 4), DataError),  # no pixels
        (lambda x, y: search_pixels(x.numpy(), y, 4), UsageError),
        (lambda x, y: search_pixels(x, y, 0), UsageError),
        (lambda x, y: search_pixels(x, y, 4, chunk_size=0), UsageError),
        (lambda x, y: apply(x[:, :, :4], y, search_pixels(x, y, 4)), DataError),  # other image size
        (lambda x, y: apply(x, y + 1, search_pixels(x, y, 4)), DataError),
        (lambda x, y: OnePixelShortcut(search_pixels(x, y, 4)).transform(Dataset("d", x, y, 5)), DataError),
        (lambda x, y: OnePixelShortcut().save_pattern("p.json"), UsageError),
    ],
)
def test_bad_input_is_a_one_sentence_error(make, error):
    x, y = _random_data()
    with pytest.raises(error) as exc:
        make(x, y)
    _one_sentence(exc)
    assert isinstance(exc.value, UserError)


def test_bad_pattern_files_are_one_sentence_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError) as exc:
        OPSPattern.load(bad)
    assert "\n" not in str(exc.value)
    x, y = _random_data()
    d = search_pixels(x, y, 4).to_dict()
    d["classes"][0]["row"] = 99
    with pytest.raises(DataError) as exc:
        OPSPattern.from_dict(d)
    _one_sentence(exc)
    with pytest.raises(DataError):
        OPSPattern.load(tmp_path / "missing.json")


def test_poison_command_writes_a_trainable_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from robustkit.cli import main

    out = tmp_path / "ops.npz"
    with pytest.raises(SystemExit) as exc:
        main(["poison", "ops", "--dataset", "digits", "--split", "train", "--output", str(out)])
    assert exc.value.code in (0, None), capsys.readouterr().err
    clean = load_dataset("digits", split="train")
    poisoned = load_dataset(f"npz:{out}")
    assert torch.equal(poisoned.y, clean.y)
    changed = (poisoned.x != clean.x).any(1).flatten(1).sum(1)
    assert int(changed.max()) <= 1  # at most one position per image (0 where it already had the colour)
    assert OPSPattern.load(out.with_suffix(".pattern.json")).num_classes == 10
    with pytest.raises(SystemExit) as exc:
        main(["poison", "pgd-at", "--dataset", "digits", "--output", str(out)])
    assert exc.value.code == 2 and "not a data defense" in capsys.readouterr().err
