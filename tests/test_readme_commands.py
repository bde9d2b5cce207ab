"""The README's shell examples run as written, with small sizes (issue 20, item 13).

Every ```bash block of README.md runs, in README order, as one ``bash -e`` script in a scratch
folder shared by all blocks (a reader runs them one after another: ``eval.yaml`` made by one
block is read by the next), with its own leaderboard (``ROBUSTKIT_DB``). Not run:

* the two install blocks marked ``<!-- ci:N -->`` (``.ci/run`` runs those);
* a command whose text carries ``# not run: REASON`` (it needs what only the reader has: their
  own checkpoint, a download, several machines); the reason is required.

``robustkit`` is this checkout's CLI (``python -m robustkit``) behind :func:`shrink`, which keeps
every option as written except the sizes: ``--n-examples`` at most 16 (and 16 where ``eval`` or
``train`` gives none), ``--epochs`` 1 (also when not given), ``--eps-warmup-epochs`` 0,
``--val-size`` at most 16, ``n_queries=`` at most 50. ``robustkit CMD ...`` (literally three dots)
repeats the options of the block's last ``robustkit CMD`` written out in full, then adds its own
(the README's shorthand for "the command above, but"). ``torchrun ... -m robustkit`` runs the
module directly (its ``--config`` file was written small). ``../shared/data`` is the shared data
folder; blocks that use it, or the ``eval.yaml`` made from it, skip without it. Blocks that take
longer than about half a minute on two cores are ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL_N = 16
SMALL_QUERIES = 50
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)?$")
#: blocks with a command starting so take longer than ~30 s on two cores: `slow`
SLOW = ("robustkit eval --model resnet4b", "robustkit eval --model resnet20,resnet4b",
        "robustkit train pgd-at --model digits-cnn", "robustkit train rift", "for s in 1 2 3",
        "robustkit train distill", "torchrun", "robustkit train pgd-at --model robust-resnet-cifar",
        "robustkit train prompt", "robustkit train fast-advprop", "robustkit poison")


def shrink(argv: list[str]) -> list[str]:
    """``robustkit`` arguments with the sizes made small (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        step = 1 if eq else 2
        if name == "--n-examples":
            out += [name, str(min(int(value), SMALL_N))]
        elif name == "--val-size":
            out += [name, str(min(int(value), SMALL_N))]
        elif name == "--epochs":
            out += [name, "1"]
        elif name == "--eps-warmup-epochs":
            out += [name, "0"]
        elif name == "--attack-kwargs":
            out += [name, re.sub(r"n_queries=(\d+)", lambda m: f"n_queries={min(int(m[1]), SMALL_QUERIES)}", value)]
        else:
            out.append(arg)
            step = 1
        i += step
    command = [a for a in argv if not a.startswith("-")][:1]
    if command in (["eval"], ["train"]) and "--n-examples" not in out and "--dump-config" not in out:
        out += ["--n-examples", str(SMALL_N)]
    if command == ["train"] and "--epochs" not in out and "--dump-config" not in out:
        out += ["--epochs", "1"]
    return out


def _blocks() -> list[tuple[int, str]]:
    """(line, text) of every bash block that is not a ``<!-- ci:N -->`` install block."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"(<!--\s*ci:\d+\s*-->\n)?```bash\n(.*?)```", text, flags=re.S):
        if not m.group(1):
            found.append((text[: m.start()].count("\n") + 1, m.group(2)))
    return found


def _commands(block: str) -> list[str]:
    """The block's logical lines (backslash continuations joined), comment-only lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def script(block: str) -> tuple[str, list[str]]:
    """The block as run (``...`` expanded, ``# not run`` commands left out) and the reasons of
    those left out."""
    lines, skipped, full = [], [], {}
    for line in _commands(block):
        m = NOT_RUN.search(line)
        if m:
            assert m.group(1), f"`# not run:` needs a reason: {line}"
            skipped.append(m.group(1).strip())
            continue
        words = line.split()
        if len(words) >= 3 and words[0] == "robustkit" and words[2] == "...":
            assert words[1] in full, f"`robustkit {words[1]} ...` has no full command above it: {line}"
            line = f"robustkit {words[1]} {full[words[1]]} " + line.split("...", 1)[1].lstrip()
        elif len(words) >= 2 and words[0] == "robustkit" and not words[1].startswith("-"):
            code = line.split("#", 1)[0]
            args = code.split(None, 2)[2] if len(code.split(None, 2)) > 2 else ""
            full[words[1]] = args.split(" >", 1)[0].strip()
        lines.append(line)
    return "\n".join(lines) + "\n", skipped


BLOCKS = _blocks()


def test_the_readme_has_shell_examples_and_few_unrun_commands() -> None:
    assert len(BLOCKS) >= 10
    reasons = [r for _, block in BLOCKS for r in script(block)[1]]
    assert 0 < len(reasons) <= 12, reasons


def test_shrink_keeps_options_and_makes_sizes_small() -> None:
    assert shrink(["eval", "--model", "m", "--n-examples", "200", "--attack-kwargs", "square.n_queries=1000"]) == [
        "eval", "--model", "m", "--n-examples", "16", "--attack-kwargs", "square.n_queries=50"]
    assert shrink(["train", "pgd-at", "--epochs=30", "--eps-warmup-epochs", "2"]) == [
        "train", "pgd-at", "--epochs", "1", "--eps-warmup-epochs", "0", "--n-examples", "16"]
    assert shrink(["list", "models"]) == ["list", "models"]
    run, skipped = script("robustkit eval --model a \\\n  --eps 1 > x\nrobustkit eval ... --attack b\n"
                          "robustkit eval --model w.pt   # not run: your own checkpoint\n")
    assert run.splitlines() == ["robustkit eval --model a --eps 1 > x", "robustkit eval --model a --eps 1 --attack b"]
    assert skipped == ["your own checkpoint"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A scratch checkout-like folder (``../shared`` next to it), the ``robustkit`` wrapper first
    on PATH, and the environment the blocks run in."""
    base = tmp_path_factory.mktemp("readme")
    cwd = base / "repo"
    cwd.mkdir()
    if SHARED_DATA.is_dir():
        (base / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    bin_dir = base / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "robustkit"
    wrapper.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from test_readme_commands import shrink\nfrom robustkit.cli.main import main\n"
        "main(shrink(sys.argv[1:]))\n"
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "ROBUSTKIT_DB": str(base / "lb.db"), "OMP_NUM_THREADS": "1",
           "COLUMNS": "120", "MPLBACKEND": "Agg"}
    env.pop("RANK", None)
    return {"cwd": cwd, "env": env}


def _param(line: int, block: str) -> object:
    slow = any(c.startswith(prefix) for c in _commands(block) for prefix in SLOW)
    return pytest.param(line, block, id=f"line{line}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("line", "block"), [_param(line, block) for line, block in BLOCKS])
def test_bash_block_runs_as_written(line: int, block: str, workdir: dict[str, object]) -> None:
    text, _ = script(block)
    if ("../shared/data" in text or "eval.yaml" in text) and not SHARED_DATA.is_dir():
        pytest.skip(f"README line {line} needs {SHARED_DATA}")
    start = time.monotonic()
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=workdir["cwd"], env=workdir["env"],
                          capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    assert done.returncode == 0, (
        f"README line {line} failed ({took:.0f} s):\n{shlex.quote(text)}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
