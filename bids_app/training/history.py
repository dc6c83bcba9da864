"""Where each finished epoch of a split is recorded: ``training.tsv``, TensorBoard events and the tracker.

Only the main process records; under torchrun the other ranks hold the same state and record nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app.derivatives import atomic_write_text, naming_write_errors
from bids_app.errors import IOFailure, OutputError
from bids_app.labels import NA
from bids_app.maps.folder import MapsLayout
from bids_app.tracking.mlflow import Tracker

log = logging.getLogger(__name__)
_EVENTS = "write TensorBoard events in"


def write_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``training.tsv`` (one row per completed epoch) atomically."""
    atomic_write_text(path, pd.DataFrame(history).to_csv(sep="\t", index=False, na_rep=NA, lineterminator="\n"))


def tensorboard_tag(column: str) -> str:
    """The TensorBoard tag of a ``training.tsv`` column: ``<quantity>/<set>``, so that one chart overlays the sets.

    ``train_loss`` → ``loss/train``, ``validation_loss`` → ``loss/validation``, ``validation_<metric>`` →
    ``<metric>/validation``; other columns (``learning_rate``) keep their name.
    """
    for prefix, split_set in (("train_", "train"), ("validation_", "validation")):
        if column.startswith(prefix):
            return f"{column.removeprefix(prefix)}/{split_set}"
    return column


class EpochLog:
    """The records of one split's epochs ``start_epoch ..`` (a resumed run purges later TensorBoard steps).

    A record that cannot be written (a full disk, a read-only folder) raises ``IOFailure`` or ``OutputError``
    naming the file (``training.tsv``) or the TensorBoard folder.
    """

    def __init__(self, layout: MapsLayout, split: int, start_epoch: int, tracker: Tracker, *, main: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.layout, self.split, self.tracker = layout, split, tracker
        self.events_dir = layout.tensorboard_dir(split)
        self.writer = None
        if main:
            _quiet_event_writer_thread()
            with naming_write_errors(self.events_dir, _EVENTS):
                self.writer = SummaryWriter(str(self.events_dir), purge_step=start_epoch if start_epoch > 0 else None)

    def add(self, history: Sequence[dict[str, Any]]) -> None:
        """Record the last row of ``history`` (``epoch``, ``learning_rate``, ``train_loss``, ``validation_*``)."""
        if self.writer is None:
            return
        row = history[-1]
        write_history(self.layout.training_tsv(self.split), history)
        with naming_write_errors(self.events_dir, _EVENTS):
            for name, value in row.items():
                if name != "epoch":
                    self.writer.add_scalar(tensorboard_tag(name), value, row["epoch"])
            self.writer.flush()
        self.tracker.log_epoch(self.split, row)

    def close(self) -> None:
        """Flush and close the TensorBoard file.

        Called from a ``finally`` block: when another exception is already on its way, a failure to close is
        logged instead of raised, so that the error that stopped training is the one reported.
        """
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        stopping = sys.exc_info()[1]  # the exception a ``finally`` block is running for, if any
        try:
            with naming_write_errors(self.events_dir, _EVENTS):
                writer.close()
        except (OutputError, IOFailure) as exc:
            if stopping is None:
                raise
            log.warning("%s", exc)


def _quiet_event_writer_thread() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails (a full disk).

    The thread keeps the ``OSError`` and TensorBoard raises it again at the next ``add_scalar``, ``flush`` or
    ``close`` in the training thread, where ``EpochLog`` reports it as one ``IOFailure``; the thread's own
    report (``threading.excepthook``) would print a traceback besides. Other threads' errors are untouched.
    """
    from tensorboard.summary.writer import event_file_writer

    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", None)
    previous = threading.excepthook
    if writer_thread is None or getattr(previous, "quiets_event_writer", False):
        return

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.thread, writer_thread) and isinstance(args.exc_value, OSError)):
            previous(args)

    excepthook.quiets_event_writer = True  # type: ignore[attr-defined]
    threading.excepthook = excepthook
