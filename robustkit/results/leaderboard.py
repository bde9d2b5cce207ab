"""The results store: one SQLite row per evaluation cell, plus DataFrame exports.

SQLite in WAL mode with a busy timeout, so several evaluation processes can write to the same
file at once: writers wait for each other instead of failing, and every write is one atomic
statement, so racing processes never duplicate or lose a row. A UNIQUE constraint on the
evaluation key (model, checkpoint, data, threat model, attack and its config, seed, defense)
is what makes "already evaluated" a database fact rather than a check-then-write race.
"""

from __future__ import annotations

import html
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from robustkit.errors import DataError, ResultExistsError, UsageError
from robustkit.paths import check_file, make_dir
from robustkit.units import eps_str

SCHEMA_VERSION = 1  # stored in PRAGMA user_version
BUSY_TIMEOUT_MS = 60_000
EXPORT_FORMATS = ("table", "csv", "md", "json", "html")

KEY_FIELDS = (
    "model", "checkpoint_sha256", "dataset", "n_examples", "norm", "eps", "attack",
    "attack_config", "seed", "defense",
)  # fmt: skip
# The same key as stored: eps is compared through its canonical text form.
_KEY_COLUMNS = tuple("eps_key" if f == "eps" else f for f in KEY_FIELDS)

# Where and how a stored number was computed: the same columns in every table of the store.
PROVENANCE_COLUMNS = """\
    seconds REAL,
    robustkit_version TEXT NOT NULL DEFAULT '',
    torch_version TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    timestamp TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL DEFAULT '',
    dataset TEXT NOT NULL,
    n_examples INTEGER NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    eps_key TEXT NOT NULL,
    attack TEXT NOT NULL,
    attack_config TEXT NOT NULL DEFAULT '{{}}',
    seed INTEGER NOT NULL,
    defense TEXT NOT NULL DEFAULT '',
    clean_acc REAL,
    robust_acc REAL,
{PROVENANCE_COLUMNS}    UNIQUE ({", ".join(_KEY_COLUMNS)})
);
CREATE INDEX IF NOT EXISTS results_by_cell ON results (dataset, norm, eps_key);
"""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One evaluation cell: what was evaluated (the key fields) and what came out."""

    model: str
    checkpoint_sha256: str = ""
    dataset: str
    n_examples: int
    norm: str
    eps: float
    attack: str
    attack_config: dict[str, Any] = field(default_factory=dict)
    seed: int
    defense: str = ""
    clean_acc: float
    robust_acc: float
    seconds: float
    robustkit_version: str
    torch_version: str
    device: str
    timestamp: str = field(default_factory=_utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A short human description of the cell, for messages."""
        defense = f" + {self.defense}" if self.defense else ""
        return (
            f"{self.model}{defense} on {self.dataset} (n={self.n_examples}), "
            f"{self.norm} eps={eps_str(self.eps)}, {self.attack}, seed {self.seed}"
        )


_FIELDS = tuple(f.name for f in fields(ResultRow))
_JSON_FIELDS = ("attack_config", "extra")


def default_path() -> Path:
    """The store used when none is given: ``$ROBUSTKIT_DB`` or ``~/.robustkit/leaderboard.db``."""
    return Path(os.environ.get("ROBUSTKIT_DB") or Path.home() / ".robustkit" / "leaderboard.db")


def canonical_json(value: dict[str, Any]) -> str:
    """JSON with sorted keys and no spaces: equal dicts give equal text (numpy scalars allowed)."""

    def scalar(obj: Any) -> Any:
        if hasattr(obj, "item"):
            return obj.item()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=scalar)


def _to_db(row: ResultRow) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in _FIELDS}
    for name in _JSON_FIELDS:
        values[name] = canonical_json(values[name])
    values["eps"] = float(row.eps)
    values["eps_key"] = eps_str(row.eps)
    return values


def _from_db(record: sqlite3.Row) -> ResultRow:
    values = {name: record[name] for name in _FIELDS}
    for name in _JSON_FIELDS:
        values[name] = json.loads(values[name])
    return ResultRow(**values)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent). Retried by hand: SQLite reports "locked" at once,
    without its busy handler, when several processes switch a fresh file at the same time."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # a no-op when the file is already WAL
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Leaderboard:
    """A results store in one SQLite file; safe to share between processes.

    Each operation opens its own short-lived connection, so an instance may be used from
    several threads or passed to forked workers.
    """

    def __init__(self, path: str | Path | None = None, *, create: bool = True) -> None:
        """Open (with ``create``: create) the store at ``path``; reading commands pass
        ``create=False`` and get a one-line error for a file that does not exist."""
        self.path = check_file(path if path is not None else default_path(), "--db")
        if not create:
            if not self.path.exists():
                raise DataError(f"The leaderboard {self.path} does not exist; `robustkit eval` creates it "
                                "(check --db or $ROBUSTKIT_DB).")
            return
        make_dir(self.path.parent, "--db")
        self._init_schema()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """An autocommit connection that waits (busy_timeout) when another writer holds the lock."""
        try:
            with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                yield conn
        except sqlite3.DatabaseError as exc:  # not a database, corrupt, disk full, ...
            raise DataError(f"Cannot use the leaderboard database {self.path}: {exc}.") from exc

    def _init_schema(self) -> None:
        with self.connect() as conn:
            _enable_wal(conn)
            conn.execute("BEGIN IMMEDIATE")  # one process creates the schema, the others wait
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise DataError(
                        f"The leaderboard {self.path} has schema version {version}, newer than "
                        f"this robustkit understands ({SCHEMA_VERSION}); upgrade robustkit."
                    )
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def add(self, row: ResultRow, *, overwrite: bool = False) -> None:
        """Store ``row``; an existing cell with the same key is an error unless ``overwrite``.

        One INSERT (or upsert) statement, so concurrent writers cannot both win.
        """
        values = _to_db(row)
        columns = ", ".join(values)
        placeholders = ", ".join(f":{name}" for name in values)
        sql = f"INSERT INTO results ({columns}) VALUES ({placeholders})"
        if overwrite:
            updates = ", ".join(f"{name} = excluded.{name}" for name in values)
            sql += f" ON CONFLICT ({', '.join(_KEY_COLUMNS)}) DO UPDATE SET {updates}"
        with self.connect() as conn:
            try:
                conn.execute(sql, values)
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" not in str(exc):  # e.g. NOT NULL: a field was None
                    raise
                raise ResultExistsError(
                    f"This evaluation is already in the leaderboard ({row.describe()}); "
                    "pass --overwrite to replace it."
                ) from None

    def _key_where(self, row: ResultRow) -> tuple[str, list[Any]]:
        values = _to_db(row)
        return " AND ".join(f"{c} = ?" for c in _KEY_COLUMNS), [values[c] for c in _KEY_COLUMNS]

    def get(self, row: ResultRow) -> ResultRow | None:
        """The stored cell with the same key as ``row`` (its results may differ), or None."""
        where, params = self._key_where(row)
        with self.connect() as conn:
            record = conn.execute(f"SELECT * FROM results WHERE {where}", params).fetchone()
        return _from_db(record) if record is not None else None

    def exists(self, row: ResultRow) -> bool:
        """Whether a cell with the same key as ``row`` is stored."""
        return self.get(row) is not None

    def delete(self, row: ResultRow) -> bool:
        """Remove the cell with the same key as ``row``; returns whether one was removed."""
        where, params = self._key_where(row)
        with self.connect() as conn:
            return conn.execute(f"DELETE FROM results WHERE {where}", params).rowcount > 0

    def rows(self, **filters: Any) -> list[ResultRow]:
        """Stored cells whose fields equal the filters (a list/tuple/set value means "any of").

        ``None`` values are ignored, so CLI options can be passed through unchanged. Sorted by
        dataset, norm, eps, then robust accuracy (best first).
        """
        clauses, params = [], []
        for name, wanted in filters.items():
            if wanted is None:
                continue
            if name not in _FIELDS:
                raise UsageError(
                    f"Cannot filter the leaderboard by {name!r}; fields are: {', '.join(_FIELDS)}."
                )
            options = list(wanted) if isinstance(wanted, list | tuple | set) else [wanted]
            column = "eps_key" if name == "eps" else name
            if name == "eps":
                options = [eps_str(v) for v in options]
            elif name in _JSON_FIELDS:
                options = [canonical_json(v) for v in options]
            clauses.append(f"{column} IN ({', '.join('?' * len(options))})")
            params += options
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "dataset, norm, eps, robust_acc DESC, model, attack, seed"
        with self.connect() as conn:
            records = conn.execute(f"SELECT * FROM results {where} ORDER BY {order}", params)
            return [_from_db(r) for r in records.fetchall()]

    def frame(
        self,
        dataset: str | None = None,
        norm: str | None = None,
        model: str | None = None,
        attack: str | None = None,
    ) -> pd.DataFrame:
        """The (filtered) leaderboard as a DataFrame: one row per cell, dicts as JSON text."""
        records = []
        for row in self.rows(dataset=dataset, norm=norm, model=model, attack=attack):
            record = asdict(row)
            for name in _JSON_FIELDS:
                record[name] = canonical_json(record[name])
            record["eps_str"] = eps_str(row.eps)
            records.append(record)
        return pd.DataFrame(records, columns=list(FRAME_COLUMNS))


FRAME_COLUMNS = (
    "model", "defense", "dataset", "norm", "eps_str", "eps", "attack", "clean_acc",
    "robust_acc", "n_examples", "seed", "attack_config", "checkpoint_sha256", "seconds",
    "device", "robustkit_version", "torch_version", "timestamp", "extra",
)  # fmt: skip


def _markdown_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (header, separator, one line per row; no tabulate)."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = [
        "| " + " | ".join(_markdown_cell(c) for c in df.columns) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    for values in df.itertuples(index=False):
        lines.append("| " + " | ".join(_markdown_cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _json_value(obj: Any) -> Any:
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj.item() if hasattr(obj, "item") else str(obj)


def to_json_records(df: pd.DataFrame) -> str:
    """A JSON list of row objects, missing values as null (pandas to_json would escape "/");
    ``attack_config`` and ``extra`` nested as objects, as ``robustkit eval --json`` has them."""
    records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
    for record in records:
        for name in _JSON_FIELDS:
            if isinstance(record.get(name), str):
                record[name] = json.loads(record[name])
    return json.dumps(records, indent=2, default=_json_value) + "\n"


_HTML_SCRIPT = """
const table = document.getElementById("leaderboard");
const body = table.tBodies[0];
const heads = Array.from(table.tHead.rows[0].cells);
const col = name => heads.findIndex(th => th.textContent.trim() === name);
const num = text => (text.trim() === "" || isNaN(text) ? null : Number(text));
heads.forEach((th, i) => th.addEventListener("click", () => {
  const asc = th.dataset.order !== "asc";
  heads.forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[i].textContent, y = b.cells[i].textContent;
    const nx = num(x), ny = num(y);
    const c = nx !== null && ny !== null ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}));
function applyFilter() {
  const text = document.getElementById("filter").value.toLowerCase();
  const wanted = Array.from(document.querySelectorAll("select[data-column]"))
    .map(s => [col(s.dataset.column), s.value]);
  for (const r of body.rows) {
    const ok = r.textContent.toLowerCase().includes(text)
      && wanted.every(([i, v]) => i < 0 || v === "" || r.cells[i].textContent === v);
    r.style.display = ok ? "" : "none";
  }
}
document.querySelectorAll("#controls input, #controls select")
  .forEach(e => e.addEventListener("input", applyFilter));
"""

_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " \\25B2"; }
th[data-order="desc"]::after { content: " \\25BC"; }
#controls { margin-bottom: 1em; }
"""


def _details(label: str, text: str) -> str:
    """A JSON cell as a collapsed <details> block holding the pretty-printed JSON."""
    try:
        pretty = json.dumps(json.loads(text), indent=1, sort_keys=True)
    except (TypeError, ValueError):
        pretty = str(text)
    return f"<details><summary>{label.replace('attack_', '')}</summary><pre>{html.escape(pretty)}</pre></details>"


def to_html_page(df: pd.DataFrame, title: str = "robustkit leaderboard") -> str:
    """A self-contained HTML page: the table, sortable by clicking headers, with filters."""
    controls = ['<input id="filter" type="search" placeholder="filter rows">']
    for column in ("dataset", "norm"):
        if column in df.columns:
            options = "".join(
                f'<option value="{html.escape(str(v))}">{html.escape(str(v))}</option>'
                for v in sorted(df[column].astype(str).unique())
            )
            controls.append(
                f'<label>{column} <select data-column="{column}">'
                f'<option value="">all</option>{options}</select></label>'
            )
    shown = df.copy()
    for column in shown.columns:
        if column in ("attack_config", "extra"):  # each row links its config: an expandable block
            shown[column] = shown[column].map(lambda text, c=column: _details(c, text))
        elif shown[column].dtype == object:
            shown[column] = shown[column].map(lambda v: html.escape(str(v)))
    table = shown.to_html(index=False, table_id="leaderboard", border=0, na_rep="", escape=False)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<div id="controls">{" ".join(controls)}</div>\n'
        f"{table}\n<script>{_HTML_SCRIPT}</script>\n</body>\n</html>\n"
    )


def export(df: pd.DataFrame, fmt: str, output: str | Path | None = None) -> str:
    """Render ``df`` as table, csv, md, json or html; write it to ``output`` when given."""
    renderers = {
        "table": lambda: df.to_string(index=False) + "\n",
        "csv": lambda: df.to_csv(index=False),
        "md": lambda: to_markdown(df),
        "json": lambda: to_json_records(df),
        "html": lambda: to_html_page(df),
    }
    if fmt not in renderers:
        raise UsageError(
            f"Unknown export format {fmt!r}; accepted formats: {', '.join(EXPORT_FORMATS)}."
        )
    text = renderers[fmt]()
    if output is not None:
        output = check_file(output, "--output")
        make_dir(output.parent, "--output")
        output.write_text(text, encoding="utf-8")
    return text
