"""Data-leak checks between a group to predict and a model's training pool.

An image leaks when the model saw it, or the same scan under another name, in training or validation: its
participant id is in the MAPS' ``groups/train+validation.tsv`` (same dataset), or its preprocessed
(``source_sha256``) or raw (``raw_source_sha256``) source file has the sha256 of a training/validation image, or,
for a group from another output (``--predict-from``), when its anatomical fingerprint is more alike a
training/validation image's than any two different participants of the training pool are
(``check_identity_leaks``, ``prediction.identity``): the same person re-scanned under another name. ``predict``
refuses such a group unless ``allow_leak`` is set, in which case the pairs are recorded in
``leak_warning.json``. See docs/leakage.md.

A participant label names a person only inside one dataset (``data.origin``): the participant rule applies to
two images of the same ``dataset_id`` (or of an unknown one); the checksum and fingerprint rules apply across
datasets. The same label in two different datasets is listed as information (``find_label_coincidences``), in
the log and in the group's ``leak_report.json`` (``write_leak_report``), never refused by itself.

``find_leaks`` and ``find_label_coincidences`` take plain tables (ids, checksums, dataset ids), so a model
archive without its training data can run them from the tables it carries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bids_app.data.origin import DATASET_COLUMNS, UNKNOWN, same_dataset
from bids_app.data.tables import GroupTable, LabelTable, TensorIndex
from bids_app.derivatives import atomic_path, atomic_write_json
from bids_app.errors import DataError, LeakError
from bids_app.labels import NA as MISSING
from bids_app.labels import image_keys, subject_ids
from bids_app.maps import Maps

log = logging.getLogger(__name__)

SHA_COLUMNS = ("source_sha256", "raw_source_sha256")
LEAK_WARNING_FILE = "leak_warning.json"
LEAK_REPORT_FILE = "leak_report.json"  # every check made on a group from another output, and what it found
IDENTITY_FILE = "identity_fingerprints.json"  # in the MAPS' groups/: calibration, pool images, checks made
IDENTITY_ARRAY = "identity_fingerprints.npy"  # the pool's low-resolution volumes (n, x, y, z), float32


@dataclasses.dataclass(frozen=True)
class LeakFinding:
    """An image of the predicted group that is also (or is the same scan as) a training/validation image.

    ``reason`` is ``participant`` (same participant id in one dataset), ``source_sha256`` (same preprocessed
    image file) or ``raw_source_sha256`` (same raw scan) or ``fingerprint`` (same anatomy: the same person under
    another name); ``sha256`` is the shared digest ("" otherwise); ``similarity`` the fingerprints' (``fingerprint``).
    """

    reason: str
    participant_id: str
    session_id: str
    train_participant_id: str
    train_session_id: str
    sha256: str = ""
    similarity: float | None = None


@dataclasses.dataclass(frozen=True)
class LabelCoincidence:
    """An image of the predicted group whose participant label is also a training participant's, in another
    dataset: information, not a leak (a label names a person only inside its dataset)."""

    participant_id: str
    session_id: str
    dataset_id: str
    train_participant_id: str
    train_session_id: str
    train_dataset_id: str


def training_checksums(maps: Maps, table: TensorIndex) -> LabelTable:
    """``groups/train+validation.tsv`` with each image's checksums and source dataset (``DATASET_COLUMNS``),
    taken from ``table`` when the file lacks them.

    Args:
        maps: the model folder.
        table: OUTPUT_DIR's images (``data.tables.index_tensors`` columns); training images no longer there keep
            ``n/a`` checksums and dataset (their participant ids are still checked, as of any dataset).
    """
    train = maps.training_pool()
    wanted = [c for c in (*SHA_COLUMNS, *DATASET_COLUMNS) if c in table.columns or c in SHA_COLUMNS]
    if all(column in train.columns for column in wanted):
        return train
    keys = [c for c in image_keys(train) if c in table.columns]  # with cohorts, one label may name two people
    filled = [c for c in wanted if c not in train.columns]
    known = table[[*keys, *filled]].astype(str)
    merged = train.merge(known, on=keys, how="left")
    n_unknown = int(merged[filled[0]].isna().sum())
    if n_unknown:
        log.warning("%d training/validation image(s) have no tensor left in the output: checked by id only.", n_unknown)
    return merged.fillna({column: MISSING for column in filled})


def check_leaks(maps: Maps, group_table: GroupTable, train_table: LabelTable | None = None) -> list[LeakFinding]:
    """Find images of ``group_table`` that the model saw in training or validation (``find_leaks``).

    Args:
        maps: the model folder (its ``groups/train+validation.tsv`` is read when ``train_table`` is None).
        group_table: images to predict (``find_leaks``).
        train_table: training + validation images, same columns.

    Raises:
        DataError: a table lacks one of the columns, so the check cannot be made.
    """
    train = maps.training_pool() if train_table is None else train_table
    return find_leaks(group_table, train, str(maps.layout.train_validation_tsv))


def find_leaks(
    group_table: pd.DataFrame, train_table: pd.DataFrame, train_name: str = "the training table"
) -> list[LeakFinding]:
    """Pairs (group image, training image) that are one image, one scan or, inside one dataset, one participant.

    An image leaks when its preprocessed or raw source file has the sha256 of a training/validation image (the
    same scan under any name, in any dataset), or when its participant id is a training participant's in the
    same dataset (``data.origin.same_dataset``: equal ``dataset_id``, or either unknown or absent).

    Args:
        group_table: images to predict: ``participant_id``, ``session_id``, ``source_sha256``,
            ``raw_source_sha256`` (``n/a`` or empty where unknown), optionally ``dataset_id``.
        train_table: training + validation images, same columns.
        train_name: how messages name ``train_table``.

    Returns:
        Every pair found, participant matches first, in table order.

    Raises:
        DataError: a table lacks one of the required columns, so the check cannot be made.
    """
    group, train = _leak_columns(group_table, "the group table"), _leak_columns(train_table, train_name)
    train = train.add_prefix("train_")
    same_label = group.merge(train, left_on="participant_id", right_on="train_participant_id")
    inside = [same_dataset(a, b) for a, b in zip(same_label["dataset_id"], same_label["train_dataset_id"], strict=True)]
    pairs = [same_label[inside].assign(reason="participant")]
    for column in SHA_COLUMNS:
        known = group[~group[column].isin(["", MISSING])]
        matched = known.merge(train, left_on=column, right_on=f"train_{column}")
        pairs.append(matched.assign(reason=column, sha256=matched[column]))
    found = pd.concat(pairs, ignore_index=True)
    found["sha256"] = found["sha256"].fillna("") if "sha256" in found.columns else ""
    fields = [f.name for f in dataclasses.fields(LeakFinding) if f.name != "similarity"]
    rows = found[fields].astype(str).itertuples(index=False, name=None)
    return [LeakFinding(**dict(zip(fields, row, strict=True))) for row in rows]


def find_label_coincidences(group_table: pd.DataFrame, train_table: pd.DataFrame) -> list[LabelCoincidence]:
    """Group images whose participant label is a training participant's in another, known dataset.

    Args:
        group_table, train_table: as ``find_leaks``; images without ``dataset_id`` are of an unknown dataset
            and never listed here (``find_leaks`` counts them as the same dataset).
    """
    group, train = _leak_columns(group_table, "the group table"), _leak_columns(train_table, "the training table")
    pairs = group.merge(train.add_prefix("train_"), left_on="participant_id", right_on="train_participant_id")
    fields = [f.name for f in dataclasses.fields(LabelCoincidence)]
    return [
        LabelCoincidence(**dict(zip(fields, row, strict=True)))
        for row in pairs[fields].astype(str).itertuples(index=False, name=None)
        if not same_dataset(row[2], row[5])
    ]


def _leak_columns(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """The columns the leak checks read, as strings; ``dataset_id`` ``n/a`` (unknown) when absent."""
    missing = [c for c in ("participant_id", "session_id", *SHA_COLUMNS) if c not in table.columns]
    if missing:
        raise DataError(
            f"Cannot check for leaks: {name} has no column(s) {', '.join(missing)}. The split stage and the "
            "group table must record each image's source_sha256 and raw_source_sha256 (tensor sidecars)."
        )
    columns = ["participant_id", "session_id", *SHA_COLUMNS]
    rows = table[columns].astype(str).reset_index(drop=True)
    dataset = table["dataset_id"].astype(str).to_numpy() if "dataset_id" in table.columns else UNKNOWN
    return rows.assign(dataset_id=dataset)


def write_leak_report(
    group_dir: Path,
    group_name: str,
    findings: list[LeakFinding],
    coincidences: list[LabelCoincidence],
    group_table: pd.DataFrame,
    train_table: pd.DataFrame,
    *,
    refused: bool,
) -> Path:
    """Write ``leak_report.json``: the datasets compared, the rules applied, the leaks and the information pairs.

    Args:
        group_dir: the group's prediction folder.
        group_name: the group's name.
        findings: leaks (``find_leaks`` and ``check_identity_leaks``).
        coincidences: same labels from other datasets (``find_label_coincidences``).
        group_table, train_table: the images compared (``DATASET_COLUMNS`` when known).
        refused: whether the prediction is refused for these findings.

    Returns:
        The report's path.
    """
    path = group_dir / LEAK_REPORT_FILE
    atomic_write_json(
        path,
        {
            "Group": group_name,
            "Rules": {
                "participant": "same participant_id inside one dataset (same dataset_id, or an unknown one)",
                "source_sha256": "same preprocessed image file, any dataset",
                "raw_source_sha256": "same raw scan file, any dataset",
                "fingerprint": "same anatomy (groups/identity_fingerprints.json), any dataset",
            },
            "Datasets": {"Group": _datasets(group_table), "Training": _datasets(train_table)},
            "NImages": len(group_table),
            "Refused": refused,
            "Leaks": [dataclasses.asdict(f) for f in findings],
            "SameLabelOtherDataset": {
                "Message": "These participant labels also name training participants of another dataset. A label "
                "names a person only inside its dataset: not a leak by itself (the checksum and fingerprint rules "
                "cover the same person or scan across datasets).",
                "Pairs": [dataclasses.asdict(c) for c in coincidences],
            },
        },
    )
    return path


def _datasets(table: pd.DataFrame) -> list[dict[str, object]]:
    """One entry per dataset of ``table``: id, name, DOI and number of images."""
    if "dataset_id" not in table.columns:
        return [{"dataset_id": UNKNOWN, "n_images": len(table)}]
    columns = [c for c in DATASET_COLUMNS if c in table.columns]
    counts = table[columns].astype(str).value_counts(sort=False).reset_index(name="n_images")
    return [{str(k): (int(v) if k == "n_images" else v) for k, v in row.items()} for row in counts.to_dict("records")]


def enforce_no_leak(findings: list[LeakFinding], group_name: str, allow_leak: bool, group_dir: Path) -> None:
    """Raise ``LeakError`` for any finding, or with ``allow_leak`` record them in ``leak_warning.json``."""
    if not findings:
        (group_dir / LEAK_WARNING_FILE).unlink(missing_ok=True)  # from an earlier run on other images
        return
    reasons: dict[str, list[str]] = {}  # one entry per image pair, with every reason it was found for
    for f in findings:
        pair = f"{f.participant_id} {f.session_id} ~ {f.train_participant_id} {f.train_session_id}"
        reasons.setdefault(pair, []).append(f.reason + (f" {f.similarity:.3f}" if f.similarity is not None else ""))
    shown = "; ".join(f"{pair} ({', '.join(why)})" for pair, why in list(reasons.items())[:5])
    more = f" and {len(reasons) - 5} more" if len(reasons) > 5 else ""
    identity = any(f.reason == "fingerprint" for f in findings)
    if not allow_leak:
        raise LeakError(
            f"Group '{group_name}' shares {len(reasons)} image pair(s) with the model's training/validation data: "
            f"{shown}{more}. Predict on images the model never saw, or pass --allow-leak to proceed anyway."
            + (f" Identity pairs are listed in the model's groups/{IDENTITY_FILE}." if identity else "")
            + (
                " A participant pair is the same label in the same dataset (same dataset_description.json); if "
                "the two are different datasets, give them a distinct Name or DatasetDOI and re-run the "
                "participant level."
                if any(f.reason == "participant" for f in findings)
                else ""
            )
        )
    log.warning("allow_leak: predicting group '%s' despite %d leak(s): %s%s", group_name, len(reasons), shown, more)
    atomic_write_json(
        group_dir / LEAK_WARNING_FILE,
        {
            "Group": group_name,
            "Message": "The model saw these images (or the same scans) in training/validation; metrics are biased.",
            "Pairs": [dataclasses.asdict(f) for f in findings],
        },
    )


def _pool_volumes(groups_dir: Path, pool: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Low-resolution volumes of the pool's images: re-used from ``groups/`` when made from the same files.

    Returns:
        The pool rows that have a preprocessed image, and their volumes ``(n, x, y, z)``.
    """
    from bids_app.prediction import identity as fingerprint

    keys = pool[["participant_id", "session_id", "source_sha256"]].astype(str).values.tolist()
    record_path, array_path = groups_dir / IDENTITY_FILE, groups_dir / IDENTITY_ARRAY
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("Images") == keys and record.get("FingerprintMM") == fingerprint.FINGERPRINT_MM:
            return pool, np.load(array_path, allow_pickle=False)
    except (OSError, ValueError):
        pass  # no usable cache: compute
    paths = [fingerprint.preprocessed_image_path(Path(p)) for p in pool["tensor_path"]]
    found = [path is not None for path in paths]
    if not all(found):
        log.warning("%d training/validation image(s) have no preprocessed image left: not fingerprinted.",
                    found.count(False))  # fmt: skip
    kept = pool[found].reset_index(drop=True)
    volumes = np.stack([fingerprint.lowres_volume(p) for p in paths if p is not None]) if any(found) else None
    if volumes is not None:
        with atomic_path(array_path) as tmp:
            np.save(tmp, volumes, allow_pickle=False)
    return kept, volumes if volumes is not None else np.zeros((0, 1, 1, 1), np.float32)


def check_identity_leaks(
    maps: Maps, group_table: GroupTable, output_table: TensorIndex, group_name: str
) -> list[LeakFinding]:
    """Images of ``group_table`` whose anatomy matches a training/validation image (``prediction.identity``).

    The training pool's fingerprints are calibrated on its own pairs (same participant, other session; two
    different participants); the calibration, the pool's image list and the pairs found for ``group_name`` are
    recorded in ``groups/identity_fingerprints.json`` (the pool's volumes in ``identity_fingerprints.npy``,
    re-used while the pool's images keep their checksums).

    Args:
        maps: the model folder.
        group_table: images to predict with ``participant_id``, ``session_id``, ``tensor_path``.
        output_table: OUTPUT_DIR's images (``data.tables.index_tensors`` columns): the training pool's files.
        group_name: name recorded with the pairs.

    Returns:
        One ``fingerprint`` finding per (group image, training image) pair above the threshold, most alike
        first; none (with a warning) when the pool has fewer than two participants with images.

    Raises:
        DataError: the group's images were preprocessed on another grid than the pool's.
    """
    from bids_app.prediction import identity as fingerprint

    training = maps.training_pool()
    keys = [c for c in image_keys(training) if c in output_table.columns]  # with cohorts, one label, two people
    pool = (
        training[keys]
        .astype(str)
        .merge(output_table[[*keys, "source_sha256", "tensor_path"]].astype(str), on=keys, how="inner")
    )
    groups_dir = maps.layout.groups_dir
    pool, volumes = _pool_volumes(groups_dir, pool)
    calibration = None
    if len(pool):
        model = fingerprint.fit_model(volumes)
        prints = fingerprint.fingerprints(volumes, model)
        values = fingerprint.features(volumes, model)
        calibration = fingerprint.calibrate(values, subject_ids(pool).tolist(), pool["session_id"].tolist())
    if calibration is None:
        log.warning("Identity check skipped for group '%s': the training pool has fewer than two participants "
                    "with preprocessed images in the output.", group_name)  # fmt: skip
        return []
    paths = [fingerprint.preprocessed_image_path(Path(p)) for p in group_table["tensor_path"]]
    group = group_table[[p is not None for p in paths]].reset_index(drop=True)
    if len(group) < len(group_table):
        log.warning("%d image(s) of group '%s' have no preprocessed image: not fingerprinted.",
                    len(group_table) - len(group), group_name)  # fmt: skip
    findings: list[LeakFinding] = []
    people = subject_ids(pool).tolist()  # <cohort>/<participant> for a multi-cohort pool, as the travelling guard
    if len(group):
        group_prints = fingerprint.fingerprints(np.stack([fingerprint.lowres_volume(p) for p in paths if p]), model)
        for i, j, score in fingerprint.matching_pairs(group_prints, prints, calibration.threshold):
            new, seen = group.iloc[i], pool.iloc[j]
            pair = (str(new["participant_id"]), str(new["session_id"]), people[j])
            findings.append(LeakFinding("fingerprint", *pair, str(seen["session_id"]), "", score))
    record_path = groups_dir / IDENTITY_FILE
    try:
        checks = json.loads(record_path.read_text(encoding="utf-8")).get("Checks", {})
    except (OSError, ValueError, AttributeError):
        checks = {}
    pairs = [dataclasses.asdict(f) for f in findings]
    checks[group_name] = {"NImages": len(group_table), "NFingerprinted": len(group), "Pairs": pairs}
    record = {
        "Description": "Anatomical fingerprints of the training/validation images (bids_app.prediction.identity): "
        "a pair more alike than Calibration.threshold is taken for one person under two names.",
        "FingerprintMM": fingerprint.FINGERPRINT_MM,
        "HighPassMM": fingerprint.HIGH_PASS_MM,
        "Calibration": dataclasses.asdict(calibration),
        "Images": pool[["participant_id", "session_id", "source_sha256"]].values.tolist(),
        "Checks": checks,
    }
    atomic_write_json(record_path, record)
    log.info(
        "Identity check of group '%s': %d pair(s) above the threshold %.3f (different people of the pool: %.3f).",
        group_name,
        len(findings),
        calibration.threshold,
        calibration.max_different,
    )
    return findings
