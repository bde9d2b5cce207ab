"""The views a researcher reads: rows told apart (defense, checkpoint, attack config, random
weights), the ranked RobustBench-like summary and its exports, tables that fit 80 columns, and the
HTML page (in headless Chromium when it is installed)."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import robustkit.cli.leaderboard as cli_leaderboard
from robustkit.cli import main
from robustkit.results import ranked
from robustkit.results.html_page import ranked_page
from robustkit.results.labels import attack_labels, checkpoint_label, dataset_of_label, split_label
from robustkit.results.leaderboard import Leaderboard, ResultRow

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
RANDOM = {"warnings": ["resnet20 has no weights file (no --checkpoint and none packaged): these are the numbers "
                       "of a randomly initialized network."]}


def row(model: str = "resnet20", attack: str = "pgd", eps: float = 8 / 255, robust: float = 0.5, *,
        sha: str = SHA_A, clean: float = 0.9, config: dict | None = None, **changes) -> ResultRow:
    base = dict(model=model, checkpoint_sha256=sha, dataset="cifar10", n_examples=32, norm="linf", eps=eps,
                attack=attack, attack_config=config if config is not None else {"steps": 10, "batch_size": 256},
                seed=0, clean_acc=clean, robust_acc=robust, seconds=1.234567, robustkit_version="0.1.0",
                torch_version="2.3.0", device="cpu (x86_64)")
    return ResultRow(**(base | changes))


def cifar_rows() -> list[ResultRow]:
    """resnet20 (standard), resnet4b (robust) with pgd-10 and pgd-20, AutoAttack, AAA, random weights."""
    rows = []
    for eps, (r20, r4b) in {2 / 255: (0.05, 0.66), 8 / 255: (0.0, 0.25)}.items():
        rows += [row("resnet20", "fgsm", eps, r20 + 0.3, config={"batch_size": 256}),
                 row("resnet20", "pgd", eps, r20),
                 row("resnet4b", "fgsm", eps, r4b + 0.1, sha=SHA_B, clean=0.81, config={"batch_size": 256}),
                 row("resnet4b", "pgd", eps, r4b, sha=SHA_B, clean=0.81),
                 row("resnet4b", "pgd", eps, r4b - 0.03, sha=SHA_B, clean=0.81,
                     config={"steps": 20, "batch_size": 256})]
    rows.append(row("resnet4b", "autoattack", 8 / 255, 0.19, sha=SHA_B, clean=0.81,
                    config={"version": "standard", "stages": {}, "batch_size": 256}))
    rows.append(row("resnet20", "square", 8 / 255, 0.7, defense="aaa", config={"n_queries": 200, "batch_size": 256}))
    rows.append(row("resnet20", "pgd", 8 / 255, 0.0, sha="", clean=0.1, extra=RANDOM))
    return rows


def standard(dataset: str, norm: str, models) -> float | None:
    return {("cifar10", "linf"): 8 / 255}.get((dataset, norm))


# -- item 8: every row told apart ----------------------------------------------------------------

def test_attack_labels_tell_configs_apart() -> None:
    rows = [row(config={"steps": 10, "restarts": 1, "batch_size": 256}),
            row(config={"steps": 20, "restarts": 1, "batch_size": 256}),
            row(config={"steps": 10, "restarts": 2, "batch_size": 256}),
            row(config={"steps": 10, "restarts": 1, "batch_size": 25}),
            row(config={"steps": 10, "restarts": 1, "batch_size": 256}, seed=1),
            row(attack="fgsm", config={"batch_size": 256}),
            row(attack="worst-case", config={"attacks": ["pgd", "fgsm"], "configs": {}, "batch_size": 256})]
    labels = [attack_labels(rows)[id(r)] for r in rows]
    assert len(set(labels)) == len(rows), labels
    assert labels[1] == "pgd-20" and labels[5] == "fgsm" and labels[6] == "worst-case"
    assert "restarts=2" in labels[2] and "batch_size=25" in labels[3] and "seed=1" in labels[4]
    # the step size varies with eps: never a distinguishing option
    apart = [row(eps=2 / 255, config={"steps": 10, "step_size": 0.002}), row(config={"steps": 10, "step_size": 0.008})]
    assert {attack_labels(apart)[id(r)] for r in apart} == {"pgd-10"}


def test_checkpoint_labels() -> None:
    assert checkpoint_label(row()) == "aaaaaaaa"
    assert checkpoint_label(row(sha="", extra=RANDOM)) == "random weights"
    assert checkpoint_label(row(sha="")) == "-"
    assert checkpoint_label(row(extra={"checkpoint": "/x/resnet20-12fca82f.th"})) == "resnet20-12fca82f"
    assert checkpoint_label(row(extra={"checkpoint": "runs/rift-digits/model.safetensors"})) == "rift-digits/model"
    # one checkpoint is one entry, named by its file where any row records it
    rows = [row(), row(attack="fgsm", config={}, extra={"checkpoint": "w/rift.safetensors"}), row(sha=SHA_B)]
    (group,) = ranked.build_groups(rows)
    assert sorted(e.checkpoint for e in group.entries) == ["bbbbbbbb", "rift"]


# -- item 9: the ranked view ---------------------------------------------------------------------

def test_training_split_labels_keep_the_data_sets_radius_and_short_name() -> None:
    from robustkit.results.plot import dataset_label

    assert split_label("cifar10", "test") == "cifar10" and split_label("cifar10", "train") == "cifar10:train"
    assert dataset_of_label("cifar10:train") == dataset_of_label("cifar10") == "cifar10"
    assert cli_leaderboard.standard_eps("cifar10:train", "linf", ["wrn28"]) == pytest.approx(8 / 255)
    assert dataset_label("npz:/data/cifar10_test1000.npz:train") == "cifar10_test1000:train"


def test_ranked_view_worst_case_autoattack_and_order() -> None:
    (group,) = ranked.build_groups(cifar_rows(), standard)
    assert group.ranking_eps == "8/255" and group.standard and group.eps == ["2/255", "8/255"]
    assert group.has_autoattack
    entries = {(e.model, e.defense, e.checkpoint): e for e in group.entries}
    assert len(entries) == 4  # resnet20, resnet20 + aaa, resnet4b, resnet20 random weights
    r4b = entries[("resnet4b", "", "bbbbbbbb")]
    # the worst case over pgd-10, pgd-20, fgsm and AutoAttack, and the attack that gave it
    assert r4b.cells["8/255"] == ranked.Cell(0.19, "autoattack")
    assert r4b.cells["2/255"] == ranked.Cell(pytest.approx(0.63), "pgd-20")
    assert r4b.autoattack == 0.19 and r4b.clean_acc == 0.81
    aaa = entries[("resnet20", "aaa", "aaaaaaaa")]
    assert aaa.cells["8/255"].attack.startswith("square") and "2/255" not in aaa.cells
    random = entries[("resnet20", "", "random weights")]
    assert random.random_weights
    # a row of the same random model without the warning (e.g. derived from a curve) joins its entry
    (again,) = [e for e in ranked.build_groups([*cifar_rows(), row(attack="fmn", sha="", config={})], standard)[0]
                .entries if e.checkpoint == "random weights"]
    assert again.cells["8/255"].robust_acc == 0.0 and len(ranked.build_groups(cifar_rows(), standard)[0].entries) == 4
    # ranked by robust accuracy at 8/255 (ties by clean accuracy), best first
    assert [(e.rank, e.model, e.defense) for e in group.entries][:2] == [(1, "resnet20", "aaa"), (2, "resnet4b", "")]
    accs = [e.cells["8/255"].robust_acc for e in group.entries]
    assert accs == sorted(accs, reverse=True)


def test_ranking_radius_without_a_standard_one() -> None:
    rows = [row("a", eps=0.05, robust=0.8), row("a", eps=0.1, robust=0.6), row("a", eps=0.2, robust=0.1),
            row("b", eps=0.05, robust=0.7, sha=SHA_B), row("b", eps=0.1, robust=0.65, sha=SHA_B)]
    (group,) = ranked.build_groups(rows)
    assert group.ranking_eps == "0.1" and not group.standard  # the largest radius both have
    assert [e.model for e in group.entries] == ["b", "a"]
    # a standard radius nobody ran is not used
    (group,) = ranked.build_groups(rows, lambda *_: 0.3)
    assert group.ranking_eps == "0.1"


def test_nan_rows_and_groups_per_dataset_and_norm() -> None:
    rows = [row(robust=float("nan")), row(attack="fgsm", robust=0.4, config={}), row(norm="l2", eps=0.5),
            row(dataset="mnist", eps=0.3)]
    groups = ranked.build_groups(rows, standard)
    assert [(g.dataset, g.norm) for g in groups] == [("cifar10", "linf"), ("cifar10", "l2"), ("mnist", "linf")]
    assert groups[0].entries[0].cells["8/255"] == ranked.Cell(0.4, "fgsm")


def test_extra_columns_hook() -> None:
    median = ranked.ExtraColumn("median dist", lambda rs: 0.0123)
    share = ranked.ExtraColumn("share", lambda rs: 0.5, percent=True)
    (group,) = ranked.build_groups(cifar_rows(), standard, [median, share])
    heads, lines = ranked.text_rows(group)
    assert heads[-2:] == ["median dist", "share"] and lines[0][-2:] == ["0.0123", "50.0%"]
    assert ranked.to_frame([group])["median dist"].tolist() == [0.0123] * 4


def test_exports_of_the_ranked_view() -> None:
    groups = ranked.build_groups(cifar_rows(), standard)
    table = list(csv.DictReader(io.StringIO(ranked.to_frame(groups).to_csv(index=False))))
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"]
    assert table[1]["model"] == "resnet4b" and float(table[1]["robust@8/255"]) == 0.19
    assert table[1]["attack@8/255"] == "autoattack" and table[1]["checkpoint_sha256"] == SHA_B
    (group,) = json.loads(json.dumps(ranked.to_records(groups)))
    assert group["ranking_eps"] == "8/255" and group["rows"][1]["robust"]["2/255"]["attack"] == "pgd-20"
    md = ranked.to_markdown(groups)
    assert md.startswith("### cifar10 · linf · 32 points · ranked by robust accuracy at 8/255")
    assert "| 2 | resnet4b | - | bbbbbbbb | 32 | 81.0% | 19.0% | 63.0% pgd-20 | 19.0% autoattack |" in md


# -- the command: default view, --rows, 80 columns -----------------------------------------------

def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def db(tmp_path: Path) -> str:
    board = Leaderboard(tmp_path / "lb.db")
    for r in cifar_rows():
        board.add(r)
    return str(board.path)


def test_the_ranked_view_runs_without_torch(db: str) -> None:
    """`robustkit leaderboard` reads the standard radii from robustkit.radii: it does not import
    torch (2.4 s of its 3.5 s before)."""
    code = ("import sys\nfrom robustkit.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "leaderboard", "--db", db], capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "no torch", proc.stderr
    assert "ranked by robust accuracy at 8/255" in " ".join(proc.stdout.split())


def test_default_view_is_ranked_and_fits_80_columns(capsys: pytest.CaptureFixture, db: str) -> None:
    code, out, _ = run(capsys, "leaderboard", "--db", db)
    assert code == 0
    assert max(map(len, out.splitlines())) <= 80, out
    assert "ranked by robust accuracy at 8/255" in " ".join(out.split())
    body = [line for line in out.splitlines() if line.startswith("│")]
    assert len(body) == 4 and "resnet20" in body[0] and "aaa" in body[0] and "resnet4b" in body[1]
    assert "random weights" in body[3] and "bbbbbbbb" in body[1]
    assert "63.0%" in body[1] and "AA: AutoAttack's robust accuracy at 8/255" in " ".join(out.split())


def test_wide_terminal_shows_every_attack(capsys: pytest.CaptureFixture, db: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_leaderboard, "out", Console(width=160))
    code, out, _ = run(capsys, "leaderboard", "--db", db)
    assert code == 0 and "63.0% pgd-20" in out and "19.0% autoattack" in out and "attack after it" in out


def test_narrow_terminal_drops_radii_in_order(capsys: pytest.CaptureFixture, db: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_leaderboard, "out", Console(width=60))
    code, out, _ = run(capsys, "leaderboard", "--db", db)
    assert code == 0 and max(map(len, out.splitlines())) <= 60, out
    assert "8/255 *" in out and "2/255" not in out.split("┃", 1)[1] and "radius left out" in " ".join(out.split())


def test_rows_view_tells_every_row_apart(capsys: pytest.CaptureFixture, db: str) -> None:
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--rows")
    assert code == 0 and max(map(len, out.splitlines())) <= 80, out
    body = [re.sub(r"\s+", " ", line) for line in out.splitlines() if line.startswith("│")]
    assert len(body) == len(cifar_rows())
    assert len(set(body)) == len(body)  # no two rows look the same
    assert any("pgd-20" in line for line in body) and any("aaa" in line for line in body)
    assert any("random weights" in line for line in body)


def test_formats_export_the_ranked_view_and_rows_the_raw(capsys: pytest.CaptureFixture, db: str,
                                                          tmp_path: Path) -> None:
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "json")
    assert code == 0 and [r["model"] for r in json.loads(out)[0]["rows"]][:2] == ["resnet20", "resnet4b"]
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "csv", "--model", "resnet4b")
    assert code == 0 and len(out.strip().splitlines()) == 2 and "robust@8/255" in out
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "json", "--rows")
    raw = json.loads(out)
    assert len(raw) == len(cifar_rows()) and isinstance(raw[0]["attack_config"], dict)  # nested, not a string
    assert isinstance(raw[0]["extra"], dict)
    code, _, err = run(capsys, "leaderboard", "--db", db, "--format", "html", "--output", str(tmp_path / "b.html"))
    assert code == 0 and "Wrote" in err and (tmp_path / "b.html").read_text().count("<table") == 2
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--norm", "l2")
    assert code == 0 and "No rows" in out


# -- item 10: the HTML page ----------------------------------------------------------------------

def test_html_page_content() -> None:
    rows = cifar_rows()
    page = ranked_page(ranked.build_groups(rows, standard), rows)
    assert "<details class=\"raw\">" in page and page.count("<table") == 2
    assert SHA_A not in re.sub(r'title="[^"]*"', "", page)  # full hashes only in tooltips
    assert f'title="sha256 {SHA_A}"' in page
    shown = re.sub(r'(title|data-value)="[^"]*"', "", page)  # what the reader sees (sort keys aside)
    assert "19.0%" in shown and "0.19<" not in shown and "1.234567" not in shown and ">1.2<" in shown
    config = re.search(r"<summary>attack config</summary><pre>(.*?)</pre>", page, re.S).group(1)
    assert "\n" in config and "\\n" not in config and json.loads(config.replace("&quot;", '"'))
    assert "http" not in page.replace('lang="en"', "")  # self-contained


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_html_page_in_headless_chromium(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPTS))
    import screenshot_leaderboard as shot

    if shot.chromium() is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium) on PATH")
    rows = cifar_rows() * 1
    page = tmp_path / "board.html"
    page.write_text(ranked_page(ranked.build_groups(rows, standard), rows))
    width, dom = shot.measure(page)
    assert 0 < width <= 1400, width  # no horizontal scrolling at 1,400 px
    assert dom.count("<tr") == 4 + 1 + len(rows) + 1
    png = shot.screenshot(page, tmp_path / "board.png")
    assert shot.is_blank(png) is False


def test_cli_extra_columns_hook(capsys: pytest.CaptureFixture, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    column = ranked.ExtraColumn("attacks", lambda rs: len({r.attack for r in rs}))
    monkeypatch.setattr(cli_leaderboard, "extra_columns", lambda rows: [column])
    code, out, _ = run(capsys, "leaderboard", "--db", db, "--format", "csv")
    assert code == 0 and [r["attacks"] for r in csv.DictReader(io.StringIO(out))] == ["1", "3", "2", "1"]
