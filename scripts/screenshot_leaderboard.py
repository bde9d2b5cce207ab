"""Open the leaderboard's HTML export in headless Chromium and screenshot it (checks the page renders).

    robustkit leaderboard --format html --output board.html
    python scripts/screenshot_leaderboard.py board.html board.png

Needs Debian's chromium package (/usr/bin/chromium). The page is self-contained: no network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html: Path, png: Path, size: str = "1400,700") -> Path:
    """Render ``html`` and write a PNG screenshot; also returns the DOM Chromium built (for checks)."""
    exe = chromium()
    if exe is None:
        raise SystemExit("Chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={png.resolve()}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


def dump_dom(html: Path) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    exe = chromium()
    if exe is None:
        raise SystemExit("Chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", html.resolve().as_uri()],
                              check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
