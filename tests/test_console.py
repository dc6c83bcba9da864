"""The console in a terminal: log records and tqdm bars each keep their own lines; off a terminal, no bars."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# Nested bars as training draws them (epochs, then batches with ``leave=False``), records logged mid-bar.
SNIPPET = """
import logging
from tqdm import tqdm
from bids_app.log_setup import configure_logging

configure_logging(0)
log = logging.getLogger("bids_app.training.stage")
for epoch in tqdm(range(3), desc="split 0", disable=None):
    for batch in tqdm(range(4), desc=f"epoch {epoch} train", leave=False, disable=None, unit="batch"):
        log.info("epoch %d batch %d", epoch, batch)
    log.warning("epoch %d done", epoch)
log.info("finished")
"""
N_RECORDS = 3 * 4 + 3 + 1
RECORD = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) bids_app\.training\.stage: (epoch \d (batch \d|done)|finished)")
CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def run_in_terminal(code: str) -> bytes:
    """Everything ``python -c code`` writes to a pseudo-terminal (its stdout and stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new one is 0 x 0
    with subprocess.Popen([sys.executable, "-c", code], stdin=terminal, stdout=terminal, stderr=terminal) as child:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        child.wait(timeout=60)
    os.close(controller)
    assert child.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks)


def render(output: str) -> list[str]:
    """The screen lines a terminal shows for ``output``: ``\\r`` returns, ``\\n`` moves down, ``ESC[nA`` moves up,
    later characters overwrite earlier ones in place."""
    screen: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(output):
        char = output[i]
        escape = CSI.match(output, i)
        if escape:
            if escape.group(2) == "A":
                row = max(0, row - int(escape.group(1) or 1))
            i = escape.end()
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            screen.extend([] for _ in range(row + 1 - len(screen)))
        else:
            line = screen[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = char
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in screen]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal semantics checked on Linux")
def test_log_records_in_a_terminal_start_their_own_line_below_the_bars() -> None:
    output = run_in_terminal(SNIPPET).decode()
    assert "\r" in output.replace("\r\n", "\n"), "the bars were not drawn: is this a terminal?"
    lines = render(output)
    with_records = [line for line in lines if "bids_app.training.stage" in line]
    # every record whole on its own line, none continuing a bar or overwritten by its redraw
    assert [line for line in with_records if not RECORD.fullmatch(line)] == []
    assert len(with_records) == N_RECORDS
    # the epoch bar (``leave=True``) ends on its own line after the last record; batch bars are cleared
    bars = [line for line in lines if "|" in line]
    assert len(bars) == 1 and bars[0].startswith("split 0: 100%|") and "3/3" in bars[0], lines
    assert lines.index(bars[0]) > lines.index(with_records[-2])
    assert not any("train" in line for line in lines if "|" in line)


def test_off_a_terminal_there_are_no_bars_and_records_are_plain_lines() -> None:
    command = [sys.executable, "-c", SNIPPET]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
    assert "\r" not in done.stderr and "|" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == N_RECORDS and all(RECORD.fullmatch(line) for line in lines), lines


def test_log_setup_imports_no_tqdm() -> None:
    """The entry points configure logging before any heavy import; bars bring tqdm in themselves."""
    code = "import sys, bids_app.log_setup; assert 'tqdm' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
