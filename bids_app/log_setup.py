"""Where log records go: the console (stderr) and a run's log file, in the main process and its workers.

Standard library only, so the entry points (``cli``, ``search``) can set logging up before any heavy import.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_FILE_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream of its creation.

    A handler bound to the ``sys.stderr`` of its creation keeps writing to it after it was replaced and
    closed (by a test runner capturing output, a notebook, a caller redirecting stderr), and logging then
    prints a "--- Logging error ---" traceback for every record instead of the record.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ and setStream assign it; stderr wins
        pass


def configure_logging(verbose: int) -> None:
    """Console logging for the whole ``bids_app`` logger tree; per-run files are added by ``attach_log_file``.

    In a distributed run (torchrun/srun) only rank 0 logs INFO to the console; the others say only warnings.
    """
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose == 0 else logging.DEBUG)
    if os.environ.get("RANK", "0") != "0":
        level = max(level, logging.WARNING)
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, "%H:%M:%S"))
    root = logging.getLogger("bids_app")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def attach_log_file(path: str | Path, worker: bool = False) -> logging.FileHandler:
    """Append every ``bids_app`` record to ``path`` (a run's ``bids_app.log``); workers also name their process."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(WORKER_FILE_FORMAT if worker else CONSOLE_FORMAT))
    handler.setLevel(logging.DEBUG)
    logging.getLogger("bids_app").addHandler(handler)
    return handler
