"""The BIDS-App command line: ``bids_app BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

This module stays light: it imports neither torch nor ants nor pybids, so ``--help`` and ``--version``
answer instantly. ``arguments`` parses the command line into a ``RunConfig``; this module configures logging,
calls ``levels`` and maps every ``BidsAppError`` to its documented exit code.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from bids_app.arguments import parse_config
from bids_app.errors import BidsAppError

log = logging.getLogger("bids_app")


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
    """Console logging for the whole ``bids_app`` logger tree; per-run files are added by provenance.

    In a distributed run (torchrun/srun) only rank 0 logs INFO to the console; the others say only warnings.
    """
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose == 0 else logging.DEBUG)
    if os.environ.get("RANK", "0") != "0":
        level = max(level, logging.WARNING)
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("bids_app")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(0)
    try:
        cfg = parse_config(argv)
        configure_logging(cfg.verbose)
        from bids_app import levels  # heavy imports start here, never for --help/--version

        return levels.run(cfg, argv)
    except BidsAppError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("Interrupted; completed outputs are kept, partial files were not renamed into place.")
        return 130
