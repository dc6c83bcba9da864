"""The index of extracted tensors in an output folder, and the joins of split tables onto it.

``index_tensors`` lists the trusted tensors of one mode with a single directory walk (one row per image, columns
``INDEX_COLUMNS``); ``verify_tensors`` checks their bytes against the checksums their sidecars recorded;
``sample_shape`` checks that their samples share one shape; ``encode_labels`` maps class names
to indices; ``rows_for`` joins a split table's images onto the labelled index; ``external_table`` indexes
another participant-level output (a group to predict) with the labels its raw dataset holds. ``data.dataset``
turns such rows into samples.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import pandas as pd

from bids_app.config import ExtractionMode, LabelConfig
from bids_app.data.origin import DATASET_COLUMNS, SIDECAR_KEY, DatasetIdentity, read_dataset_identity
from bids_app.derivatives import file_sha256
from bids_app.errors import DataError, InputMissingError, IOFailure
from bids_app.extraction.storage import read_sidecar
from bids_app.labels import COHORT, NO_SESSION, image_keys
from bids_app.labels import NA as MISSING

log = logging.getLogger(__name__)

INDEX_COLUMNS = (
    "participant_id",
    "session_id",
    "tensor_path",
    "n_parts",
    "sample_shape",
    "source_sha256",
    "raw_source_sha256",
    "tensor_sha256",
    *DATASET_COLUMNS,
)
UNLABELLED = "n/a"

# The tables that cross stage boundaries. pandas has no typed columns: these names say which columns a table
# holds, so a signature tells what it expects.
TensorIndex: TypeAlias = pd.DataFrame
"""``index_tensors`` rows: one per image of one mode, the ``INDEX_COLUMNS``."""
GroupTable: TypeAlias = pd.DataFrame
"""A ``TensorIndex`` joined with the label table (``labels.TABLE_COLUMNS``: ``participant_id``, ``session_id``,
``label``, age, sex...): one row per labelled image; ``n/a`` labels for a group predicted without labels."""
LabelTable: TypeAlias = pd.DataFrame
"""Label-table rows without tensors (``labels.TABLE_COLUMNS``), e.g. one side of a split."""
_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_")
MAX_HASH_THREADS = 8  # hashlib and file reads release the GIL: threads hash several tensors at once
N_NAMED = 5  # bad files named in one message


def index_tensors(output_dir: Path, mode: ExtractionMode, suffix: str = "T1w") -> TensorIndex:
    """Table of the complete tensors of ``mode`` under ``output_dir`` (one directory walk).

    Args:
        output_dir: the participant-level output (BIDS derivative) folder.
        mode: extraction mode to list.
        suffix: image suffix, ``T1w`` or ``pet``.

    Returns:
        One row per image sorted by participant and session, columns ``INDEX_COLUMNS``: BIDS-prefixed ids
        (``session_id`` is ``n/a`` without sessions), ``tensor_path`` (absolute), ``n_parts`` (1 in image
        mode), ``sample_shape`` (tuple ``(1, ...)`` of one sample), the sidecar's source checksums and the
        image's source dataset (``data.origin.DATASET_COLUMNS``: the sidecar's ``SourceDataset``, else the raw
        dataset ``output_dir`` links to, else ``n/a``). Tensors whose sidecar is missing, unreadable or not
        ``Complete`` are skipped with a warning.

    Raises:
        DataError: two tensors of this mode and suffix belong to one participant and session.
    """
    pattern = f"sub-*/**/deeplearning/sub-*_desc-{mode.value}_{suffix}.json"
    rows = []
    linked: DatasetIdentity | None = None  # the raw dataset output_dir links to, read once if a sidecar lacks one
    for json_path in sorted(Path(output_dir).glob(pattern)):
        tensor_path = json_path.with_suffix(".npy")
        match = _NAME.match(json_path.name)
        if match is None:
            continue
        try:
            sidecar = read_sidecar(json_path)
        except (DataError, InputMissingError) as exc:
            log.warning("Skipping tensor %s: %s", tensor_path, exc)
            continue
        if sidecar.get("Complete") is not True or not tensor_path.is_file():
            log.warning("Skipping incomplete tensor %s (re-run the participant level for it).", tensor_path)
            continue
        shape = tuple(int(v) for v in sidecar.get("Shape", ()))
        if sidecar.get("Mode", mode.value) != mode.value or len(shape) < 3:
            log.warning("Skipping tensor %s: sidecar Mode %r, Shape %s.", tensor_path, sidecar.get("Mode"), shape)
            continue
        session = match.group("ses")
        identity = DatasetIdentity.from_sidecar(sidecar.get(SIDECAR_KEY))
        if identity is None:
            if linked is None:
                raw_dir = _raw_dataset(Path(output_dir))
                linked = read_dataset_identity(raw_dir) if raw_dir is not None else DatasetIdentity()
            identity = linked
        rows.append(
            {
                "participant_id": f"sub-{match.group('sub')}",
                "session_id": f"ses-{session}" if session else NO_SESSION,
                "tensor_path": str(tensor_path.absolute()),
                "n_parts": 1 if mode is ExtractionMode.IMAGE else shape[0],
                "sample_shape": shape if mode is ExtractionMode.IMAGE else shape[1:],
                "source_sha256": sidecar.get("SourceSHA256", ""),
                "raw_source_sha256": sidecar.get("RawSourceSHA256", ""),
                "tensor_sha256": sidecar.get("TensorSHA256", ""),
                **identity.columns(),
            }
        )
    table = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    duplicated = table.duplicated(["participant_id", "session_id"], keep=False)
    if duplicated.any():
        paths = ", ".join(table.loc[duplicated, "tensor_path"].head(4))
        raise DataError(
            f"Several {mode.value} tensors with suffix {suffix} for one participant and session: {paths}. "
            "Restrict the images with --bids-filter-file (e.g. one run or one tracer) and re-run the participant "
            "level."
        )
    return table.sort_values(["participant_id", "session_id"], ignore_index=True)


def verify_tensors(table: GroupTable) -> None:
    """Check every row's tensor file against the ``TensorSHA256`` its sidecar recorded when it was written.

    Files are hashed in 1 MiB chunks, several at once. A tensor written by a bids_app that recorded no checksum
    is accepted; one warning counts all such tensors.

    Args:
        table: rows with ``tensor_path`` (and ``participant_id``, which names the participants to re-run).

    Raises:
        DataError: a tensor's bytes differ from its recorded checksum (zeroed, swapped, edited): up to
            ``N_NAMED`` files are named, with the participant-level command that extracts them again.
        InputMissingError: a tensor or its sidecar no longer exists.
        IOFailure: a tensor cannot be read.
    """
    paths = list(dict.fromkeys(str(p) for p in table["tensor_path"]))
    recorded = {path: str(read_sidecar(Path(path)).get("TensorSHA256") or "") for path in paths}
    unrecorded = [path for path in paths if not recorded[path]]
    checked = [path for path in paths if recorded[path]]
    with cf.ThreadPoolExecutor(max(1, min(MAX_HASH_THREADS, os.cpu_count() or 1, len(checked)))) as pool:
        actual = dict(zip(checked, pool.map(_tensor_sha256, checked), strict=True))
    if unrecorded:
        log.warning(
            "%d tensor(s) have no TensorSHA256 in their sidecar (written by an older bids_app) and are used "
            "unchecked, e.g. %s. Re-run the participant level with --overwrite to record their checksums.",
            len(unrecorded),
            unrecorded[0],
        )
    changed = [path for path in checked if actual[path] != recorded[path]]
    if not changed:
        return
    named = "; ".join(
        f"{path} changed since it was extracted (sha256 {actual[path][:12]}…, recorded {recorded[path][:12]}…)"
        for path in changed[:N_NAMED]
    )
    more = f"; and {len(changed) - N_NAMED} more" if len(changed) > N_NAMED else ""
    by_path = dict(zip(table["tensor_path"].astype(str), table["participant_id"].astype(str), strict=True))
    labels = " ".join(dict.fromkeys(by_path[path].removeprefix("sub-") for path in changed))
    raise DataError(
        f"{len(changed)} tensor(s) differ from the checksum recorded when they were written: {named}{more}. "
        f"Re-run the participant level with --overwrite --participant-label {labels} to extract them again."
    )


def _tensor_sha256(path: str) -> str:
    try:
        return file_sha256(Path(path))
    except FileNotFoundError:
        raise InputMissingError(f"Tensor {path} does not exist. Re-run the participant level for this image.") from None
    except OSError as exc:
        raise IOFailure(f"Cannot read tensor {path}: {exc}. Check the disk, then re-run.") from exc


def encode_labels(labels: Sequence[str], classes: Sequence[str] = ()) -> dict[str, int]:
    """Deterministic class → index mapping: ``classes`` in the given order, else the sorted distinct labels.

    Unlabelled values (``n/a``, empty) are not classes.
    """
    names = list(classes) if classes else sorted({str(v) for v in labels} - {UNLABELLED, ""})
    return {name: index for index, name in enumerate(names)}


def sample_shape(table: TensorIndex, mode: ExtractionMode) -> tuple[int, ...]:
    """The common shape ``(1, ...)`` of one sample; DataError naming two files when they differ."""
    if "sample_shape" in table.columns:
        shapes = [tuple(int(v) for v in s) for s in table["sample_shape"]]
    else:
        shapes = []
        for path in table["tensor_path"]:
            shape = tuple(int(v) for v in read_sidecar(Path(path))["Shape"])
            shapes.append(shape if mode is ExtractionMode.IMAGE else shape[1:])
    distinct = sorted(set(shapes))
    if len(distinct) != 1:
        first = [table["tensor_path"].iloc[shapes.index(s)] for s in distinct[:2]]
        raise DataError(
            f"Samples differ in shape: {distinct[:2]} ({first[0]} vs {first[-1]}). Extract every image with the "
            "same preprocessing and extraction options."
        )
    return distinct[0]


def rows_for(ids: LabelTable, table: GroupTable, what: str) -> GroupTable:
    """Rows of ``table`` (labels + tensors) for the images a split table ``ids`` lists, in ``ids``' order.

    Raises:
        DataError: an image of ``ids`` has no tensor or no label in ``table``.
    """
    keys = image_keys(ids) if COHORT in table.columns else ["participant_id", "session_id"]
    rows = ids[keys].astype(str).merge(table, on=keys, how="left", indicator=True)
    missing = rows[rows["_merge"] != "both"]
    if not missing.empty:
        first = missing.iloc[0]
        raise DataError(
            f"{len(missing)} image(s) of the {what} have no tensor or label (e.g. {first['participant_id']} "
            f"{first['session_id']}). Re-run the participant level for them or re-run --stages split."
        )
    return rows.drop(columns="_merge")


def _raw_dataset(output_dir: Path) -> Path | None:
    """The raw BIDS dataset a participant-level output links to (``DatasetLinks.raw``), if readable."""
    try:
        description = json.loads((output_dir / "dataset_description.json").read_text(encoding="utf-8"))
        link = str(description["DatasetLinks"]["raw"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(urllib.parse.urlparse(link).path) if link.startswith("file:") else output_dir / link
    return path.resolve() if path.is_dir() else None


def external_table(predict_from: Path, mode: ExtractionMode, labels_cfg: LabelConfig) -> GroupTable:
    """Images of another participant-level output, labelled when its raw dataset's tables have the label.

    Returns:
        ``index_tensors`` rows plus ``label`` (``n/a`` for every image when no label can be read).

    Raises:
        InputMissingError: ``predict_from`` has no complete tensor of the MAPS' mode.
    """
    from bids_app.labels import load_labels

    tensors = index_tensors(predict_from, mode)
    if tensors.empty:
        raise InputMissingError(
            f"No complete {mode.value} tensors in {predict_from}. Run the participant level on that dataset "
            f"with --modes {mode.value}."
        )
    raw_dir = _raw_dataset(predict_from)
    if raw_dir is not None:
        try:
            labels = load_labels(raw_dir, labels_cfg, sessions=tensors[["participant_id", "session_id"]])
            return tensors.merge(labels[["participant_id", "session_id", "label"]], how="left").fillna(
                {"label": MISSING}
            )
        except (InputMissingError, DataError) as exc:
            log.warning("Predicting %s without labels: %s", predict_from, exc)
    return tensors.assign(label=MISSING)
