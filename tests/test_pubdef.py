"""PubDef (defenses/pubdef.py) and the transfer threat model of ``robustkit eval --attack transfer
--surrogate a,b``: rows per source × attack, the worst case, errors, and PubDef's training step
(surrogate-crafted inputs, frozen surrogates, the source-selection rules). Digits only (embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_state_dict
from safetensors.torch import save_file
from torch import nn

from robustkit.attacks.transfer import TRANSFER_SUITE, craft_transfer
from robustkit.cli import main
from robustkit.data import load_dataset
from robustkit.defenses.pubdef import PubDef
from robustkit.errors import UsageError, UserError
from robustkit.evaluation.grid import TRANSFER, WORST_CASE, EvalSpec, Grid, run_grid
from robustkit.evaluation.surrogates import load_surrogate
from robustkit.models import load_model
from robustkit.threat import ThreatModel
from robustkit.training.pubdef import PubDefConfig

EPS = 0.2
FAST = {"steps": 3}  # every transfer attack, 3 steps: enough to break points, fast


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def other_surrogate(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second digits-cnn (perturbed packaged weights) saved as a plain checkpoint."""
    torch.manual_seed(7)
    zoo = load_model("digits-cnn")
    with torch.no_grad():
        for p in zoo.net.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    path = tmp_path_factory.mktemp("surrogate") / "digits-cnn-b.safetensors"
    save_file({k: v.contiguous() for k, v in zoo.net.state_dict().items()}, str(path))
    return str(path)


def spec(other: str, attack: list[str], surrogates: list[str] | None = None,
         ckpts: list[str | None] | None = None, options: dict | None = None) -> EvalSpec:
    return EvalSpec(model=["digits-cnn"], dataset="digits", n_examples=40, attack=attack,
                    attack_kwargs=FAST if options is None else options,
                    eps=[EPS], batch_size=40, device="cpu",
                    surrogate=surrogates if surrogates is not None else ["digits-cnn", "digits-cnn"],
                    surrogate_checkpoint=ckpts if ckpts is not None else [None, other])


# -- evaluation: rows and the worst case --------------------------------------------------------
def test_transfer_rows_and_worst_case_is_the_per_sample_min_of_single_runs(other_surrogate: str,
                                                                         tmp_path: Path) -> None:
    (report,) = run_grid(spec(other_surrogate, ["transfer"]), db=tmp_path / "lb.db")
    names = [r.attack for r in report.rows]
    labels = [r.attack_config.get("surrogate") for r in report.rows[:-1]]
    assert len(names) == 2 * len(TRANSFER_SUITE) + 1 and names[-1] == TRANSFER and WORST_CASE not in names
    assert len(set(labels)) == 2 and all(label.startswith("digits-cnn#") for label in labels)  # told apart by sha
    assert len(set(names)) == len(names)
    assert all(n.startswith(tuple(f"{a}@digits-cnn#" for a in TRANSFER_SUITE)) for n in names[:-1])
    shas = {r.attack_config["surrogate_sha256"] for r in report.rows[:-1]}
    assert len(shas) == 2
    # each source x attack alone, in its own evaluation: same per-sample outcome; the worst case is their min
    singles = []
    for i, ckpt in enumerate([None, other_surrogate]):
        for attack in TRANSFER_SUITE:
            (one,) = run_grid(spec(other_surrogate, [attack], ["digits-cnn"], [ckpt or ""]), db=tmp_path / f"{i}.db")
            (row,) = one.rows
            name = names[i * len(TRANSFER_SUITE) + TRANSFER_SUITE.index(attack)]
            assert row.robust_acc == pytest.approx(report.result.robust_acc(name))
            singles.append(one.result.robust(row.attack))
    per_sample_min = np.min(np.stack(singles), axis=0)
    transfer = report.rows[-1]
    assert transfer.robust_acc == pytest.approx(per_sample_min.mean())
    assert transfer.robust_acc <= min(r.robust_acc for r in report.rows[:-1])
    assert transfer.robust_acc < transfer.clean_acc  # the attacks did break points
    assert transfer.attack_config["attacks"] == names[:-1]


def test_transfer_with_other_attacks_adds_both_worst_cases(other_surrogate: str, tmp_path: Path) -> None:
    grid = Grid(spec(other_surrogate, ["transfer", "fgsm"], options={}), db=tmp_path / "lb.db")
    threat = grid.threats[0]
    rows = grid._rows("digits-cnn", "", threat, grid.attacks(threat), None, {})
    names = [r.attack for r in rows]
    assert len(names) == 2 * (len(TRANSFER_SUITE) + 1) + 2 and names[-2:] == [TRANSFER, WORST_CASE]
    assert len(rows[-2].attack_config["attacks"]) == 2 * len(TRANSFER_SUITE)  # fgsm is not a transfer-suite attack
    assert len(rows[-1].attack_config["attacks"]) == 2 * (len(TRANSFER_SUITE) + 1)


def test_single_surrogate_rows_unchanged(tmp_path: Path) -> None:
    grid = Grid(spec("", ["mi-fgsm", "pgd"], ["digits-cnn"], []), db=tmp_path / "lb.db")
    threat = grid.threats[0]
    rows = grid._rows("digits-cnn", "", threat, grid.attacks(threat), None, {})
    assert [r.attack for r in rows] == ["mi-fgsm@digits-cnn", "pgd@digits-cnn", WORST_CASE]
    assert rows[0].attack_config["surrogate"] == "digits-cnn" and len(rows[0].attack_config["surrogate_sha256"]) == 64


def test_a_surrogate_without_weights_is_the_same_network_on_a_rerun() -> None:
    """A weightless surrogate's initialization is seeded (a rerun or a resumed run attacks from the
    same network); it used to come from torch's global RNG."""
    first, again = (load_surrogate("resnet20", seed=3) for _ in range(2))
    other = load_surrogate("resnet20", seed=4)
    same = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)]
    differ = [torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True)
              if a.dim() > 1]  # conv and linear weights
    assert all(same) and not any(differ)


def test_rerun_is_kept_and_another_surrogate_checkpoint_is_a_new_row(other_surrogate: str, tmp_path: Path) -> None:
    db = tmp_path / "lb.db"
    first = run_grid(spec(other_surrogate, ["pgd"], ["digits-cnn"], [other_surrogate]), db=db)[0]
    again = run_grid(spec(other_surrogate, ["pgd"], ["digits-cnn"], [other_surrogate]), db=db)[0]
    packaged = run_grid(spec(other_surrogate, ["pgd"], ["digits-cnn"], [""]), db=db)[0]
    assert len(first.rows) == 1 and not again.rows and len(again.existing) == 1
    assert len(packaged.rows) == 1  # same row name, other weights: its own row, not "already there"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"surrogate": ["digits-cnnn"], "surrogate_checkpoint": []}, "--surrogate: Unknown model 'digits-cnnn'"),
    ({"surrogate": ["digits-cnn", "digits-cnn"], "surrogate_checkpoint": ["a.safetensors"]},
     "one --surrogate-checkpoint per surrogate"),
    ({"surrogate": [], "surrogate_checkpoint": []}, "--attack transfer crafts on public (surrogate) models"),
    ({"surrogate": ["digits-cnn", "digits-cnn"], "surrogate_checkpoint": []}, "given twice with the same weights"),
])
def test_eval_errors(kwargs: dict, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=None) as exc:
        Grid(EvalSpec(attack=["transfer"], n_examples=8, **kwargs), db=tmp_path / "lb.db")
    assert fragment in str(exc.value)


def test_eval_cli_error_is_one_red_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "eval", "--db", str(tmp_path / "lb.db"), "--quiet", "--attack", "transfer",
                       "--surrogate", "digits-cnn,digits-cnn", "--surrogate-checkpoint", "x.safetensors")
    assert code == 2 and "one --surrogate-checkpoint per surrogate" in err and "Traceback" not in err


# -- PubDef's training step ---------------------------------------------------------------------
class Recorder(nn.Module):
    """The model being trained: a small CNN that records every input batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", split="train", n_examples=32)
    return data.x, data.y


def strategy(other: str, selection: str, **kw: object) -> PubDef:
    return PubDef(ThreatModel("linf", EPS), surrogates=["digits-cnn", "digits-cnn"],
                  surrogate_checkpoints=[None, other], attacks=["pgd"], selection=selection, steps=3, **kw)


def draws(seed: int, n: int, k: int, selection: str) -> tuple[int, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    s = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return s, torch.randint(0, k, (n,), generator=g) if selection == "random" else None


def test_step_trains_on_surrogate_crafted_examples_and_never_touches_surrogates(other_surrogate: str,
                                                                               batch: tuple) -> None:
    x, y = batch
    pubdef = strategy(other_surrogate, "random")
    surrogates = [m for _, m, _ in pubdef.surrogate_models()]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in surrogates]
    target = Recorder().train()
    out = pubdef.step(target, x, y, torch.Generator().manual_seed(3))
    out.loss.backward()
    assert len(target.seen) == 1  # one forward on [clean; transfer]: the target is never attacked
    seed, choice = draws(3, len(y), 2, "random")
    assert torch.equal(target.seen[0][: len(y)], x)
    for k, model in enumerate(surrogates):
        rows = (choice == k).nonzero().flatten()
        assert len(rows) > 0
        crafted = craft_transfer(pubdef._build_attack("pgd"), model, x[rows], y[rows], seed=seed + k).x_adv
        assert torch.equal(target.seen[0][len(y):][rows], crafted)
        assert (crafted - x[rows]).abs().max() <= EPS + 1e-6 and not torch.equal(crafted, x[rows])
    assert pubdef.picks.tolist() == torch.bincount(choice, minlength=2).tolist()
    for model, state in zip(surrogates, before, strict=True):  # no gradient, no change, no grad flag
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is not None for p in target.parameters())
    expected = 0.5 * F.cross_entropy(target.net(x), y) + 0.5 * F.cross_entropy(target.net(target.seen[0][len(y):]), y)
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_top1_picks_the_source_with_the_highest_loss_per_example(other_surrogate: str, batch: tuple) -> None:
    x, y = batch
    pubdef = strategy(other_surrogate, "top1")
    target = Recorder().train()
    out = pubdef.step(target, x, y, torch.Generator().manual_seed(4))
    seed, _ = draws(4, len(y), 2, "top1")
    models = [m for _, m, _ in pubdef.surrogate_models()]
    advs = [craft_transfer(pubdef._build_attack("pgd"), m, x, y, seed=seed + k).x_adv for k, m in enumerate(models)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(target.net(adv), y, reduction="none") for adv in advs])
    worst = losses.argmax(0)
    assert 0 < int((worst == 1).sum()) < len(y)  # both sources win somewhere: the rule is exercised
    assert pubdef.picks.tolist() == torch.bincount(worst, minlength=2).tolist()
    assert out.parts["transfer"] == pytest.approx(float(losses.max(0).values.mean()), rel=1e-5)


def test_exp_weights_follow_the_smoothed_source_losses(other_surrogate: str, batch: tuple) -> None:
    x, y = batch
    pubdef = strategy(other_surrogate, "exp", exp_alpha=0.5)
    target = Recorder().train()
    out = pubdef.step(target, x, y, torch.Generator().manual_seed(5))
    n = len(y)
    with torch.no_grad():
        means = torch.stack([F.cross_entropy(target.net(target.seen[0][n * (k + 1): n * (k + 2)]), y)
                             for k in range(2)])
    moving = 0.5 * torch.full((2,), 0.5) + 0.5 * means
    weights = moving / moving.sum()
    assert torch.allclose(pubdef.moving_loss, moving, rtol=1e-5)
    assert out.parts["transfer"] == pytest.approx(float((weights * means).sum()), rel=1e-5)
    assert (weights.argmax() == means.argmax()) and pubdef.config()["source_weights"][int(means.argmax())] > 0.5


def test_pubdef_option_errors(other_surrogate: str) -> None:
    threat = ThreatModel("linf", EPS)
    with pytest.raises(UsageError, match="--surrogate NAME"):
        PubDef(threat)
    with pytest.raises(UsageError, match="--surrogate: Unknown model 'nope'"):
        PubDef(threat, surrogates=["nope"])
    with pytest.raises(UsageError, match="one --surrogate-checkpoint per surrogate"):
        PubDef(threat, surrogates=["digits-cnn", "digits-cnn"], surrogate_checkpoints=[other_surrogate])
    with pytest.raises(UsageError, match="Unknown source selection"):
        PubDef(threat, surrogates=["digits-cnn"], selection="best")
    with pytest.raises(UsageError, match="Unknown attack"):
        PubDef(threat, surrogates=["digits-cnn"], attacks=["pgdd"])
    assert PubDef(threat, surrogates=["digits-cnn"], attacks=["transfer"]).attack_names == list(TRANSFER_SUITE)
    with pytest.raises(UsageError, match="PubDefConfig trains pubdef"):
        PubDefConfig(method="pgd-at", surrogate="digits-cnn")


# -- the command ----------------------------------------------------------------------------------
def test_train_pubdef_cli_saves_a_checkpoint_that_eval_transfer_reads(capsys: pytest.CaptureFixture,
                                                                      other_surrogate: str, tmp_path: Path) -> None:
    out = tmp_path / "pubdef"
    code, stdout, err = cli(capsys, "train", "pubdef", "--surrogate", "digits-cnn,digits-cnn", "--surrogate-checkpoint",
                            f",{other_surrogate}", "--n-examples", "64", "--batch-size", "32", "--epochs", "1",
                            "--eps", "0.2", "--attack-steps", "2", "--val-size", "0", "--device", "cpu",
                            "--out", str(out), "--quiet")
    assert code == 0, err
    side = json.loads((out / "model.json").read_text())
    recipe = side["recipe"]
    assert recipe["method"] == "pubdef" and recipe["selection"] == "random" and recipe["steps"] == 2
    assert len(recipe["sources"]) == 2 and sum(recipe["source_picks"]) == 64
    assert (out / "model.safetensors").stat().st_size > 0 and "Sources (random)" in err
    code, stdout, err = cli(capsys, "eval", "--db", str(tmp_path / "lb.db"), "--json", "--checkpoint",
                            str(out / "model.safetensors"), "--attack", "transfer", "--attack-kwargs", "steps=2",
                            "--surrogate", "digits-cnn", "--n-examples", "16", "--eps", "0.2")
    assert code == 0, err
    rows = json.loads(stdout)
    assert [r["attack"] for r in rows] == [f"{a}@digits-cnn" for a in TRANSFER_SUITE] + [TRANSFER]
    code, _, err = cli(capsys, "train", "pubdef", "--epochs", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "--surrogate NAME" in err and "Traceback" not in err


def test_exp_source_weights_survive_a_resume(other_surrogate: str, tmp_path: Path) -> None:
    """A run stopped after its first epoch checkpoint and resumed ends with exactly the weights,
    smoothed source losses and pick counts of an uninterrupted run (they are checkpointed)."""
    from robustkit.training.pubdef import train_pubdef

    def config(out: Path, resume: bool = False) -> PubDefConfig:
        return PubDefConfig(surrogate=["digits-cnn", "digits-cnn"], surrogate_checkpoint=[None, other_surrogate],
                            selection="exp", n_examples=64, batch_size=32, epochs=2, eps=0.2, attack_steps=2,
                            val_size=0, device="cpu", out=str(out), resume=resume)

    class Stop(Exception):
        pass

    def stop_in_second_epoch(event) -> None:  # noqa: ANN001
        if event.kind == "step" and event.epoch == 1:
            raise Stop

    whole = train_pubdef(config(tmp_path / "whole"))
    with pytest.raises(Stop):
        train_pubdef(config(tmp_path / "split"), progress=stop_in_second_epoch)
    stats = load_state_dict(tmp_path / "split" / "checkpoint" / "epoch-0001" / "aux.safetensors")
    assert set(stats) == {"moving_loss", "picks"} and int(stats["picks"].sum()) == 2 * 64
    resumed = train_pubdef(config(tmp_path / "split", resume=True))
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.aux is not None and whole.aux is not None
    assert torch.equal(resumed.aux.picks, whole.aux.picks) and int(resumed.aux.picks.sum()) == 2 * 2 * 64
    assert torch.equal(resumed.aux.moving_loss, whole.aux.moving_loss)
