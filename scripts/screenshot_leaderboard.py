"""Open the leaderboard's HTML export in headless Chromium: screenshot it, and measure how wide it renders.

    robustkit leaderboard --format html --output board.html
    python scripts/screenshot_leaderboard.py board.html board.png      # prints the PNG path and the page width

The page must fit a 1,400-pixel window (no horizontal scrolling) with its raw rows and configs
closed and opened; the script exits 1 when it does not, or when the screenshot is blank.
tests/test_leaderboard_view.py runs it when Chromium is on PATH. Needs Debian's chromium package
(`apt-get install -y chromium`, /usr/bin/chromium); the page is self-contained, Chromium gets no
network (the flags below turn its background traffic off).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

WIDTH, HEIGHT = 1400, 900
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Appended to a copy of the page for --dump-dom: opens the raw rows and writes the widest scroll width
# (closed and opened) into the DOM, where the dump shows it.
_MEASURE = """<script>
const right = () => Math.max(document.documentElement.scrollWidth,
  ...Array.from(document.querySelectorAll("table")).map(t => Math.ceil(t.getBoundingClientRect().right)));
const content = () => Math.max(0, ...Array.from(document.querySelectorAll("table"))
  .map(t => Math.ceil(t.getBoundingClientRect().right)));
const closed = right(), closedContent = content();
document.querySelectorAll("details").forEach(d => d.open = true);
document.body.setAttribute("data-scroll-width", Math.max(closed, right()));
document.body.setAttribute("data-content-width", Math.max(closedContent, content()));
</script>"""


def chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise SystemExit("Chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args],
                              check=True, capture_output=True, text=True, timeout=180)


def screenshot(html: Path, png: Path) -> Path:
    """Render ``html`` in a 1400x900 window and write a PNG screenshot of it."""
    _run([f"--screenshot={png.resolve()}", html.resolve().as_uri()])
    return png


def dump_dom(html: Path) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    return _run(["--dump-dom", html.resolve().as_uri()]).stdout


def measure(html: Path) -> tuple[int, str]:
    """The page's scroll width in pixels (the wider of raw rows closed and opened; the window's
    1,400 when nothing overflows) and its DOM (whose body's data-content-width is the right edge
    of the widest table)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / html.name
        copy.write_text(html.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
        dom = dump_dom(copy)
    found = re.search(r'data-scroll-width="(\d+)"', dom)
    return (int(found.group(1)) if found else -1), dom


def is_blank(png: Path) -> bool:
    """Whether the PNG is (nearly) one colour: its decompressed scanlines hold few distinct bytes.
    A rendered table has anti-aliased text, so hundreds of pixel values."""
    data = png.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return True
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat))) < 16


def main(html: str, png: str) -> int:
    width, dom = measure(Path(html))
    content = re.search(r'data-content-width="(\d+)"', dom)
    shot = screenshot(Path(html), Path(png))
    blank = is_blank(shot)
    print(f"{shot}: page width {width} px in a {WIDTH} px window, widest table ends at "
          f"{content.group(1) if content else '?'} px (raw rows open){'; BLANK' if blank else ''}")
    return 0 if 0 < width <= WIDTH and not blank else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
