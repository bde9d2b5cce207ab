"""The results store: keys, overwrite, filters, exports, WAL and concurrent writers."""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

import robustkit.results.leaderboard
from robustkit.errors import DataError, ResultExistsError, UsageError
from robustkit.results.leaderboard import EXPORT_FORMATS, Leaderboard, ResultRow, export
from robustkit.units import eps_str


def make_row(**changes) -> ResultRow:
    base = dict(
        model="preact_resnet18", dataset="cifar10", n_examples=100, norm="linf", eps=8 / 255,
        attack="apgd-ce", attack_config={"steps": 10, "restarts": 1}, seed=0,
        clean_acc=0.9, robust_acc=0.5, seconds=1.5, robustkit_version="0.1.0",
        torch_version="2.3.0", device="cpu",
    )  # fmt: skip
    return ResultRow(**(base | changes))


@pytest.fixture
def board(tmp_path: Path) -> Leaderboard:
    return Leaderboard(tmp_path / "lb.db")


def test_add_exists_get(board: Leaderboard) -> None:
    row = make_row(extra={"per_attack": {"apgd-ce": 0.5}})
    assert not board.exists(row)
    assert board.get(row) is None
    board.add(row)
    assert board.exists(row)
    assert board.get(row) == row
    assert not board.exists(make_row(seed=1))


def test_duplicate_raises_and_overwrite_replaces(board: Leaderboard) -> None:
    board.add(make_row())
    # Results and metadata are not part of the key.
    with pytest.raises(ResultExistsError, match="already in the leaderboard.*--overwrite"):
        board.add(make_row(robust_acc=0.4, seconds=9.0))
    board.add(make_row(robust_acc=0.4, extra={"note": "rerun"}), overwrite=True)
    (stored,) = board.rows()
    assert stored.robust_acc == 0.4 and stored.extra == {"note": "rerun"}
    board.add(make_row(seed=1), overwrite=True)  # overwrite of a new key just adds it
    assert len(board.rows()) == 2
    assert board.delete(make_row(seed=1)) and not board.delete(make_row(seed=1))


def as_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("linf", 128 / 255), ("l2", 0.3)])
def test_eps_float_noise_and_config_order_hit_same_key(
    board: Leaderboard, norm: str, eps: float
) -> None:
    noisy = as_float32(eps)  # e.g. eps that went through a tensor
    assert noisy != eps
    board.add(make_row(norm=norm, eps=eps, attack_config={"steps": 10, "restarts": 1}))
    twin = make_row(norm=norm, eps=noisy, attack_config={"restarts": 1, "steps": 10})
    assert board.exists(twin)
    with pytest.raises(ResultExistsError):
        board.add(twin)
    assert len(board.rows(eps=noisy)) == 1
    board.add(make_row(norm=norm, eps=eps * 1.01))
    assert len(board.rows()) == 2


def test_filters(board: Leaderboard) -> None:
    board.add(make_row())
    board.add(make_row(model="wrn28", robust_acc=0.6))
    board.add(make_row(norm="l2", eps=0.5))
    board.add(make_row(dataset="mnist", eps=0.3, attack="pgd"))
    assert len(board.rows()) == 4
    assert [r.model for r in board.rows(norm="linf", dataset="cifar10")] == [
        "wrn28",
        "preact_resnet18",
    ]  # best robust accuracy first
    assert len(board.rows(model=["wrn28", "preact_resnet18"], norm="linf")) == 3
    assert len(board.rows(attack="pgd", dataset=None)) == 1
    assert len(board.frame(dataset="cifar10", norm="l2")) == 1
    with pytest.raises(UsageError, match="Cannot filter"):
        board.rows(colour="red")


def test_frame_columns_and_eps_str(board: Leaderboard) -> None:
    board.add(make_row())
    board.add(make_row(norm="l2", eps=0.5))
    df = board.frame()
    assert list(df.columns[:6]) == ["model", "defense", "dataset", "norm", "eps_str", "eps"]
    assert sorted(df["eps_str"]) == ["0.5", "8/255"]
    assert json.loads(df["attack_config"][0]) == {"restarts": 1, "steps": 10}
    assert [eps_str(e) for e in (4 / 255, 0.031, 1.0, 0.0, 3 * (1 / 255))] == [
        "4/255",
        "0.031",
        "1",
        "0",
        "3/255",
    ]
    assert board.frame(model="nobody").empty


def filled_frame(board: Leaderboard) -> pd.DataFrame:
    for i, norm in enumerate(["linf", "l2", "linf"]):
        board.add(make_row(model=f"model_{i}", norm=norm, eps=8 / 255 if norm == "linf" else 0.5))
    return board.frame()


def test_exports_contain_all_rows(board: Leaderboard, tmp_path: Path) -> None:
    df = filled_frame(board)
    n = len(df)
    back = pd.read_csv(io.StringIO(export(df, "csv")), keep_default_na=False)
    assert back["model"].tolist() == df["model"].tolist()
    assert back["eps"].tolist() == pytest.approx(df["eps"].tolist())
    records = json.loads(export(df, "json"))
    assert [r["model"] for r in records] == df["model"].tolist()
    assert records[0]["eps_str"] in ("8/255", "0.5")
    md = export(df, "md")
    assert len(md.splitlines()) == n + 2
    assert all(line.startswith("|") and line.endswith("|") for line in md.splitlines())
    page = export(df, "html", output=tmp_path / "out" / "lb.html")
    assert (tmp_path / "out" / "lb.html").read_text(encoding="utf-8") == page
    assert "<script>" in page and page.count("<table") == 1 and "http" not in page
    assert all(f">{m}<" in page for m in df["model"])
    table = export(df, "table")
    assert all(m in table for m in df["model"])


def test_unknown_export_format(board: Leaderboard) -> None:
    with pytest.raises(UsageError, match="accepted formats: " + ", ".join(EXPORT_FORMATS)):
        export(board.frame(), "xlsx")


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "lb.db"
    Leaderboard(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(DataError, match="newer"):
        Leaderboard(path)


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTKIT_DB", str(tmp_path / "env" / "lb.db"))
    assert Leaderboard().path == tmp_path / "env" / "lb.db"
    assert (tmp_path / "env" / "lb.db").exists()


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="Cannot use the leaderboard"):
        Leaderboard(tmp_path / "junk.db")


PACKAGE_DIR = str(Path(robustkit.results.leaderboard.__file__).parent)

# A worker process: waits for the start file, then adds rows (seeds ``first .. first+count-1``)
# and prints how many it added and how many already existed.
WORKER = """
import json, sys, time, types
from pathlib import Path
# Skip robustkit/__init__ (it imports torch, seconds per process); the store does not need it.
sys.modules["robustkit"] = types.ModuleType("robustkit")
sys.modules["robustkit"].__path__ = [PACKAGE_DIR]
from robustkit.errors import ResultExistsError
from robustkit.results.leaderboard import Leaderboard, ResultRow
db, start, ready, first, count = sys.argv[1:]
Path(ready).touch()
while not Path(start).exists():
    time.sleep(0.005)
board = Leaderboard(db)  # racing on schema creation too
added = existed = 0
for seed in range(int(first), int(first) + int(count)):
    row = ResultRow(model="m", dataset="d", n_examples=10, norm="linf", eps=8 / 255,
                    attack="pgd", seed=seed, clean_acc=1.0, robust_acc=0.5, seconds=0.1,
                    robustkit_version="0", torch_version="0", device="cpu")
    try:
        board.add(row)
        added += 1
    except ResultExistsError:
        existed += 1
print(json.dumps({"added": added, "existed": existed}))
"""


def run_together(tmp_path: Path, db: Path, jobs: list[tuple[int, int]]) -> list[dict]:
    """Start one worker per (first seed, count) job, release them at once, collect results."""
    start = tmp_path / "start"
    procs, ready = [], []
    for i, (first, count) in enumerate(jobs):
        ready.append(tmp_path / f"ready{i}")
        args = [str(db), str(start), str(ready[-1]), str(first), str(count)]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER.replace("PACKAGE_DIR", repr(PACKAGE_DIR)), *args],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    start.touch()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    return results


def test_concurrent_writers_distinct_rows(tmp_path: Path) -> None:
    db = tmp_path / "lb.db"
    results = run_together(tmp_path, db, [(0, 50), (50, 50)])
    assert [r["added"] for r in results] == [50, 50]
    seeds = [r.seed for r in Leaderboard(db).rows()]
    assert len(seeds) == 100 and sorted(seeds) == list(range(100))


def test_concurrent_writers_same_keys(tmp_path: Path) -> None:
    db = tmp_path / "lb.db"
    results = run_together(tmp_path, db, [(0, 10), (0, 10)])
    assert sum(r["added"] for r in results) == 10
    assert sum(r["existed"] for r in results) == 10
    assert sorted(r.seed for r in Leaderboard(db).rows()) == list(range(10))


def test_row_is_frozen() -> None:
    with pytest.raises(AttributeError):
        make_row().model = "x"  # type: ignore[misc]
    assert replace(make_row(), seed=3).seed == 3
