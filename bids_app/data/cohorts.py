"""The cohorts of a multi-cohort group run: their list, the checks made before anything is written, their record.

A group run with ``--cohort NAME=BIDS_DIR[:OUTPUT_DIR]`` (or ``[[cohorts]]`` in ``--config``) trains on several
participant-level outputs at once. The positional BIDS_DIR/OUTPUT_DIR are the primary cohort (named by
``--cohort-name``, default ``primary``) and OUTPUT_DIR receives the model folder; the other cohorts are only
read: labels from their BIDS root, tensors from their output folder. Every table of such a run leads with a
``cohort`` column (``labels.COHORT``), and a person is ``(cohort, participant_id)`` (``labels.subject_ids``):
two cohorts' ``sub-001`` are two people. See docs/cohorts.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app.config import CohortConfig, LabelConfig, RunConfig, Task
from bids_app.data.origin import DATASET_COLUMNS, UNKNOWN, read_dataset_identity
from bids_app.errors import DataError, InputMissingError, UsageError
from bids_app.labels import COHORT, subject_ids

log = logging.getLogger(__name__)

PRIMARY_COHORT = "primary"  # the cohort name of BIDS_DIR/OUTPUT_DIR when --cohort-name is not given


def list_cohorts(cfg: RunConfig) -> tuple[CohortConfig, ...]:
    """Every cohort of the run, the primary (BIDS_DIR, OUTPUT_DIR) first; empty for a single-cohort run."""
    if not cfg.cohorts:
        return ()
    primary = CohortConfig(cfg.cohort_name or PRIMARY_COHORT, cfg.bids_dir, cfg.output_dir)
    return (primary, *cfg.cohorts)


def check_cohort_options(cfg: RunConfig) -> None:
    """Refuse cohort options that cannot work, before anything is read or written (one line, exit 64 or 66).

    Checked: ``--cohort-name``/``--leave-cohort-out`` without ``--cohort``; two cohorts of one name; a
    ``--leave-cohort-out`` that names no cohort; options whose participant ids would be ambiguous across
    cohorts (``--participant-label``, ``--session-label``, ``--bids-filter-file``, ``--split-file``,
    ``--parent-label``, ``--transfer-from``); a missing BIDS root or output folder; two cohorts that are one
    dataset (the same folder, or the same ``dataset_description.json`` identity, ``data.origin``).

    Raises:
        UsageError: a conflicting or ambiguous option, or the same dataset twice (64).
        InputMissingError: a cohort's BIDS root, its ``dataset_description.json`` or its output folder is missing (66).
    """
    cohorts = list_cohorts(cfg)
    if not cohorts:
        for option, value in (("--cohort-name", cfg.cohort_name), ("--leave-cohort-out", cfg.split.leave_cohort_out)):
            if value is not None:
                raise UsageError(
                    f"{option} {value} needs other cohorts: add --cohort NAME=BIDS_DIR[:OUTPUT_DIR] (or [[cohorts]] "
                    "in --config), or drop it. See docs/cohorts.md."
                )
        return
    names = [cohort.name for cohort in cohorts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(
            f"Cohort name(s) {', '.join(repeated)} given twice (cohorts: {', '.join(names)}; BIDS_DIR is "
            f"'{names[0]}'). Give each cohort its own name (--cohort NAME=..., --cohort-name for BIDS_DIR)."
        )
    leave_out = cfg.split.leave_cohort_out
    if leave_out is not None and leave_out not in names:
        raise UsageError(f"--leave-cohort-out {leave_out} names no cohort. Use one of: {', '.join(names)}.")
    ambiguous = (
        ("--participant-label", bool(cfg.participant_labels)),
        ("--session-label", bool(cfg.session_labels)),
        ("--bids-filter-file", bool(cfg.bids_filters)),
        ("--split-file", cfg.split.split_file is not None),
        ("--parent-label", cfg.split.parent_label is not None),
        ("--transfer-from", cfg.train.transfer_from is not None),
    )
    for option, given in ambiguous:
        if given:
            raise UsageError(
                f"{option} cannot be combined with --cohort: it names participants or images of one dataset, and "
                "a multi-cohort run names them per cohort. Drop it, or run on one cohort. See docs/cohorts.md."
            )
    for cohort in cohorts:
        where = f"Cohort '{cohort.name}'"
        if not (cohort.bids_dir / "dataset_description.json").is_file():
            raise InputMissingError(
                f"{where}: {cohort.bids_dir} is not a BIDS dataset (no dataset_description.json). Check its "
                "BIDS_DIR in --cohort NAME=BIDS_DIR[:OUTPUT_DIR]."
            )
        if not cohort.output_dir.is_dir():
            raise InputMissingError(
                f"{where}: output folder {cohort.output_dir} does not exist. Run the participant level on "
                f"{cohort.bids_dir} into it first, or give its OUTPUT_DIR in --cohort NAME=BIDS_DIR:OUTPUT_DIR."
            )
    _check_distinct_datasets(cohorts)


def _check_distinct_datasets(cohorts: Sequence[CohortConfig]) -> None:
    """UsageError when two cohorts are one dataset: same BIDS root, same output folder or same dataset identity."""
    seen: dict[str, str] = {}
    for cohort in cohorts:
        identity = read_dataset_identity(cohort.bids_dir).dataset_id
        keys = {
            f"BIDS root {os.path.realpath(cohort.bids_dir)}",
            f"output folder {os.path.realpath(cohort.output_dir)}",
            *([f"dataset id {identity}"] if identity != UNKNOWN else []),
        }
        for key in sorted(keys):
            if key in seen:
                raise UsageError(
                    f"Cohorts '{seen[key]}' and '{cohort.name}' are one dataset (same {key}): its participants "
                    "would count twice and could sit on both sides of the split. Give each dataset once; if they "
                    "are truly two datasets, give them distinct Name or DatasetDOI in dataset_description.json."
                )
            seen[key] = cohort.name


def check_cohort_classes(table: pd.DataFrame, cfg: LabelConfig) -> None:
    """The classes of the cohorts together (each cohort's own check is relaxed: a cohort of patients only is fine).

    Raises:
        DataError: a ``--classes`` class absent from every cohort, or a single class in all cohorts together.
    """
    if cfg.task is not Task.CLASSIFICATION or COHORT not in table.columns:
        return
    present = sorted(set(table["label"].astype(str)))
    absent = [c for c in cfg.classes if c not in present]
    if absent or len(present) < 2:
        what = f"Class(es) {', '.join(absent)} have" if absent else f"Only class {present[0] if present else '-'} has"
        raise DataError(
            f"{what} images in the cohorts {', '.join(dict.fromkeys(table[COHORT].astype(str)))} (label "
            f"'{cfg.label}', present: {', '.join(present) or 'none'}): a classifier needs two classes. Fix "
            "--classes or add a cohort with the other class."
        )
    for cohort, rows in table.groupby(COHORT, sort=False):
        classes = sorted(set(rows["label"].astype(str)))
        if len(classes) < len(present):
            log.warning("Cohort '%s' has only class(es) %s of %s: its cohort and its class go together, so a model "
                        "may learn the site instead of the disease; compare the per-cohort metrics.", cohort,
                        ", ".join(classes), ", ".join(present))  # fmt: skip


def describe_cohorts(cfg: RunConfig, table: pd.DataFrame, maps_dir: Path) -> list[dict[str, Any]]:
    """The model folder's record of a multi-cohort training table (its key ``cohorts``).

    One entry per cohort: ``name``, ``bids_dir`` and ``output_dir`` relative to the model folder (as a model
    folder moved together with its cohorts still names them), the dataset identity (``data.origin``
    ``DATASET_COLUMNS``, ``n/a`` when unknown), ``n_participants`` and ``n_images`` (labelled images used).
    Empty for a single-cohort table.
    """
    if COHORT not in table.columns:
        return []
    entries = []
    for cohort in list_cohorts(cfg):
        rows = table[table[COHORT].astype(str) == cohort.name]
        dataset = read_dataset_identity(cohort.bids_dir).columns()
        for column in DATASET_COLUMNS:  # what the tensors' sidecars say wins over the description read now
            values = sorted(set(rows[column].astype(str))) if column in rows.columns else []
            if len(values) == 1 and values[0] != UNKNOWN:
                dataset[column] = values[0]
        entries.append(
            {
                "name": cohort.name,
                "bids_dir": Path(os.path.relpath(cohort.bids_dir, maps_dir)).as_posix(),
                "output_dir": Path(os.path.relpath(cohort.output_dir, maps_dir)).as_posix(),
                **dataset,
                "n_participants": int(subject_ids(rows).nunique()),
                "n_images": len(rows),
            }
        )
    return entries
