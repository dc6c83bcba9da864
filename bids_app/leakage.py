"""Data-leak checks between a group to predict and a model's training pool.

An image leaks when the model saw it, or the same scan under another name, in training or validation: its
participant id is in the MAPS' ``groups/train+validation.tsv``, or its preprocessed (``source_sha256``) or raw
(``raw_source_sha256``) source file has the sha256 of a training/validation image. ``predict`` refuses such a
group unless ``allow_leak`` is set, in which case the pairs are recorded in ``leak_warning.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from bids_app.derivatives import atomic_write_json
from bids_app.errors import DataError, InputMissingError, LeakError
from bids_app.maps import MapsLayout

log = logging.getLogger(__name__)

SHA_COLUMNS = ("source_sha256", "raw_source_sha256")
LEAK_WARNING_FILE = "leak_warning.json"
MISSING = "n/a"


@dataclasses.dataclass(frozen=True)
class LeakFinding:
    """An image of the predicted group that is also (or is the same scan as) a training/validation image.

    ``reason`` is ``participant`` (same participant id), ``source_sha256`` (same preprocessed image file) or
    ``raw_source_sha256`` (same raw scan); ``sha256`` is the shared digest ("" for ``participant``).
    """

    reason: str
    participant_id: str
    session_id: str
    train_participant_id: str
    train_session_id: str
    sha256: str = ""


def read_train_table(maps_dir: Path) -> pd.DataFrame:
    """``groups/train+validation.tsv`` of a MAPS, read as strings."""
    path = MapsLayout(maps_dir).train_validation_tsv
    if not path.is_file():
        raise InputMissingError(f"{path} does not exist; the MAPS is incomplete. Re-run the split stage.")
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def training_checksums(maps_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """``groups/train+validation.tsv`` with each image's checksums, taken from ``table`` when the file lacks them.

    Args:
        maps_dir: the MAPS folder.
        table: OUTPUT_DIR's images (``data.index_tensors`` columns); training images no longer there keep
            ``n/a`` checksums (their participant ids are still checked).
    """
    train = read_train_table(maps_dir)
    if all(column in train.columns for column in SHA_COLUMNS):
        return train
    keys = ["participant_id", "session_id"]
    known = table[[*keys, *SHA_COLUMNS]].astype(str)
    merged = train.drop(columns=[c for c in SHA_COLUMNS if c in train.columns]).merge(known, on=keys, how="left")
    n_unknown = int(merged["source_sha256"].isna().sum())
    if n_unknown:
        log.warning("%d training/validation image(s) have no tensor left in the output: checked by id only.", n_unknown)
    return merged.fillna({column: MISSING for column in SHA_COLUMNS})


def check_leaks(
    maps_dir: Path, group_table: pd.DataFrame, train_table: pd.DataFrame | None = None
) -> list[LeakFinding]:
    """Find images of ``group_table`` that the model saw in training or validation.

    An image leaks when its participant is in the training/validation table, or when its preprocessed or
    raw source file has the sha256 of a training/validation image (the same scan under another name).

    Args:
        maps_dir: the model folder (its ``groups/train+validation.tsv`` is read when ``train_table`` is None).
        group_table: images to predict: ``participant_id``, ``session_id``, ``source_sha256``,
            ``raw_source_sha256`` (``n/a`` or empty where unknown).
        train_table: training + validation images, same columns.

    Returns:
        Every (group image, training image) pair found, participant matches first, in table order.

    Raises:
        DataError: a table lacks one of the columns, so the check cannot be made.
    """
    train = read_train_table(maps_dir) if train_table is None else train_table
    for name, frame in (("the group table", group_table), (str(MapsLayout(maps_dir).train_validation_tsv), train)):
        missing = [c for c in ("participant_id", "session_id", *SHA_COLUMNS) if c not in frame.columns]
        if missing:
            raise DataError(
                f"Cannot check for leaks: {name} has no column(s) {', '.join(missing)}. The split stage and the "
                "group table must record each image's source_sha256 and raw_source_sha256 (tensor sidecars)."
            )
    columns = ["participant_id", "session_id", *SHA_COLUMNS]
    group = group_table[columns].astype(str).reset_index(drop=True)
    train = train[columns].astype(str).add_prefix("train_")
    pairs = [group.merge(train, left_on="participant_id", right_on="train_participant_id").assign(reason="participant")]
    for column in SHA_COLUMNS:
        known = group[~group[column].isin(["", MISSING])]
        matched = known.merge(train, left_on=column, right_on=f"train_{column}")
        pairs.append(matched.assign(reason=column, sha256=matched[column]))
    found = pd.concat(pairs, ignore_index=True).fillna({"sha256": ""})
    fields = [f.name for f in dataclasses.fields(LeakFinding)]
    return [LeakFinding(*(str(v) for v in row)) for row in found[fields].itertuples(index=False, name=None)]


def enforce_no_leak(findings: list[LeakFinding], group_name: str, allow_leak: bool, group_dir: Path) -> None:
    """Raise ``LeakError`` for any finding, or with ``allow_leak`` record them in ``leak_warning.json``."""
    if not findings:
        (group_dir / LEAK_WARNING_FILE).unlink(missing_ok=True)  # from an earlier run on other images
        return
    shown = "; ".join(
        f"{f.participant_id} {f.session_id} ~ {f.train_participant_id} {f.train_session_id} ({f.reason})"
        for f in findings[:5]
    )
    more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
    if not allow_leak:
        raise LeakError(
            f"Group '{group_name}' shares {len(findings)} image pair(s) with the model's training/validation data: "
            f"{shown}{more}. Predict on images the model never saw, or pass --allow-leak to proceed anyway."
        )
    log.warning("allow_leak: predicting group '%s' despite %d leak(s): %s%s", group_name, len(findings), shown, more)
    atomic_write_json(
        group_dir / LEAK_WARNING_FILE,
        {
            "Group": group_name,
            "Message": "The model saw these images (or the same scans) in training/validation; metrics are biased.",
            "Pairs": [dataclasses.asdict(f) for f in findings],
        },
    )
