"""The split stage's entry: draw (or read) this model's subject-level split and write it into the model folder.

Four ways to a split, in order of precedence: a user's split file (``--split-file``), a whole cohort held out
for test (``--leave-cohort-out``, the folds drawn on the other cohorts), a nested split for
transfer learning (``--parent-label``: this task first, then its parent with everyone on the same side), or a
seeded draw (``make.make_splits``). A transfer source's participants keep their source side, so its test set
stays unseen here too, and its training pool joins this model's ``train+validation.tsv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bids_app.config import RunConfig
from bids_app.errors import DataError
from bids_app.maps.splits import check_disjoint
from bids_app.split import files, make

if TYPE_CHECKING:
    from bids_app.data.tables import GroupTable
    from bids_app.maps import Maps

log = logging.getLogger(__name__)


def run_split_stage(
    cfg: RunConfig,
    table: GroupTable,
    groups_dir: Path,
    *,
    parent_table: GroupTable | None = None,
    source: Maps | None = None,
) -> None:
    """Write the split of ``table`` under ``groups_dir`` (the model folder's ``groups/``).

    Args:
        cfg: the run configuration (``cfg.split``, ``cfg.labels.task``, ``cfg.seed``).
        table: labels joined with the tensors (``levels.group_table``).
        groups_dir: where the split files go.
        parent_table: with ``--parent-label``, the same images labelled with the parent task.
        source: the transfer-learning source's model folder (``--transfer-from``), if any.

    Raises:
        LeakError: the test set shares a participant with the source's training pool.
    """
    source_pool = (
        source.training_pool("Point train.transfer_from to a MAPS written by bids_app's training.")
        if (source is not None)
        else None
    )
    if cfg.split.split_file is not None:
        splits = files.load_split_file(cfg.split.split_file, table)
    elif cfg.split.leave_cohort_out is not None:
        splits = make.make_leave_cohort_out_splits(table, cfg.split, cfg.labels.task, cfg.seed,
                                                   cfg.split.leave_cohort_out)  # fmt: skip
    elif cfg.split.parent_label and parent_table is not None:
        # Figure 2 of the ClinicaDL paper: split this (subset) task first, then the parent task with the same
        # participants on the same sides; the parent split is the --split-file of the pre-training model.
        splits, parent = make.make_nested_splits(table, parent_table, cfg.split, cfg.labels.task, cfg.seed)
        parent_file = groups_dir / f"parent-{cfg.split.parent_label}_split.tsv"
        files.write_split_file(parent_file, parent)
        log.info("Parent split written to %s: pre-train with --label %s --split-file %s, then fine-tune here "
                 "with --transfer-from.", parent_file, cfg.split.parent_label, parent_file)  # fmt: skip
    else:
        constraints = source.splits if source is not None else None
        splits = make.make_splits(table, cfg.split, cfg.labels.task, cfg.seed, constraints=constraints)
    if source_pool is not None:
        check_disjoint(splits.test, source_pool, "the test set and the transfer source's training pool")
    for fold in splits.folds:
        for side, rows in (("training", fold.train), ("validation", fold.validation)):
            if rows.empty:
                where = f"--split-file {cfg.split.split_file}" if cfg.split.split_file else "the drawn split"
                raise DataError(
                    f"Split {fold.index} of {where} has an empty {side} set: a model cannot be trained and selected "
                    "on it. Give every fold training and validation participants."
                )
    files.write_splits(groups_dir, splits, table, cfg.split, extra_seen=source_pool)
