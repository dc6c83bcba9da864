"""Finding each participant's input images: a subject-restricted pybids layout, CAPS and derivative inputs.

pybids walks the whole dataset when indexing; on large cohorts that takes minutes. The layout here is built
with an ``ignore`` regex that keeps other participants' folders unvisited, and can persist its SQLite index
(``--bids-database-dir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bids_app.config import RunConfig
from bids_app.errors import ConfigError, DataError, FilterError, InputMissingError

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
# Clinica CAPS t1-linear output, read as already preprocessed input.
CAPS_T1W_GLOB = "subjects/sub-*/ses-*/t1_linear/*_T1w.nii.gz"
CAPS_RE = re.compile(r"sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)_.*_T1w\.nii\.gz$")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One input image of one participant/session."""

    participant_label: str
    session_label: str | None
    path: Path
    suffix: str  # "T1w" or "pet"
    entities: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    preprocessed: bool = False  # already in template space (CAPS or derivative input)


def list_participants(bids_dir: Path) -> list[str]:
    """Bare labels of the ``sub-*`` folders of ``bids_dir`` (no pybids: a directory listing)."""
    if not bids_dir.is_dir():
        raise InputMissingError(f"BIDS_DIR {bids_dir} does not exist or is not a folder. Check the first argument.")
    return sorted(p.name[4:] for p in bids_dir.iterdir() if p.is_dir() and p.name.startswith("sub-"))


def check_dataset(bids_dir: Path) -> None:
    """Refuse what is not a BIDS dataset before anything heavy runs."""
    participants = list_participants(bids_dir)
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise InputMissingError(
            f"{description} is missing: {bids_dir} is not a BIDS dataset. Add a dataset_description.json "
            "(Name, BIDSVersion) or point BIDS_DIR at the dataset root."
        )
    try:
        json.loads(description.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{description} is not valid JSON ({exc}). Fix the file.") from None
    if not participants:
        raise InputMissingError(f"No sub-* folder in {bids_dir}: the dataset has no participant.")


def select_participants(bids_dir: Path, requested: Sequence[str]) -> list[str]:
    """The requested labels (all when empty); a label absent from the dataset is an error (exit 66)."""
    available = list_participants(bids_dir)
    if not requested:
        return available
    missing = [label for label in requested if label not in available]
    if missing:
        shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
        raise InputMissingError(
            f"Participant(s) {', '.join(missing)} not found in {bids_dir} (available: {shown}). "
            "Check --participant-label."
        )
    return list(requested)


def participant_ignore_regex(labels: Iterable[str]) -> re.Pattern[str]:
    """Regex for pybids' indexer that skips every ``sub-*`` folder except ``labels``."""
    alternatives = "|".join(re.escape(label) for label in labels)
    return re.compile(rf"^/sub-(?!({alternatives})(/|$))")


def build_layout(root: Path, labels: Sequence[str], database_dir: Path | None = None, derivative: bool = False) -> Any:
    """A pybids layout of ``root`` that indexes only ``labels``' folders."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore: list[Any] = [
        participant_ignore_regex(labels),
        "code",
        "stimuli",
        "sourcedata",
        "models",
        "derivatives",
        re.compile(r"/\."),
    ]
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    kwargs: dict[str, Any] = {"indexer": indexer, "validate": False, "is_derivative": derivative}
    if database_dir is not None:
        tag = "-".join(labels) if len(labels) <= 5 else f"{len(labels)}subjects"
        kwargs["database_path"] = database_dir / f"{root.name}_{tag}"
    log.debug("Indexing %s for participants %s", root, ", ".join(labels))
    return BIDSLayout(root, **kwargs)


def _pybids_filters(filters: dict[str, Any]) -> dict[str, Any]:
    from bids.layout import Query

    converted = {}
    for key, value in filters.items():
        if value is None:
            converted[key] = Query.NONE
        elif value == "*":
            converted[key] = Query.ANY
        else:
            converted[key] = value
    return converted


def _pick_one(files: list[Any], participant: str, session: str | None) -> Any:
    """Several runs/acquisitions for one session: keep the last run (re-scans replace failed ones) and say so."""
    if len(files) == 1:
        return files[0]
    ranked = sorted(files, key=lambda f: (str(f.get_entities().get("run", "")).zfill(4), f.path))
    chosen = ranked[-1]
    log.warning(
        "sub-%s%s has %d candidate images; using %s (highest run). Others: %s. Use --bids-filter-file to choose.",
        participant,
        f" ses-{session}" if session else "",
        len(files),
        Path(chosen.path).name,
        ", ".join(Path(f.path).name for f in ranked[:-1]),
    )
    return chosen


def query_raw_images(cfg: RunConfig, participants: Sequence[str], kind: str = "t1w") -> list[ImageRecord]:
    """One raw image per participant/session for ``kind`` ('t1w' or 'pet'), honouring filters and sessions."""
    layout = build_layout(cfg.bids_dir, participants, cfg.bids_database_dir)
    base: dict[str, Any] = {
        "suffix": "T1w" if kind == "t1w" else "pet",
        "datatype": "anat" if kind == "t1w" else "pet",
    }
    user = cfg.bids_filters.get(kind, {})
    query = {**base, **_pybids_filters(user)}
    records: list[ImageRecord] = []
    for participant in participants:
        try:
            files = layout.get(subject=participant, extension=NIFTI_EXTENSIONS, **query)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"Invalid BIDS filter for '{kind}' {user}: {exc}. Use pybids entity names.") from None
        by_session: dict[str | None, list[Any]] = {}
        for f in files:
            by_session.setdefault(f.get_entities().get("session"), []).append(f)
        for session in sorted(by_session, key=lambda s: s or ""):
            if cfg.session_labels and session not in cfg.session_labels:
                continue
            chosen = _pick_one(by_session[session], participant, session)
            records.append(
                ImageRecord(participant, session, Path(chosen.path), base["suffix"], dict(chosen.get_entities()))
            )
    if not records and kind == "t1w":
        raise_nothing_selected(cfg, participants, kind)
    return records


def raise_nothing_selected(cfg: RunConfig, participants: Sequence[str], kind: str) -> None:
    active = {
        "participants": list(participants),
        "sessions": list(cfg.session_labels),
        kind: cfg.bids_filters.get(kind, {}),
    }
    if cfg.bids_filters.get(kind) or cfg.session_labels:
        raise FilterError(
            f"The active filters selected no {kind} image in {cfg.bids_dir}: {json.dumps(active)}. "
            "Relax --bids-filter-file / --session-label."
        )
    raise InputMissingError(
        f"No {kind} image for participant(s) {', '.join(participants)} in {cfg.bids_dir} "
        "(expected sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]). Check the dataset."
    )


def query_preprocessed_images(cfg: RunConfig, participants: Sequence[str]) -> list[ImageRecord]:
    """Already preprocessed T1w from ``--derivatives`` folders (BIDS derivative or Clinica CAPS)."""
    records: list[ImageRecord] = []
    wanted = set(participants)
    for root in cfg.preprocess.derivatives_dirs:
        if not root.is_dir():
            raise InputMissingError(f"Derivatives folder {root} does not exist. Check --derivatives.")
        if (root / "subjects").is_dir():
            found = _query_caps(root, wanted)
        else:
            found = _query_derivative(cfg, root, participants)
        records.extend(r for r in found if not cfg.session_labels or r.session_label in cfg.session_labels)
    if not records:
        raise_nothing_selected(cfg, participants, "t1w")
    return sorted(records, key=lambda r: (r.participant_label, r.session_label or ""))


def _query_caps(root: Path, wanted: set[str]) -> list[ImageRecord]:
    records = []
    for path in sorted(root.glob(CAPS_T1W_GLOB)):
        match = CAPS_RE.search(path.name)
        if match and match["sub"] in wanted:
            records.append(ImageRecord(match["sub"], match["ses"], path, "T1w", {"space": "caps"}, preprocessed=True))
    return records


def _query_derivative(cfg: RunConfig, root: Path, participants: Sequence[str]) -> list[ImageRecord]:
    layout = build_layout(root, participants, None, derivative=True)
    user = _pybids_filters(cfg.bids_filters.get("t1w", {}))
    query = {"suffix": "T1w", "desc": "preproc", "extension": NIFTI_EXTENSIONS, **user}
    records = []
    for f in layout.get(subject=list(participants), **query):
        entities = f.get_entities()
        if not str(entities.get("space", "")).startswith("MNI152") and "space" not in user:
            continue
        records.append(
            ImageRecord(
                entities["subject"],
                entities.get("session"),
                Path(f.path),
                "T1w",
                dict(entities),
                preprocessed=True,
            )
        )
    return records
