"""A model's subject-level split as the model folder holds it: ``Fold``, ``Splits`` and their verified reading.

The split stage (``bids_app.split``) draws a split and writes it under ``groups/`` (``split.files.write_splits``);
everything later (training, prediction, interpretation, reports) reads it through ``read_splits``, which refuses
any file changed since it was written and any participant on two sides. See docs/splits.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app.errors import DataError, InputMissingError, LeakError
from bids_app.labels import (
    COHORT,
    TABLE_COLUMNS,
    format_label_table,
    natural_key,
    read_label_table,
    sort_table,
    subject_ids,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Fold:
    """One train/validation split of the non-test participants (label tables, all sessions kept)."""

    index: int
    train: pd.DataFrame
    validation: pd.DataFrame


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A held-out test table and the folds; ``p_values`` keys look like ``split-0/age[AD]``."""

    test: pd.DataFrame
    folds: tuple[Fold, ...]
    seed: int
    attempts: int
    p_values: dict[str, float]


def check_disjoint(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    """Raise LeakError when tables ``a`` and ``b`` share a participant (up to 10 are named).

    In multi-cohort tables a participant is ``<cohort>/<participant_id>`` (``labels.subject_ids``); a table
    without the ``cohort`` column compared with one that has it is compared on ``participant_id`` alone.
    """
    if (COHORT in a.columns) != (COHORT in b.columns):
        a, b = a.drop(columns=COHORT, errors="ignore"), b.drop(columns=COHORT, errors="ignore")
    shared = sorted(set(subject_ids(a)) & set(subject_ids(b)), key=natural_key)
    if shared:
        shown = ", ".join(shared[:10]) + (f" ... ({len(shared)} in all)" if len(shared) > 10 else "")
        raise LeakError(
            f"Data leak in {what}: {len(shared)} participant(s) on both sides: {shown}. "
            "A participant must be on one side only; fix the split or the group you passed."
        )


def check_splits(splits: Splits, where: str) -> None:
    """Raise LeakError when a participant is in test and in a fold, or on both sides of a fold."""
    for fold in splits.folds:
        check_disjoint(splits.test, pd.concat([fold.train, fold.validation]), f"{where}: test vs split-{fold.index}")
        check_disjoint(fold.train, fold.validation, f"{where}: split-{fold.index} train vs validation")


SPLITS_JSON = "splits.json"
TEST_TSV = "test/data.tsv"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def label_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Only the label-table columns: split files say who is where, not where the tensors are."""
    return table[[c for c in (COHORT, *TABLE_COLUMNS) if c in table.columns]]


def table_sha256(table: pd.DataFrame) -> str:
    """SHA-256 of a label table's canonical TSV (label columns, sorted rows), tying a split to its labels."""
    return sha256_text(format_label_table(sort_table(label_columns(table))))


def read_splits(groups_dir: Path) -> Splits:
    """Read a split written by ``write_splits``, verifying every recorded SHA-256 and disjointness.

    Raises:
        InputMissingError: splits.json or a listed file is missing.
        DataError: a file changed since it was written, or splits.json is malformed.
        LeakError: a participant is on two sides (a hand-edited split).
    """
    path = groups_dir / SPLITS_JSON
    if not path.is_file():
        raise InputMissingError(f"No {path}: this model has no complete split. Run the group level's split stage.")
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        files: dict[str, str] = record["files"]
        n_splits, numeric = int(record["n_splits"]), record["label_type"] == "numeric"
        p_values = {f"{g}/{k}": float(v) for g, tests in record["p_values"].items() for k, v in tests.items()}
        seed, attempts = int(record["seed"]), int(record["attempts"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DataError(f"{path} is malformed ({exc!r}). Re-run the split stage with --overwrite.") from None
    tables = {}
    for name, expected in files.items():
        file = groups_dir / name
        if not file.is_file():
            raise InputMissingError(f"{file}, listed in {path}, is missing. Restore it or re-run the split stage.")
        actual = hashlib.sha256(file.read_bytes()).hexdigest()
        if actual != expected:
            raise DataError(
                f"{file} changed after the split was written (sha256 {actual[:12]}..., recorded {expected[:12]}...). "
                "Restore it or re-run the split stage with --overwrite: hand-edited splits can leak participants."
            )
        if name != "demographics.tsv":
            tables[name] = read_label_table(file, numeric_label=numeric)
    expected_names = {TEST_TSV, *(f"split-{k}/{s}.tsv" for k in range(n_splits) for s in ("train", "validation"))}
    if not expected_names <= set(tables):
        raise DataError(
            f"{path} does not list {', '.join(sorted(expected_names - set(tables)))}. Re-run the split stage."
        )
    folds = tuple(Fold(k, tables[f"split-{k}/train.tsv"], tables[f"split-{k}/validation.tsv"]) for k in range(n_splits))
    splits = Splits(tables[TEST_TSV], folds, seed, attempts, p_values)
    check_splits(splits, str(groups_dir))
    return splits
