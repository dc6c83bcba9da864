"""Where each finished epoch of a split is recorded: ``training.tsv``, TensorBoard events and the tracker.

Only the main process records; under torchrun the other ranks hold the same state and record nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app.derivatives import atomic_write_text
from bids_app.labels import NA
from bids_app.maps.folder import MapsLayout
from bids_app.tracking.mlflow import Tracker


def write_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``training.tsv`` (one row per completed epoch) atomically."""
    atomic_write_text(path, pd.DataFrame(history).to_csv(sep="\t", index=False, na_rep=NA, lineterminator="\n"))


class EpochLog:
    """The records of one split's epochs ``start_epoch ..`` (a resumed run purges later TensorBoard steps)."""

    def __init__(self, layout: MapsLayout, split: int, start_epoch: int, tracker: Tracker, *, main: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.layout, self.split, self.tracker = layout, split, tracker
        self.writer = (
            SummaryWriter(str(layout.tensorboard_dir(split)), purge_step=start_epoch if start_epoch > 0 else None)
            if main
            else None
        )

    def add(self, history: Sequence[dict[str, Any]]) -> None:
        """Record the last row of ``history`` (``epoch``, ``learning_rate``, ``train_loss``, ``validation_*``)."""
        if self.writer is None:
            return
        row = history[-1]
        write_history(self.layout.training_tsv(self.split), history)
        for name, value in row.items():
            if name != "epoch":
                tag = name.replace("_", "/", 1) if name.startswith("validation_") else name
                self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()
        self.tracker.log_epoch(self.split, row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
