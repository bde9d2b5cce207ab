"""The leaderboard as one self-contained HTML page: the ranked view (one table per data set and
norm, sortable), and the raw rows one click away in a ``<details>`` section. Percentages, short
hashes (the full sha256 in a tooltip), seconds rounded, each row's config as formatted JSON.
No network: the page holds its own style and script. Fits 1,400 px at default zoom."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

from robustkit.results.labels import attack_labels, checkpoint_label, dataset_of_label, is_random_weights
from robustkit.results.leaderboard import ResultRow
from robustkit.results.ranked import Group, extra_text, percent
from robustkit.units import eps_str

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 1.5em; color: #1d1d1f;
       max-width: 1340px; }
h1 { font-size: 1.5em; margin: 0 0 0.2em; }
h2 { font-size: 1.1em; margin: 1.6em 0 0.4em; }
p.note { color: #555; font-size: 0.9em; margin: 0.2em 0 0.8em; max-width: 75em; }
table { border-collapse: collapse; font-size: 0.9em; margin-bottom: 0.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; cursor: pointer; user-select: none; white-space: nowrap; border-bottom: 2px solid #bbb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.rank { font-weight: 600; color: #666; }
td .by { display: block; color: #888; font-size: 0.8em; white-space: nowrap; }
th.ranking, td.ranking { background: #eef5ff; font-weight: 600; }
td.ranking .by { font-weight: normal; }
tr.random td { color: #b45309; }
.tag { font-size: 0.75em; border: 1px solid #d97706; color: #b45309; border-radius: 3px; padding: 0 0.3em; }
code, .hash { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.9em; }
th[data-order="asc"]::after { content: " \\25B2"; }
th[data-order="desc"]::after { content: " \\25BC"; }
details.raw { margin-top: 2em; }
details.raw > summary { font-size: 1.1em; font-weight: 600; cursor: pointer; }
td details summary { cursor: pointer; color: #2563eb; }
table.raw td { white-space: nowrap; }
h3 { font-size: 1em; margin: 1.2em 0 0.3em; }
td pre { margin: 0.3em 0; font-size: 0.85em; max-width: 30em; white-space: pre; overflow-x: auto; }
#controls { margin: 0.8em 0; }
"""

# Clicking a header sorts its table (numbers by data-value); the filter box and the selects hide rows.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(table => {
  const body = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, i) => th.addEventListener("click", () => {
    const asc = th.dataset.order !== "asc";
    heads.forEach(h => delete h.dataset.order);
    th.dataset.order = asc ? "asc" : "desc";
    const key = r => {
      const c = r.cells[i];
      const v = c.dataset.value;
      return v !== undefined && v !== "" ? Number(v) : c.textContent.trim();
    };
    Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    }).forEach(r => body.appendChild(r));
  }));
});
function applyFilter() {
  const text = document.getElementById("filter").value.toLowerCase();
  const wanted = Array.from(document.querySelectorAll("select[data-attr]")).map(s => [s.dataset.attr, s.value]);
  document.querySelectorAll("[data-dataset]").forEach(e => {
    e.style.display = wanted.every(([a, v]) => v === "" || e.dataset[a] === v) ? "" : "none";
  });
  document.querySelectorAll("tbody tr").forEach(r => {
    r.style.display = r.textContent.toLowerCase().includes(text) ? "" : "none";
  });
}
document.querySelectorAll("#controls input, #controls select").forEach(e => e.addEventListener("input", applyFilter));
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _td(text: str, *, cls: str = "", value: float | None = None, title: str = "", raw: bool = False) -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' data-value="{value!r}"' if value is not None else "")
    attrs += f' title="{_e(title)}"' if title else ""
    return f"<td{attrs}>{text if raw else _e(text)}</td>"


def _short_dataset(name: str) -> str:
    """``npz:../shared/data/cifar10_test1000.npz`` -> ``npz:cifar10_test1000.npz`` (the full name in a tooltip)."""
    base = dataset_of_label(name)
    return (f"npz:{PurePath(base[4:]).name}" if base.startswith("npz:") else base) + name[len(base):]


def _checkpoint_cell(label: str, sha: str, random: bool) -> str:
    title = f"sha256 {sha}" if sha else ("no weights file: a randomly initialized network" if random else "")
    text = f'<span class="tag">{_e(label)}</span>' if random else f'<span class="hash">{_e(label)}</span>'
    return _td(text, title=title, raw=True)


def _group_table(group: Group) -> str:
    heads = ['<th class="num">#</th>', "<th>model</th>", "<th>defense</th>", "<th>checkpoint</th>",
             '<th class="num">n</th>', '<th class="num">clean</th>']
    if group.has_autoattack:
        heads.append(f'<th class="num" title="AutoAttack\'s robust accuracy at {_e(group.ranking_eps)}">'
                     f"AutoAttack {_e(group.ranking_eps)}</th>")
    for eps in group.eps:
        ranking = eps == group.ranking_eps
        heads.append(f'<th class="num{" ranking" if ranking else ""}" title="worst-case robust accuracy at eps '
                     f'{_e(eps)}{" (ranking radius)" if ranking else ""}">{_e(eps)}</th>')
    heads += [f'<th class="num">{_e(c.name)}</th>' for c in group.extra_columns]
    body = []
    for e in group.entries:
        cells = [_td(str(e.rank) if e.rank else "-", cls="num rank", value=e.rank or 1e9), _td(e.model),
                 _td(e.defense or "-"), _checkpoint_cell(e.checkpoint, e.checkpoint_sha256, e.random_weights),
                 _td(str(e.n_examples), cls="num", value=e.n_examples),
                 _td(percent(e.clean_acc), cls="num", value=e.clean_acc)]
        if group.has_autoattack:
            cells.append(_td(percent(e.autoattack), cls="num", value=e.autoattack))
        for eps in group.eps:
            cell = e.cells.get(eps)
            cls = "num ranking" if eps == group.ranking_eps else "num"
            if cell is None:
                cells.append(_td("", cls=cls))
            else:
                text = f'{_e(percent(cell.robust_acc))}<span class="by">{_e(cell.attack)}</span>'
                cells.append(_td(text, cls=cls, value=cell.robust_acc, raw=True, title=f"by {cell.attack}"))
        for c in group.extra_columns:
            value = e.extras.get(c.name)
            cells.append(_td(extra_text(c, value), cls="num", value=value if isinstance(value, float) else None))
        row_cls = ' class="random"' if e.random_weights else ""
        body.append(f"<tr{row_cls}>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable ranked"><thead><tr>{"".join(heads)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _json_details(label: str, value: Any) -> str:
    pretty = json.dumps(value, indent=2, sort_keys=True, default=str)
    return f"<details><summary>{_e(label)}</summary><pre>{_e(pretty)}</pre></details>"


def raw_tables(rows: Sequence[ResultRow], order: Sequence[tuple[str, str]] = ()) -> str:
    """Every stored row, one table per data set and norm (in ``order`` first, e.g. the ranked
    view's), rows as stored: by eps, best first."""
    labels = attack_labels(rows)
    groups: dict[tuple[str, str], list[ResultRow]] = {key: [] for key in order}
    for r in rows:
        groups.setdefault((r.dataset, r.norm), []).append(r)
    return "\n".join(
        f'<section data-dataset="{_e(dataset)}" data-norm="{_e(norm)}"><h3 title="{_e(dataset)}">'
        f"{_e(_short_dataset(dataset))} · {_e(norm)} · {len(group)} rows</h3>{raw_table(group, labels)}</section>"
        for (dataset, norm), group in groups.items() if group)


def raw_table(rows: Sequence[ResultRow], labels: dict[int, str] | None = None) -> str:
    """Stored rows: who (model, defense, checkpoint), the radius, the attack's label, accuracies
    in %, points, seed, seconds, when (device and versions in the tooltip), and the config and
    extra as formatted JSON."""
    labels = labels if labels is not None else attack_labels(rows)
    heads = ["model", "defense", "checkpoint", "eps", "attack", "clean", "robust", "n", "seed", "seconds", "run",
             "config"]
    numeric = {"eps", "clean", "robust", "n", "seed", "seconds"}
    head = "".join(f'<th class="num">{h}</th>' if h in numeric else f"<th>{h}</th>" for h in heads)
    body = []
    for r in rows:
        random = is_random_weights(r)
        when = f"{r.timestamp} · {r.device} · robustkit {r.robustkit_version} · torch {r.torch_version}"
        cells = [_td(r.model), _td(r.defense or "-"),
                 _checkpoint_cell(checkpoint_label(r), r.checkpoint_sha256, random),
                 _td(eps_str(r.eps), cls="num", value=float(r.eps)), _td(labels[id(r)]),
                 _td(percent(r.clean_acc), cls="num", value=r.clean_acc),
                 _td(percent(r.robust_acc), cls="num", value=r.robust_acc),
                 _td(str(r.n_examples), cls="num", value=r.n_examples), _td(str(r.seed), cls="num", value=r.seed),
                 _td(f"{r.seconds:.1f}", cls="num", value=r.seconds),
                 _td(r.timestamp[5:16].replace("T", " "), title=when),
                 _td(_json_details("attack config", r.attack_config) + _json_details("extra", r.extra), raw=True,
                     cls="json")]
        row_cls = ' class="random"' if random else ""
        body.append(f"<tr{row_cls}>" + "".join(cells) + "</tr>")
    return f'<table class="sortable raw"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _controls(rows: Sequence[ResultRow]) -> str:
    parts = ['<input id="filter" type="search" placeholder="filter rows">']
    for attr, values in (("dataset", {r.dataset for r in rows}), ("norm", {r.norm for r in rows})):
        if len(values) > 1:
            options = "".join(f'<option value="{_e(v)}">{_e(_short_dataset(v))}</option>' for v in sorted(values))
            parts.append(f'<label>{attr} <select data-attr="{attr}"><option value="">all</option>{options}</select>'
                         "</label>")
    return f'<div id="controls">{" ".join(parts)}</div>'


def _page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{_SCRIPT}</script>\n</body>\n</html>\n")


NOTE = ("Each radius column holds the worst-case robust accuracy: the lowest any stored attack reached at that "
        "radius, with the attack that gave it below (<i>worst-case</i>: the point-wise worst case of a run's "
        "attacks, lower than each of them). RobustBench ranks by AutoAttack; robustkit ranks by this worst case "
        "(never above AutoAttack's, shown in its own column when it ran). Highlighted: the ranking radius. "
        "Click a header to sort.")


def ranked_page(groups: Sequence[Group], rows: Sequence[ResultRow], title: str = "robustkit leaderboard") -> str:
    """The ranked view, one table per data set and norm, with every raw row in a collapsed section."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models = sum(len(g.entries) for g in groups)
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="note">{models} model entries, {len(rows)} rows · {stamp}. {NOTE}</p>', _controls(rows)]
    for g in groups:
        heading = g.title.replace(g.dataset, _short_dataset(g.dataset), 1)
        parts.append(f'<section data-dataset="{_e(g.dataset)}" data-norm="{_e(g.norm)}">'
                     f'<h2 title="{_e(g.dataset)}">{_e(heading)}</h2>{_group_table(g)}</section>')
    parts.append(f'<details class="raw"><summary>All {len(rows)} rows (every attack and configuration)</summary>'
                 f"{raw_tables(rows, [(g.dataset, g.norm) for g in groups])}</details>")
    return _page(title, "\n".join(parts))


def raw_page(rows: Sequence[ResultRow], title: str = "robustkit leaderboard: all rows") -> str:
    """``--rows --format html``: the raw rows only, sortable and filterable."""
    return _page(title, f"<h1>{_e(title)}</h1>\n{_controls(rows)}\n{raw_tables(rows)}")
