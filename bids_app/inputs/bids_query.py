"""Finding each participant's input images: a subject-restricted pybids layout, CAPS and derivative inputs.

pybids walks the whole dataset when indexing; on large cohorts that takes minutes. The layout here is built
with an ``ignore`` regex that keeps other participants' folders unvisited, and can persist its SQLite index
(``--bids-database-dir``).

pybids reads entities (subject, session, datatype, acquisition...) with regexes searched over each file's
*absolute* path, so a folder above the dataset root named ``pet``, ``anat``, ``sub-01`` or ``ses-x`` would give
every file that datatype, subject or session. The layout here uses pybids' own configurations with each
entity pattern anchored after the dataset root (:func:`rooted_config`): only the path inside the dataset counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bids_app.config import RunConfig
from bids_app.errors import ConfigError, DataError, FilterError, InputMissingError
from bids_app.kinds import CustomMap, parse_custom_map
from bids_app.template import fits_template

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
SUFFIXES = {"t1w": "T1w", "pet": "pet"}
# raw images by --bids-filter-file kind: (suffix, datatype); T2w and FLAIR are registered through the session's T1w
RAW_KINDS = {"t1w": ("T1w", "anat"), "t2w": ("T2w", "anat"), "flair": ("FLAIR", "anat"), "pet": ("pet", "pet")}
# Clinica CAPS t1-linear and pet-linear outputs, read as already preprocessed input.
CAPS_GLOBS = {
    "t1w": "subjects/sub-*/ses-*/t1_linear/*_T1w.nii.gz",
    "pet": "subjects/sub-*/ses-*/pet_linear/*_pet.nii.gz",
}
CAPS_ENTITY_NAMES = {"sub": "subject", "ses": "session", "trc": "tracer", "acq": "acquisition", "rec": "reconstruction"}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One input image of one participant/session."""

    participant_label: str
    session_label: str | None
    path: Path
    suffix: str  # "T1w", "T2w", "FLAIR" or "pet"
    entities: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    preprocessed: bool = False  # already in template space (CAPS or derivative input)
    custom: bool = False  # a --custom-map: ``suffix`` is the map's name


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


def rooted_config(name: str, root: Path) -> dict[str, Any]:
    """pybids' configuration ``name`` (``"bids"``, ``"derivatives"``) with every entity read inside ``root`` only.

    Each entity pattern is searched after ``root`` and its separator instead of anywhere in the absolute path:
    the folders above the dataset root never give a file an entity.
    """
    from bids.config import get_option

    config: dict[str, Any] = json.loads(Path(get_option("config_paths")[name]).read_text(encoding="utf-8"))
    inside_root = "^" + re.escape(str(root).rstrip("/\\")) + r"(?=[/\\]).*?"
    for entity in config["entities"]:
        if entity.get("pattern"):
            entity["pattern"] = f"{inside_root}(?:{entity['pattern']})"
    return config


def build_layout(root: Path, labels: Sequence[str], database_dir: Path | None = None, derivative: bool = False) -> Any:
    """A pybids layout of ``root`` that indexes only ``labels``' folders, its entities read inside ``root`` only."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    root = Path(root).absolute()  # the prefix of the paths pybids matches entities against

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
    configs = ["bids", "derivatives"] if derivative else ["bids"]
    kwargs: dict[str, Any] = {
        "indexer": indexer,
        "validate": False,
        "is_derivative": derivative,
        "config": [rooted_config(name, root) for name in configs],
    }
    if database_dir is not None:
        tag = "-".join(labels) if len(labels) <= 5 else f"{len(labels)}subjects"
        # the index holds absolute paths and root-anchored patterns: one per dataset location, not per folder name
        location = hashlib.sha256(str(root).encode()).hexdigest()[:8]
        kwargs["database_path"] = database_dir / f"{root.name}_{location}_{tag}"
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


def unused_filters(cfg: RunConfig) -> list[str]:
    """One sentence per ``--bids-filter-file`` key the participant level will not apply, saying why (logged as
    warnings before any image is read, so a filter that changes nothing is never silent).

    ``t2w`` / ``flair`` select raw contrasts, read only with ``--contrasts``; ``pet`` only with ``--pet-tracer``;
    a Clinica CAPS in ``--derivatives`` is read by its pipeline folders (``t1_linear``, ``pet_linear``), so no
    filter applies to it.
    """
    notes = []
    contrasts = {contrast.lower() for contrast in cfg.preprocess.contrasts}
    for key in sorted(cfg.bids_filters):
        contrast = {"t2w": "T2w", "flair": "FLAIR"}.get(key)
        if contrast is not None and key not in contrasts:
            notes.append(
                f"--bids-filter-file key '{key}' has no effect: raw {contrast} images are read only with "
                f"--contrasts {contrast}."
            )
        elif key == "pet" and not cfg.preprocess.pet_tracers:
            notes.append("--bids-filter-file key 'pet' has no effect: PET images are read only with --pet-tracer.")
    caps = [root for root in cfg.preprocess.derivatives_dirs if (root / "subjects").is_dir()]
    applied = [
        key for key in ("pet", "t1w") if key in cfg.bids_filters and (key == "t1w" or cfg.preprocess.pet_tracers)
    ]
    if caps and applied:
        notes.append(
            f"--bids-filter-file key(s) {', '.join(applied)} have no effect on the Clinica CAPS "
            f"{', '.join(map(str, caps))}: a CAPS is read by its pipeline folders (t1_linear, pet_linear), not by "
            "entity filters; rename or remove the images it should not use."
        )
    return notes


def query_raw_images(cfg: RunConfig, participants: Sequence[str], kind: str = "t1w") -> list[ImageRecord]:
    """One raw image per participant/session for ``kind`` (a key of ``RAW_KINDS``: 't1w', 't2w', 'flair',
    'pet'), honouring its ``--bids-filter-file`` filters and the sessions."""
    layout = build_layout(cfg.bids_dir, participants, cfg.bids_database_dir)
    suffix, datatype = RAW_KINDS[kind]
    base: dict[str, Any] = {"suffix": suffix, "datatype": datatype}
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
    if kind == "t1w":
        warn_sessions_without_t1w(cfg, participants, records, "raw")
    return records


def describe_raw_query(cfg: RunConfig, kind: str) -> str:
    """What :func:`query_raw_images` looks for, in words: ``anat/*_FLAIR.nii[.gz] with the filters {...}``."""
    suffix, datatype = RAW_KINDS[kind]
    return f"{datatype}/*_{suffix}.nii[.gz] with the filters {json.dumps(cfg.bids_filters.get(kind, {}))}"


def warn_sessions_without_t1w(
    cfg: RunConfig, participants: Sequence[str], records: Sequence[ImageRecord], source: str
) -> None:
    """One WARNING per session folder of BIDS_DIR (``--session-label`` ones) that no T1w record covers.

    Every image of a participant/session hangs on its T1w (PET is registered to it), so such a session is
    skipped; ``source`` (``"raw"``, ``"preprocessed"``) says which T1w was looked for.
    """
    covered = {(r.participant_label, r.session_label) for r in records}
    where = (
        f"with the active filters {json.dumps(cfg.bids_filters.get('t1w', {}))}"
        if source == "raw"
        else f"in {', '.join(map(str, cfg.preprocess.derivatives_dirs))}"
    )
    for participant in participants:
        for folder in sorted((cfg.bids_dir / f"sub-{participant}").glob("ses-*")):
            session = folder.name.removeprefix("ses-")
            if not folder.is_dir() or (participant, session) in covered:
                continue
            if cfg.session_labels and session not in cfg.session_labels:
                continue
            held = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            log.warning(
                "No T1w for sub-%s ses-%s: skipped (no %s T1w %s; %s holds %s). Add the T1w or exclude the session "
                "with --session-label or --bids-filter-file.",
                participant,
                session,
                source,
                where,
                folder,
                ", ".join(f"{name}/" for name in held) or "no image folder",
            )


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


def query_preprocessed_images(cfg: RunConfig, participants: Sequence[str], kind: str = "t1w") -> list[ImageRecord]:
    """Already preprocessed images of ``kind`` ('t1w' or 'pet') from ``--derivatives`` folders.

    Each folder is a Clinica CAPS (``subjects/``: ``t1_linear/*_T1w.nii.gz``, ``pet_linear/*_pet.nii.gz``) or
    a BIDS derivative (``*_desc-preproc_T1w``; PET ``*_trc-<tracer>_space-<space>_*_pet``, any ``desc``),
    PET only for the tracers of ``--pet-tracer``. Several candidates for one participant/session (and tracer)
    give one record, with a warning (:func:`_pick_preprocessed`): images whose ``space`` fits the template
    (``template.fits_template``) first. A session whose only candidates are in another space (``T1w``, none,
    unknown) keeps one, which the participant job refuses with the fix (``preprocess.template_space``).

    Raises:
        InputMissingError, FilterError: a folder is missing; no T1w at all (no PET is only a warning).
    """
    candidates: list[tuple[int, ImageRecord]] = []  # (position of the folder in --derivatives, record)
    for rank, root in enumerate(cfg.preprocess.derivatives_dirs):
        if not root.is_dir():
            raise InputMissingError(f"Derivatives folder {root} does not exist. Check --derivatives.")
        if (root / "subjects").is_dir():
            found = _query_caps(cfg, root, set(participants), kind)
        else:
            found = _query_derivative(cfg, root, participants, kind)
        candidates.extend(
            (rank, r)
            for r in found
            if (not cfg.session_labels or r.session_label in cfg.session_labels)
            and (kind == "t1w" or r.entities.get("tracer") in cfg.preprocess.pet_tracers)
        )
    if not candidates and kind == "t1w":
        raise_nothing_selected(cfg, participants, kind)
    if not candidates:
        log.warning(
            "No preprocessed PET with tracer(s) %s for participant(s) %s in %s (expected a CAPS "
            "subjects/sub-*/ses-*/pet_linear/*_trc-<tracer>_space-MNI152*_pet.nii.gz or a BIDS derivative "
            "*_trc-<tracer>_space-%s_*_pet.nii.gz). Raw PET is not used with --derivatives (pet-linear needs the "
            "raw T1w): run without -d to process raw T1w and PET.",
            ", ".join(cfg.preprocess.pet_tracers),
            ", ".join(participants),
            ", ".join(map(str, cfg.preprocess.derivatives_dirs)),
            cfg.preprocess.template_space,
        )
    chosen = _pick_preprocessed(candidates, cfg.preprocess.template_space)
    if kind == "t1w":
        warn_sessions_without_t1w(cfg, participants, chosen, "preprocessed")
    return chosen


def _pick_preprocessed(candidates: list[tuple[int, ImageRecord]], template_space: str) -> list[ImageRecord]:
    """One record per participant/session/suffix/tracer among the candidates whose ``space`` fits the template
    (all of them when none does: the job refuses the one kept, naming the fix). Then the first ``--derivatives``
    folder wins, then the template's own space, then a cropped (CAPS ``desc-Crop``) or ``desc-preproc`` image,
    then the highest run (re-scans replace failed ones), then the file name. ``candidates`` pairs each record
    with its folder's position in ``--derivatives``."""

    def preference(candidate: tuple[int, ImageRecord]) -> tuple[int, bool, bool, int, str]:
        rank, record = candidate
        run = str(record.entities.get("run", "0"))
        return (rank, record.entities.get("space") != template_space,
                record.entities.get("desc") not in ("Crop", "preproc"),
                -int(run) if run.isdigit() else 0, record.path.name)  # fmt: skip

    groups: dict[tuple[str, str, str, str], list[tuple[int, ImageRecord]]] = {}
    for rank, r in candidates:
        key = (r.participant_label, r.session_label or "", r.suffix, str(r.entities.get("tracer", "")))
        groups.setdefault(key, []).append((rank, r))
    chosen = []
    for key in sorted(groups):
        fitting = [c for c in groups[key] if fits_template(c[1].entities.get("space"), template_space)]
        if fitting and len(fitting) < len(groups[key]):
            log.debug("sub-%s ses-%s %s: left out, not in a space of the template (%s): %s", key[0], key[1], key[2],
                      template_space, ", ".join(c[1].path.name for c in groups[key] if c not in fitting))  # fmt: skip
        ranked = [record for _, record in sorted(fitting or groups[key], key=preference)]
        if len(ranked) > 1:
            log.warning(
                "sub-%s%s has %d preprocessed %s candidates; using %s. Others: %s. Keep one per session, or "
                "choose with --bids-filter-file (BIDS derivative) or the order of --derivatives.",
                key[0],
                f" ses-{key[1]}" if key[1] else "",
                len(ranked),
                key[2],
                ranked[0].path,
                ", ".join(str(r.path) for r in ranked[1:]),
            )
        chosen.append(ranked[0])
    return chosen


def caps_entities(path: Path) -> dict[str, str]:
    """The entities of a CAPS file name, spelled as pybids does (``sub`` → ``subject``, ``trc`` → ``tracer``...)."""
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    pairs = (part.split("-", 1) for part in name.split("_")[:-1] if "-" in part)
    return {CAPS_ENTITY_NAMES.get(key, key): value for key, value in pairs}


def _query_caps(cfg: RunConfig, root: Path, wanted: set[str], kind: str) -> list[ImageRecord]:
    suffix = SUFFIXES[kind]
    records = []
    for path in sorted(root.glob(CAPS_GLOBS[kind])):
        entities = caps_entities(path)
        subject, session = entities.get("subject"), entities.get("session")
        if subject in wanted and session:
            records.append(ImageRecord(subject, session, path, suffix, entities, preprocessed=True))
    return records


def _query_derivative(cfg: RunConfig, root: Path, participants: Sequence[str], kind: str) -> list[ImageRecord]:
    layout = build_layout(root, participants, None, derivative=True)
    user = _pybids_filters(cfg.bids_filters.get(kind, {}))
    base: dict[str, Any] = {"suffix": "T1w", "desc": "preproc"} if kind == "t1w" else {"suffix": "pet"}
    try:
        files = layout.get(subject=list(participants), extension=NIFTI_EXTENSIONS, **{**base, **user})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Invalid BIDS filter for '{kind}' {user}: {exc}. Use pybids entity names.") from None
    records = []
    for f in files:
        entities = f.get_entities()
        records.append(
            ImageRecord(
                entities["subject"],
                entities.get("session"),
                Path(f.path),
                SUFFIXES[kind],
                dict(entities),
                preprocessed=True,
            )
        )
    return records


def query_custom_maps(cfg: RunConfig, participants: Sequence[str]) -> list[ImageRecord]:
    """The ``--custom-map`` maps of ``participants`` in the ``--derivatives`` folders: one per session and map.

    In a BIDS derivative the map's filters are a pybids query (``suffix``, ``desc``, ``label``, ``space``...);
    in a Clinica CAPS they are matched against the entities of the file names under
    ``subjects/sub-<label>/ses-<label>/`` (pybids names: ``subject``, ``session``, ``tracer``...; ``suffix`` is
    the name's last part). Several candidates are resolved as for preprocessed images
    (:func:`_pick_preprocessed`). A map that selects nothing is a warning naming its filters.

    Raises:
        InputMissingError: a ``--derivatives`` folder is missing. ConfigError: a filter pybids does not know.
    """
    candidates: list[tuple[int, ImageRecord]] = []
    for spec in cfg.preprocess.custom_maps:
        custom_map = parse_custom_map(spec)
        found: list[tuple[int, ImageRecord]] = []
        for rank, root in enumerate(cfg.preprocess.derivatives_dirs):
            if not root.is_dir():
                raise InputMissingError(f"Derivatives folder {root} does not exist. Check --derivatives.")
            if (root / "subjects").is_dir():
                records = _query_caps_map(root, participants, custom_map)
            else:
                records = _query_derivative_map(root, participants, custom_map)
            found.extend((rank, r) for r in records if not cfg.session_labels or r.session_label in cfg.session_labels)
        if not found:
            log.warning(
                "Custom map %s: no file matches %s for participant(s) %s in %s. Check the entities of --custom-map "
                "against the file names (pybids names: suffix, desc, label, space...).",
                custom_map.name,
                dict(custom_map.filters),
                ", ".join(participants),
                ", ".join(map(str, cfg.preprocess.derivatives_dirs)),
            )
        candidates.extend(found)
    return _pick_preprocessed(candidates, cfg.preprocess.template_space)


def _custom_record(entities: dict[str, Any], path: Path, custom_map: CustomMap) -> ImageRecord:
    return ImageRecord(entities["subject"], entities.get("session"), path, custom_map.name, entities,
                       preprocessed=True, custom=True)  # fmt: skip


def _query_caps_map(root: Path, participants: Sequence[str], custom_map: CustomMap) -> list[ImageRecord]:
    records = []
    for participant in participants:
        for path in sorted((root / "subjects" / f"sub-{participant}").glob("ses-*/**/*.nii*")):
            if not path.name.endswith(tuple(NIFTI_EXTENSIONS)):
                continue
            entities: dict[str, Any] = {**caps_entities(path), "suffix": _caps_suffix(path)}
            if entities.get("subject") != participant or not entities.get("session"):
                continue
            if all(str(entities.get(entity)) == value for entity, value in custom_map.filters):
                records.append(_custom_record(entities, path, custom_map))
    return records


def _caps_suffix(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii").split("_")[-1]


def _query_derivative_map(root: Path, participants: Sequence[str], custom_map: CustomMap) -> list[ImageRecord]:
    layout = build_layout(root, participants, None, derivative=True)
    filters = _pybids_filters(dict(custom_map.filters))
    try:
        files = layout.get(subject=list(participants), extension=NIFTI_EXTENSIONS, **filters)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"Invalid --custom-map {custom_map.name} filters {dict(custom_map.filters)}: {exc}. Use pybids entity "
            "names (suffix, desc, label, space, ...)."
        ) from None
    return [_custom_record(dict(f.get_entities()), Path(f.path), custom_map) for f in files]
