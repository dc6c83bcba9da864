"""The index of extracted tensors in an output folder, and the joins of split tables onto it.

``index_tensors`` lists the trusted tensors of one mode with a single directory walk per image kind (one row per
image, columns ``INDEX_COLUMNS``); with several kinds (a model's channels, ``--channels T1w FLAIR``)
``index_channels`` joins them per session, leaves out and lists the sessions that lack one, and gives each row its
files in channel order (``CHANNEL_PATHS``); ``verify_tensors`` checks their bytes against the checksums
their sidecars recorded; ``sample_shape`` checks that their samples share one shape; ``encode_labels`` maps
class names to indices; ``rows_for`` joins a split table's images onto the labelled index; ``external_table`` indexes
another participant-level output (a group to predict) with the labels its raw dataset holds. ``data.dataset``
turns such rows into samples.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
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
from bids_app.data.origin import CHANNEL_PATHS, DATASET_COLUMNS, SIDECAR_KEY, DatasetIdentity, read_dataset_identity
from bids_app.derivatives import file_sha256
from bids_app.errors import DataError, InputMissingError, IOFailure
from bids_app.extraction.storage import read_sidecar
from bids_app.kinds import T1W, ImageKind, parse_kind
from bids_app.labels import COHORT, NO_SESSION, image_keys
from bids_app.labels import NA as MISSING

log = logging.getLogger(__name__)

FILE_COLUMNS = (  # what one tensor file of one kind contributes
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
INDEX_COLUMNS = (*FILE_COLUMNS, CHANNEL_PATHS)
UNLABELLED = "n/a"
EXCLUDED_COLUMNS = ("participant_id", "session_id", "missing_kinds")  # sessions lacking a channel
DEFAULT_KINDS = (parse_kind(T1W),)
N_SHOWN = 3  # sessions named in the warning about sessions left out

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


def index_tensors(
    output_dir: Path, mode: ExtractionMode, kinds: ImageKind | Sequence[ImageKind] = DEFAULT_KINDS
) -> TensorIndex:
    """The complete sessions' tensors of ``mode`` and ``kinds`` under ``output_dir`` (``index_channels(...).tensors``).

    Sessions that lack one of the kinds are left out with a warning (``index_channels``).
    """
    return index_channels(output_dir, mode, kinds).tensors


@dataclasses.dataclass(frozen=True)
class ChannelIndex:
    """The tensors of one output folder for the channels of a model, and the sessions left out.

    Attributes:
        kinds: the channels, in order.
        tensors: one row per session that has every kind, ``INDEX_COLUMNS`` (those of ``FILE_COLUMNS`` from the
            first kind's file, then ``CHANNEL_PATHS``), sorted by participant and session.
        excluded: one row per session that has some kinds but not all, ``EXCLUDED_COLUMNS``
            (``missing_kinds``: the kinds it lacks, comma-separated in channel order).
    """

    kinds: tuple[ImageKind, ...]
    tensors: TensorIndex
    excluded: pd.DataFrame


def index_channels(
    output_dir: Path, mode: ExtractionMode, kinds: ImageKind | Sequence[ImageKind] = DEFAULT_KINDS
) -> ChannelIndex:
    """The tensors of ``mode`` of every kind in ``kinds`` under ``output_dir``, joined per participant and session.

    Each kind is listed with one directory walk (``_index_kind``); a session is kept when every kind has a
    complete tensor for it, and its channels must agree in sample shape, number of parts and mode parameters. A
    session with some kinds but not all is left out, never padded: one warning counts them and names the first
    few, and ``ChannelIndex.excluded`` lists them all.

    Args:
        output_dir: the participant-level output (BIDS derivative) folder.
        mode: extraction mode to list.
        kinds: one kind, or the channels of a sample in order (default: T1w alone).

    Returns:
        The joined index: ``tensor_path``, checksums and dataset columns of the first kind, ``CHANNEL_PATHS``
        (one tensor per kind, in order), ``tensor_sha256`` of every channel joined by ``+`` when there are several.

    Raises:
        DataError: two tensors of one kind for one session, or two channels of one session that differ in
            sample shape, parts or mode parameters (both files named).
    """
    kinds = (kinds,) if isinstance(kinds, ImageKind) else tuple(kinds)
    per_kind = [_index_kind(Path(output_dir), mode, kind) for kind in kinds]
    keys = ["participant_id", "session_id"]
    table = per_kind[0]
    for kind, other in zip(kinds[1:], per_kind[1:], strict=False):
        columns = ["tensor_path", "n_parts", "sample_shape", "tensor_sha256", "_parameters"]
        renamed = other[[*keys, *columns]].rename(columns={c: f"{c}@{kind.name}" for c in columns})
        table = table.merge(renamed, on=keys, how="inner")
    sessions = [set(zip(t["participant_id"], t["session_id"], strict=True)) for t in per_kind]
    complete = set.intersection(*sessions) if sessions else set()
    partial = sorted(set.union(*sessions) - complete) if sessions else []
    excluded = pd.DataFrame(
        [
            (participant, session, ",".join(k.name for k, s in zip(kinds, sessions, strict=True)
                                            if (participant, session) not in s))
            for participant, session in partial
        ],
        columns=list(EXCLUDED_COLUMNS),
    )  # fmt: skip
    if len(excluded):
        shown = "; ".join(f"{r.participant_id} {r.session_id} lacks {r.missing_kinds}"
                          for r in excluded.head(N_SHOWN).itertuples())  # fmt: skip
        log.warning("%d session(s) of %s lack one of the channels %s and are left out (never zero-padded): %s%s.",
                    len(excluded), output_dir, ", ".join(k.name for k in kinds), shown,
                    " ..." if len(excluded) > N_SHOWN else "")  # fmt: skip
    paths = [table["tensor_path"], *(table[f"tensor_path@{k.name}"] for k in kinds[1:])]
    table[CHANNEL_PATHS] = list(zip(*paths, strict=True)) if len(table) else []
    for kind in kinds[1:]:
        _check_channels_agree(table, kinds[0], kind, mode)
    if len(kinds) > 1:
        shas = [table["tensor_sha256"], *(table[f"tensor_sha256@{k.name}"] for k in kinds[1:])]
        table["tensor_sha256"] = ["+".join(values) for values in zip(*shas, strict=True)] if len(table) else []
    table = table[list(INDEX_COLUMNS)]
    return ChannelIndex(kinds, table.sort_values(keys, ignore_index=True), excluded)


def _check_channels_agree(table: pd.DataFrame, first: ImageKind, kind: ImageKind, mode: ExtractionMode) -> None:
    """DataError naming both files when a session's ``kind`` tensor is cut otherwise than its ``first`` one."""
    suffix = f"@{kind.name}"
    for what, column in (("sample shape", "sample_shape"), ("number of parts", "n_parts"),
                         ("mode parameters", "_parameters")):  # fmt: skip
        differs = [a != b for a, b in zip(table[column], table[column + suffix], strict=True)]
        if any(differs):
            row = table[differs].iloc[0]
            raise DataError(
                f"The {first.name} and {kind.name} {mode.value} tensors of {row['participant_id']} "
                f"{row['session_id']} differ in {what} ({row[column]} vs {row[column + suffix]}): "
                f"{row['tensor_path']} vs {row['tensor_path' + suffix]}. Stacked as channels they must be cut "
                "alike: re-run the participant level for both kinds with the same extraction options (--overwrite)."
            )


def _index_kind(output_dir: Path, mode: ExtractionMode, kind: ImageKind) -> pd.DataFrame:
    """Table of the complete tensors of ``mode`` and ``kind`` under ``output_dir`` (one directory walk).

    Returns:
        One row per image sorted by participant and session, columns ``FILE_COLUMNS``: BIDS-prefixed ids
        (``session_id`` is ``n/a`` without sessions), ``tensor_path`` (absolute), ``n_parts`` (1 in image
        mode), ``sample_shape`` (tuple ``(1, ...)`` of one sample), the sidecar's source checksums and the
        image's source dataset (``data.origin.DATASET_COLUMNS``: the sidecar's ``SourceDataset``, else the raw
        dataset ``output_dir`` links to, else ``n/a``), and ``_parameters`` (the sidecar's ``ModeParameters``
        as JSON). A tensor whose name lacks the kind's entities (another tracer) is not its kind. Tensors whose
        sidecar is missing, unreadable or not ``Complete`` are skipped with a warning.

    Raises:
        DataError: two tensors of this mode and kind belong to one participant and session.
    """
    pattern = f"sub-*/**/deeplearning/sub-*_desc-{mode.value}_{kind.suffix}.json"
    wanted = set(kind.extra_entities.split("_")) - {""}
    rows = []
    linked: DatasetIdentity | None = None  # the raw dataset output_dir links to, read once if a sidecar lacks one
    for json_path in sorted(Path(output_dir).glob(pattern)):
        tensor_path = json_path.with_suffix(".npy")
        match = _NAME.match(json_path.name)
        if match is None or not wanted <= set(json_path.name.split("_")):
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
                "_parameters": json.dumps(sidecar.get("ModeParameters") or {}, sort_keys=True),
            }
        )
    table = pd.DataFrame(rows, columns=[*FILE_COLUMNS, "_parameters"])
    duplicated = table.duplicated(["participant_id", "session_id"], keep=False)
    if duplicated.any():
        paths = ", ".join(table.loc[duplicated, "tensor_path"].head(4))
        raise DataError(
            f"Several {mode.value} {kind.name} tensors for one participant and session: {paths}. "
            "Restrict the images with --bids-filter-file (e.g. one run or one tracer) and re-run the participant "
            "level."
        )
    return table.sort_values(["participant_id", "session_id"], ignore_index=True)


def channel_paths(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """Each row's tensor files, one per channel in order (``CHANNEL_PATHS``; ``(tensor_path,)`` without it)."""
    if CHANNEL_PATHS in table.columns:
        return [tuple(str(p) for p in paths) for paths in table[CHANNEL_PATHS]]
    return [(str(path),) for path in table["tensor_path"]]


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
    paths = list(dict.fromkeys(path for paths in channel_paths(table) for path in paths))
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
    by_path = {path: str(participant) for paths, participant in zip(channel_paths(table), table["participant_id"],
                                                                     strict=True) for path in paths}  # fmt: skip
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
    """The common shape ``(C, ...)`` of one sample (``C`` channels); DataError naming two files when they differ."""
    paths = channel_paths(table)
    shape = _channel_shape(table, mode)
    return (len(paths[0]), *shape[1:])  # index_channels gives every row of a table the same channels


def _channel_shape(table: TensorIndex, mode: ExtractionMode) -> tuple[int, ...]:
    """The common shape ``(1, ...)`` of one channel of a sample."""
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


def external_table(
    predict_from: Path, mode: ExtractionMode, labels_cfg: LabelConfig, kinds: Sequence[ImageKind] = DEFAULT_KINDS
) -> GroupTable:
    """Images of another participant-level output, labelled when its raw dataset's tables have the label.

    Args:
        predict_from: the other participant-level output.
        mode: the model's mode.
        labels_cfg: the model's label options.
        kinds: the model's channels; a session lacking one is left out with a warning (``index_channels``).

    Returns:
        ``index_tensors`` rows plus ``label`` (``n/a`` for every image when no label can be read).

    Raises:
        InputMissingError: ``predict_from`` has no session with a complete tensor of the model's mode for every
            one of its channels (the kinds it lacks named).
    """
    from bids_app.labels import load_labels

    tensors = index_tensors(predict_from, mode, kinds)
    if tensors.empty:
        check_kinds_present(predict_from, mode, kinds, model="")
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


def check_kinds_present(
    output_dir: Path, mode: ExtractionMode, kinds: Sequence[ImageKind], *, model: str | None = None
) -> None:
    """InputMissingError naming the kinds of ``kinds`` that have no complete ``mode`` tensor in ``output_dir``.

    An output without one of the channels' kinds has no complete session: the message says which kind is
    missing and how the participant level makes it, rather than that nothing was found. T1w alone missing is
    left to the callers' own message (no tensor of the mode).

    Args:
        output_dir: a participant-level output.
        mode: the extraction mode.
        kinds: the channels.
        model: the name of the model whose channels these are when predicting ("" if unknown), None when training.
    """
    absent = [kind for kind in kinds if _index_kind(Path(output_dir), mode, kind).empty]
    if not absent or [k.name for k in absent] == [k.name for k in kinds] == [T1W]:
        return
    how = "; ".join(f"{kind.name}: {participant_option(kind)}" for kind in absent)
    whose = "the model reads channels" if model == "" else f"model {model} reads channels"
    if model is None:
        whose = "the channels (--channels) are"
    fix = ", or train on kinds it has (--channels)" if model is None else ""
    raise InputMissingError(
        f"{output_dir} has no {mode.value} tensor of {', '.join(k.name for k in absent)}, but {whose} "
        f"{', '.join(k.name for k in kinds)}. Run the participant level on it with --modes {mode.value} and the "
        f"option that makes each missing kind ({how}){fix}."
    )


def participant_option(kind: ImageKind) -> str:
    """The participant-level option that makes tensors of ``kind`` (for messages)."""
    if kind.tracer is not None:
        return f"--pet-tracer {kind.tracer}"
    if kind.custom:
        return f"--custom-map {kind.name}=..."
    if kind.name == T1W:
        return "T1w is always processed"
    return f"--contrasts {kind.name}"
