"""The package layout keeps its promise: imports go one way. No module of robustkit (its core,
evaluation, results, training, cli, and the plug-in folders attacks/ and defenses/) takes part in
an import cycle, counting the imports inside functions too (they only delay a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"robustkit": ROOT / "robustkit", "robustkit.attacks": ROOT / "attacks",
            "robustkit.defenses": ROOT / "defenses"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.is_relative_to(ROOT / "robustkit") and path.parent.is_symlink():
                continue  # a worktree's link to attacks/ or defenses/
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the robustkit modules it imports anywhere in its body (TYPE_CHECKING aside)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
        skip = {id(n) for block in guarded for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 60 and graph["robustkit.cli.main"]  # the walk found the tree
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_none_of_the_layers_above_it() -> None:
    """threat, attack, registry, errors, data, ... (``__main__`` is the command line's entry point)."""
    graph = import_graph()
    core = [m for m in graph if m.count(".") == 1 and not m.startswith(("robustkit.attacks", "robustkit.defenses"))
            and m.split(".")[1] not in ("evaluation", "results", "training", "cli", "models", "__main__")]
    above = ("robustkit.evaluation", "robustkit.results", "robustkit.training", "robustkit.cli")
    assert "robustkit.attack" in core and "robustkit.threat" in core
    assert {m: sorted(t for t in graph[m] if t.startswith(above)) for m in core} == {m: [] for m in core}


def test_the_command_line_starts_without_torch() -> None:
    """`robustkit --help` and option parsing stay fast: the command modules load torch only when a
    command runs (issue: --help took 4 s)."""
    code = "import sys, robustkit, robustkit.cli; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["eval", "--help"], ["list", "models"],
                                  ["list", "attacks"], ["list", "defenses"], ["list", "datasets"]])
def test_help_and_list_run_without_torch(args: list[str]) -> None:
    """`robustkit --help` and `robustkit list ...` answer in well under a second: torch (seconds to
    import) is not loaded for them (`list` reads the registries' index, robustkit/_catalog_index.py)."""
    code = ("import sys\nfrom robustkit.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "no torch", proc.stderr
    assert proc.stdout.strip()


def test_the_catalog_index_matches_the_registries() -> None:
    """The names `robustkit list` shows without importing torch are the registries' own; after adding a
    registered name, run `python -m robustkit.catalog` to rewrite robustkit/_catalog_index.py."""
    path = Path(__file__).resolve().parents[1] / "robustkit" / "_catalog_index.py"
    # a fresh interpreter: earlier tests of the session register models of their own (resnet20+in1+dual-bn)
    proc = subprocess.run([sys.executable, "-c", "import sys; from robustkit.catalog import index_source; "
                           "sys.stdout.write(index_source())"], capture_output=True, text=True, check=True)
    assert path.read_text() == proc.stdout, "stale index: run `python -m robustkit.catalog`"


def imports_without_reason(source: str) -> list[int]:
    """The lines of imports inside functions with no comment saying why they are there: on the same
    line, on the line above, or above the first of a run of consecutive import lines."""
    lines = source.splitlines()
    found = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            first = node.lineno
            while first > 1 and lines[first - 2].strip().startswith(("import ", "from ")):
                first -= 1
            if "#" not in lines[node.lineno - 1] and not (first > 1 and lines[first - 2].strip().startswith("#")):
                found.add(node.lineno)
    return sorted(found)


def test_in_function_imports_say_why() -> None:
    """Imports go at the module top; one inside a function (an optional extra, torch or pandas kept out
    of the command line's start, a heavy module only one path needs, a cycle) says why in a comment."""
    missing = {name: lines for name, path in modules().items() if (lines := imports_without_reason(path.read_text()))}
    assert missing == {}


def test_the_reason_check_finds_an_uncommented_import() -> None:
    source = ("def f():\n    # lazy: heavy\n    import a\n    from b import c\n\n"
              "def g():\n    x = 1\n    import d\n    import e  # optional extra: e\n")
    assert imports_without_reason(source) == [8]
