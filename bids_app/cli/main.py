"""The BIDS-App command line: ``bids_app BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

This module stays light: it imports neither torch nor ants nor pybids, so ``--help`` and ``--version``
answer instantly. ``arguments`` parses the command line into a ``RunConfig``; this module configures logging,
calls ``levels`` and maps every ``BidsAppError`` to its documented exit code, as well as the ``OSError`` of a
read-only file system, a full disk or a device error that a writer let through (73 or 74, one line).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bids_app.cli.arguments import parse_config
from bids_app.derivatives import explain_environment_error
from bids_app.errors import BidsAppError
from bids_app.log_setup import configure_logging

log = logging.getLogger("bids_app")


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
    except OSError as exc:
        explained = explain_environment_error(exc)
        if explained is None:
            raise
        log.debug("Where the I/O error was raised:", exc_info=True)
        log.error("%s", explained)
        return explained.exit_code
    except KeyboardInterrupt:
        log.error("Interrupted; completed outputs are kept, partial files were not renamed into place.")
        return 130
