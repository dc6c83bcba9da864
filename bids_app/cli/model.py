"""``bids_app-model``: export a trained model to one portable file, import it, or read its card.

``bids_app-model export MAPS FILE [--splits K ...] [--metrics M ...] [--no-fingerprints]`` writes the model
folder MAPS (``OUTPUT_DIR/models/<name>``) to FILE; ``bids_app-model import FILE DEST`` verifies FILE whole and
writes it as the model folder DEST; ``bids_app-model info FILE`` verifies FILE and prints its model card without
writing anything. Exit codes follow ``bids_app.errors`` (docs/portable.md, docs/bad_inputs.md). Heavy modules
are imported after parsing, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from bids_app.errors import BidsAppError, UsageError

log = logging.getLogger(__name__)

EPILOG = (
    "exit codes: 0 done; 64 bad command line (unknown split or metric, DEST exists); 65 refused archive or model "
    "(checksum, pickle, executable or escaping member, unknown member, unreadable format); 66 missing file or "
    "model folder; 73/74 cannot write. See docs/portable.md."
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. See bids_app-model --help.")


def build_parser() -> argparse.ArgumentParser:
    """The ``bids_app-model`` parser: three subcommands, every default shown."""
    parser = _ArgumentParser(
        prog="bids_app-model",
        description="Export a trained model to one portable file with its card and leak guard, import it, or "
        "print its card.",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (default: info)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    export = commands.add_parser(
        "export", help="write a model folder to one archive", description="Write a model folder to one archive."
    )
    export.add_argument("maps", type=Path, metavar="MAPS", help="the model folder (OUTPUT_DIR/models/<name>)")
    export.add_argument("file", type=Path, metavar="FILE", help="the archive to write (e.g. model.zip)")
    export.add_argument(
        "--splits", type=int, nargs="+", default=[], metavar="K", help="splits to ship (default: every trained split)"
    )
    export.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        metavar="METRIC",
        help="best models to ship, by selection metric (default: every selection metric of the model)",
    )
    export.add_argument(
        "--no-fingerprints",
        action="store_true",
        help="leave the training pool's anatomical fingerprints out; receiving sites then cannot detect re-scans "
        "under new names (default: off, fingerprints included)",
    )
    imp = commands.add_parser(
        "import", help="verify an archive and write it as a model folder", description="Verify FILE and unpack it."
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="the archive")
    imp.add_argument("dest", type=Path, metavar="DEST", help="the model folder to create (must not exist)")
    info = commands.add_parser(
        "info", help="print an archive's model card", description="Verify FILE and print its card (writes nothing)."
    )
    info.add_argument("file", type=Path, metavar="FILE", help="the archive")
    info.add_argument("--json", action="store_true", help="print model_card.json instead (default: Markdown)")
    return parser


def run_export(maps_dir: Path, file: Path, splits: Sequence[int], metrics: Sequence[str], fingerprints: bool) -> int:
    from bids_app.maps import Maps
    from bids_app.portable import export_model
    from bids_app.portable.model import check_selection
    from bids_app.prediction.guard import make_guard

    if file.exists() and file.is_dir():
        raise UsageError(f"Export target {file} is a folder. Give a file name, e.g. {file / 'model.zip'}.")
    maps = Maps.open(maps_dir)
    check_selection(maps, splits, metrics)  # before the guard's images are read
    guard, sidecar = make_guard(maps, with_fingerprints=fingerprints)
    export_model(maps, file, guard, sidecar, splits=splits, metrics=metrics)
    print(f"Wrote {file}")
    return 0


def run_import(file: Path, dest: Path) -> int:
    from bids_app.portable import import_archive

    imported = import_archive(file, dest)
    print(f"Imported model {imported.card.get('model_name')} into {dest}")
    return 0


def run_info(file: Path, as_json: bool) -> int:
    from bids_app.portable.archive import CARD_JSON, CARD_MD, read_archive

    archive = read_archive(file)
    if as_json:
        print(archive.members[CARD_JSON].decode("utf-8"), end="")
    else:
        print(archive.members[CARD_MD].decode("utf-8"))
        print(f"Archive sha256 {archive.sha256}; format {archive.manifest['format_version']}; "
              f"{len(archive.members) + 1} members verified.")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``bids_app-model``; returns the exit code (module docstring)."""
    from bids_app.log_setup import configure_logging

    configure_logging(0)
    try:
        options = build_parser().parse_args(argv)
        configure_logging(options.verbose)
        if options.command == "export":
            return run_export(options.maps, options.file, options.splits, options.metrics, not options.no_fingerprints)
        if options.command == "import":
            return run_import(options.file, options.dest)
        return run_info(options.file, options.json)
    except BidsAppError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
