"""Packaging: the wheel installs attacks/ and defenses/ as robustkit.attacks / robustkit.defenses,
ships the embedded model weights, and the console script is declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("robustkit-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_maps_top_level_folders_into_the_package(wheel_files: list[str]) -> None:
    for path in (
        "robustkit/__init__.py",
        "robustkit/cli/main.py",
        "robustkit/evaluation/grid.py",
        "robustkit/results/leaderboard.py",
        "robustkit/training/loop.py",
        "robustkit/models/sidecar.py",
        "robustkit/attacks/__init__.py",
        "robustkit/attacks/pgd.py",
        "robustkit/defenses/__init__.py",
        "robustkit/models/__init__.py",
        "robustkit/models/weights/digits_cnn.safetensors",
    ):
        assert path in wheel_files, path
    assert not any(f.startswith(("attacks/", "defenses/", "tests/")) for f in wheel_files)
    # every module in the source folders made it into the wheel
    for folder, package in (("attacks", "robustkit/attacks"), ("defenses", "robustkit/defenses")):
        for src in (ROOT / folder).glob("*.py"):
            assert f"{package}/{src.name}" in wheel_files, src


def test_wheel_declares_the_console_script(wheel: Path, wheel_files: list[str]) -> None:
    entry = next(f for f in wheel_files if f.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry).decode()
    assert "robustkit = robustkit.cli:main" in text


def test_installed_package_imports_subpackages() -> None:
    code = "import robustkit.attacks, robustkit.defenses; print(robustkit.attacks.PGD.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PGD"
