"""Headless Chromium for the report tests: how wide a page lays out in a frame of a given width."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")


def page_widths(page: Path, width: int) -> tuple[int, int]:
    """``(scrollWidth, clientWidth)`` of ``page`` laid out in an iframe ``width`` px wide (scroll > client: the
    page scrolls sideways). The page is copied beside a frame page so both share a folder."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shutil.copyfile(page, root / "page.html")
        (root / "outer.html").write_text(
            f'<!DOCTYPE html><html><body style="margin:0"><iframe id="f" src="page.html" style="width:{width}px;'
            'height:1500px;border:0"></iframe><script>document.getElementById("f").addEventListener("load", () => {'
            'const d = document.getElementById("f").contentDocument.documentElement;'
            'document.body.setAttribute("data-widths", d.scrollWidth + "/" + d.clientWidth); });</script>'
            "</body></html>",
            encoding="utf-8",
        )
        result = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={root / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", (root / "outer.html").as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    found = re.search(r'data-widths="(\d+)/(\d+)"', result.stdout)
    assert found is not None, result.stdout[-2000:]
    scroll_width, client_width = (int(v) for v in found.groups())
    return scroll_width, client_width
