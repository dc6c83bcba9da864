"""Where log records go: the console (stderr) and a run's log file, in the main process and its workers.

Light imports only (the standard library, ``derivatives``), so the entry points (``cli``, ``search``) can set logging
up before any heavy import.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from bids_app.derivatives import explain_write_error, naming_write_errors

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

    def emit(self, record: logging.LogRecord) -> None:
        """Print ``record`` on a line of its own, below the progress bars on the console.

        A tqdm bar leaves the cursor at the end of its line, so a record written there would continue the bar's
        line. ``tqdm.write`` clears the active bars, prints the record on its own line and redraws the bars
        below it; with no active bar (off a terminal they are disabled) it only prints. ``tqdm`` is imported
        here only once something else has, since no bar exists before that.
        """
        if "tqdm" not in sys.modules:
            super().emit(record)
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:  # as logging's own handlers do: a recursion is a bug to see, not a record lost
            raise
        except Exception:
            self.handleError(record)


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


class _RunLogFileHandler(logging.FileHandler):
    """A run's log file that, once it cannot be written (a full disk), says so once and stops writing.

    ``logging`` would otherwise print a "--- Logging error ---" traceback to the console for every record.
    """

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._give_up(error)
        else:
            super().handleError(record)

    def flush(self) -> None:
        if not self.failed:
            super().flush()

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # the last records could not be flushed
            if not self.failed:
                self._give_up(exc)

    def _give_up(self, error: OSError) -> None:
        self.failed = True
        message = explain_write_error(error, Path(self.baseFilename))
        sys.stderr.write(f"{message} The run goes on, logging to the console only.\n")


def attach_log_file(path: str | Path, worker: bool = False) -> logging.FileHandler:
    """Append every ``bids_app`` record to ``path`` (a run's ``bids_app.log``); workers also name their process.

    Raises:
        OutputError, IOFailure: the file cannot be opened for appending (read-only OUTPUT_DIR, permissions,
            a full disk), naming ``path``.
    """
    with naming_write_errors(Path(path)):
        handler = _RunLogFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(WORKER_FILE_FORMAT if worker else CONSOLE_FORMAT))
    handler.setLevel(logging.DEBUG)
    logging.getLogger("bids_app").addHandler(handler)
    return handler
