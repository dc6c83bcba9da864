"""Label tables from BIDS_DIR's participants.tsv, sub-*/sub-*_sessions.tsv and phenotype/, and demographics.

The group level reads these tables, never the raw images. ``load_labels`` returns one row per image
(participant/session), sorted in natural order (``sub-2`` before ``sub-10``, ``ses-M6`` before ``ses-M12``):

============== ======================================================================================
participant_id ``sub-01``
session_id     ``ses-M000``, or ``n/a`` for a dataset without sessions
label          ``str`` (classification, reconstruction) or ``float`` (regression)
age            ``float`` years; NaN when unknown (``89+`` reads as 89)
sex            ``M``, ``F``, ``O`` (``male``/``female``/``other`` normalised) or as given; ``n/a`` when unknown
is_baseline    ``bool``: the participant's first session, in natural order, among the kept pairs
============== ======================================================================================

Where a value comes from: a participant whose ``sessions.tsv`` has the column takes it from there (an
``n/a`` there stays missing: a later visit's diagnosis is not the baseline one); otherwise from
``participants.tsv``; a label column found in neither is looked up in ``phenotype/*.tsv`` (joined on
``participant_id`` and, when the phenotype file has it, ``session_id``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from bids_app.config import LabelConfig, Task
from bids_app.errors import DataError, InputMissingError

log = logging.getLogger(__name__)

NA = "n/a"  # BIDS's spelling of a missing value, in every TSV bids_app reads or writes
NO_SESSION = NA  # session_id of a dataset without sessions
MISSING_VALUES = frozenset({"", NA})
TABLE_COLUMNS = ("participant_id", "session_id", "label", "age", "sex", "is_baseline")
# A multi-cohort group run's tables lead with this column (docs/cohorts.md): a participant label names a person
# only inside one dataset, so two cohorts' sub-001 are two people. Single-cohort tables do not have it.
COHORT = "cohort"
_SEX_SPELLINGS = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_SOURCES = ("sessions", "participants", "phenotype")


def natural_key(value: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs numerically: ``sub-2`` < ``sub-10``, ``ses-M6`` < ``ses-M12``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", value) if part)


def image_keys(table: pd.DataFrame) -> list[str]:
    """The columns naming one image of ``table``: ``participant_id``, ``session_id``, led by ``cohort`` if any."""
    return [*([COHORT] if COHORT in table.columns else []), "participant_id", "session_id"]


def subject_ids(table: pd.DataFrame) -> pd.Series:
    """Who each row is: ``participant_id``, or ``<cohort>/<participant_id>`` in a multi-cohort table."""
    ids = table["participant_id"].astype(str)
    return table[COHORT].astype(str) + "/" + ids if COHORT in table.columns else ids


def image_names(table: pd.DataFrame) -> list[str]:
    """How records name each row's image: ``sub-01 ses-M000``, or ``<cohort>/sub-01 ses-M000`` with cohorts."""
    sessions = table["session_id"].astype(str)
    return [f"{who} {session}" for who, session in zip(subject_ids(table), sessions, strict=True)]


def sort_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by ([cohort], participant_id, session_id) in natural order, index reset; input order is moot."""
    cohorts = table[COHORT].astype(str) if COHORT in table.columns else [""] * len(table)
    keys = [
        (natural_key(c), natural_key(p), natural_key(s))
        for c, p, s in zip(cohorts, table["participant_id"], table["session_id"], strict=True)
    ]
    order = sorted(range(len(table)), key=keys.__getitem__)
    return table.iloc[order].reset_index(drop=True)


def read_tsv(path: Path) -> pd.DataFrame:
    """A BIDS TSV as strings (``n/a`` kept verbatim), names and values stripped; unreadable → DataError."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path} as a tab-separated table ({exc}). Fix the file.") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.str.strip())


def _require_columns(table: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        header = ", ".join(table.columns)
        if len(table.columns) == 1 and any(sep in header for sep in (",", ";")):
            raise DataError(
                f"{path} is not tab-separated: its header is one column '{header}'. BIDS tables separate columns "
                "with tabs; convert the file (e.g. save it as TSV, not CSV)."
            )
        raise DataError(
            f"{path} has no column {', '.join(missing)} (columns: {header}). "
            "Add it: BIDS tables start with participant_id (and session_id in sessions.tsv)."
        )


def _unlisted(pairs: pd.DataFrame, listed: set[str], path: Path) -> None:
    """DataError for participants with outputs but no row in ``path``, naming ids that differ only in form."""
    absent = sorted(set(pairs["participant_id"]) - listed, key=natural_key)
    if not absent:
        return
    rows = pairs[pairs["participant_id"].isin(absent)]

    def number(participant_id: str) -> str:
        bare = participant_id.removeprefix("sub-")
        return (bare.lstrip("0") or "0") if bare.isdigit() else bare.lower()

    by_form = {number(p): p for p in listed}
    near = [f"{p} (listed as {by_form[number(p)]})" for p in absent if number(p) in by_form]
    hint = (
        f" The table spells some ids differently from the folders: {', '.join(near[:5])}; ids must match the "
        "sub-<label> folder names exactly."
        if near
        else " Add a row for each."
    )
    raise DataError(f"{len(absent)} participant(s) with images have no row in {path}: {_list_rows(rows)}.{hint}")


def _check_unique(table: pd.DataFrame, path: Path, key: list[str]) -> None:
    duplicated = table[table.duplicated(key, keep=False)]
    if len(duplicated):
        shown = ", ".join(sorted({" ".join(row) for row in duplicated[key].itertuples(index=False)})[:10])
        raise DataError(f"{path} lists some rows twice: {shown}. Keep one row per {' / '.join(key)}.")


def _read_sessions(bids_dir: Path) -> pd.DataFrame | None:
    """Every sub-*/sub-*_sessions.tsv, with participant_id added; a column absent from a file is NaN."""
    parts = []
    for path in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        table = read_tsv(path)
        _require_columns(table, path, ("session_id",))
        _check_unique(table, path, ["session_id"])
        table.insert(0, "participant_id", path.parent.name)
        parts.append(table)
    return pd.concat(parts, ignore_index=True) if parts else None


def _read_phenotype(bids_dir: Path, column: str) -> tuple[pd.DataFrame, list[str]] | None:
    """The phenotype table holding ``column`` and its join keys; two such files are ambiguous."""
    found = []
    for path in sorted((bids_dir / "phenotype").glob("*.tsv")):
        table = read_tsv(path)
        if column in table.columns and "participant_id" in table.columns:
            found.append((path, table))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(str(p) for p, _ in found)
        raise DataError(f"Column '{column}' is in several phenotype files ({names}). Keep it in one file.")
    path, table = found[0]
    keys = ["participant_id", "session_id"] if "session_id" in table.columns else ["participant_id"]
    _check_unique(table, path, keys)
    return table[[*keys, column]], keys


def _coalesce(merged: pd.DataFrame, column: str) -> pd.Series:
    """First source (sessions, participants, phenotype) that has ``column`` for each row; NaN when none."""
    result = pd.Series(np.nan, index=merged.index, dtype=object)
    for source in _SOURCES:
        name = f"{source}:{column}"
        if name in merged.columns:
            result = result.where(result.notna(), merged[name])
    return result


def _is_missing(values: pd.Series) -> pd.Series:
    return values.isna() | values.isin(list(MISSING_VALUES))


def _parse_age(values: pd.Series, where: str) -> pd.Series:
    text = values.where(~_is_missing(values), "").astype(str).str.rstrip("+")
    age = pd.to_numeric(text, errors="coerce").astype(float)  # "" (missing) coerces to NaN
    bad = sorted(set(values[age.isna() & ~_is_missing(values)]))
    if bad:
        log.warning("Non-numeric age values %s in %s are treated as unknown.", ", ".join(bad[:10]), where)
    return age


def _parse_sex(values: pd.Series) -> pd.Series:
    def one(value: object) -> str:
        if not isinstance(value, str) or value in MISSING_VALUES:
            return NO_SESSION
        return _SEX_SPELLINGS.get(value.lower(), value)

    return values.map(one).astype(object)


def _pairs(
    participants: pd.DataFrame, session_table: pd.DataFrame | None, sessions: pd.DataFrame | None
) -> pd.DataFrame:
    """The participant/session pairs to label: the caller's, else every sessions.tsv row (+ n/a without)."""
    if sessions is not None:
        pairs = sessions[["participant_id", "session_id"]].astype(str).drop_duplicates()
        return pairs.reset_index(drop=True)
    ids = participants[["participant_id"]].drop_duplicates()
    if session_table is None:
        return ids.assign(session_id=NO_SESSION)
    with_sessions = session_table[["participant_id", "session_id"]]
    without = ids[~ids["participant_id"].isin(with_sessions["participant_id"])].assign(session_id=NO_SESSION)
    return pd.concat([with_sessions, without], ignore_index=True)


def mark_baseline(table: pd.DataFrame) -> pd.Series:
    """True for each participant's first session in natural order (per cohort in a multi-cohort table)."""
    columns = image_keys(table)
    first = sort_table(table[columns])
    first = first[~subject_ids(first).duplicated()]
    keys = set(first.itertuples(index=False, name=None))
    return pd.Series([key in keys for key in table[columns].itertuples(index=False, name=None)], index=table.index,
                     dtype=bool)  # fmt: skip


def _list_rows(table: pd.DataFrame, limit: int = 10) -> str:
    rows = [f"{p} {s}" for p, s in zip(table["participant_id"], table["session_id"], strict=True)]
    return ", ".join(rows[:limit]) + (f" ... ({len(rows)} in all)" if len(rows) > limit else "")


def load_labels(
    bids_dir: Path, cfg: LabelConfig, sessions: pd.DataFrame | None = None, *, check_classes: bool = True
) -> pd.DataFrame:
    """The label table of the images to use (columns ``TABLE_COLUMNS``, naturally sorted).

    Args:
        bids_dir: The raw BIDS dataset (only its TSV tables are read).
        cfg: Target column, task, classes to keep and the baseline-only filter.
        sessions: Optional ``participant_id``/``session_id`` pairs that have participant-level outputs; the
            table is restricted to them (a pair without a label is an error, not silently dropped).
        check_classes: refuse a ``cfg.classes`` class absent from this dataset, or a single class. False for one
            cohort of several (a cohort of patients only is fine): the caller checks the cohorts together.

    Raises:
        InputMissingError: participants.tsv is missing.
        DataError: missing label column or values, unknown class, non-numeric regression label, one class.
    """
    participants_path = bids_dir / "participants.tsv"
    if not participants_path.is_file():
        raise InputMissingError(
            f"No participants.tsv in {bids_dir}: the group level reads labels from it. Add a participants.tsv "
            f"with participant_id and '{cfg.label}' columns (or put '{cfg.label}' in sub-*/sub-*_sessions.tsv)."
        )
    participants = read_tsv(participants_path)
    _require_columns(participants, participants_path, ("participant_id",))
    _check_unique(participants, participants_path, ["participant_id"])
    session_table = _read_sessions(bids_dir)

    merged = _pairs(participants, session_table, sessions)
    listed = set(participants["participant_id"]) | (
        set(session_table["participant_id"]) if session_table is not None else set()
    )
    if cfg.task is not Task.RECONSTRUCTION:  # an autoencoder needs no label, hence no row
        _unlisted(merged, listed, participants_path)
    if session_table is not None:
        renamed = session_table.rename(
            columns=lambda c: c if c in ("participant_id", "session_id") else f"sessions:{c}"
        )
        merged = merged.merge(renamed, on=["participant_id", "session_id"], how="left")
    renamed = participants.rename(columns=lambda c: c if c == "participant_id" else f"participants:{c}")
    merged = merged.merge(renamed, on="participant_id", how="left")
    available = sorted(set(participants.columns) | set(() if session_table is None else session_table.columns))
    has_label = cfg.label in available
    if not has_label:
        phenotype = _read_phenotype(bids_dir, cfg.label)
        has_label = phenotype is not None
        if phenotype is not None:
            table, keys = phenotype
            merged = merged.merge(table.rename(columns={cfg.label: f"phenotype:{cfg.label}"}), on=keys, how="left")
        elif cfg.task is not Task.RECONSTRUCTION:
            columns = ", ".join(c for c in available if c not in ("participant_id", "session_id"))
            raise DataError(
                f"Label column '{cfg.label}' is in neither {participants_path}, the sessions.tsv files nor "
                f"phenotype/ (available columns: {columns}). Choose one with --label or add the column."
            )

    table = pd.DataFrame(
        {
            "participant_id": merged["participant_id"],
            "session_id": merged["session_id"],
            "label": _coalesce(merged, cfg.label),
            "age": _parse_age(_coalesce(merged, "age"), str(bids_dir)),
            "sex": _parse_sex(_coalesce(merged, "sex")),
        }
    )
    table = sort_table(table.astype({"participant_id": str, "session_id": str, "sex": str}))
    table["is_baseline"] = mark_baseline(table)
    if cfg.baseline_only:
        table = table[table["is_baseline"]].reset_index(drop=True)
    if table.empty:
        raise DataError(f"No participant/session to label in {bids_dir} (participants.tsv has no usable row).")

    if cfg.task is Task.RECONSTRUCTION and not has_label:
        table["label"] = pd.Series(NO_SESSION, index=table.index, dtype=str)
        return table
    missing = table[_is_missing(table["label"])]
    if len(missing):
        raise DataError(
            f"Label '{cfg.label}' is missing (n/a or empty) for {len(missing)} participant/session(s) of "
            f"{bids_dir}: {_list_rows(missing)}. Fill them in participants.tsv / sessions.tsv, or leave those "
            "participants out with --participant-label."
        )
    if cfg.task is Task.REGRESSION:
        return _numeric_labels(table, cfg)
    table["label"] = table["label"].astype(str)
    if cfg.classes:
        present = sorted(set(table["label"]))
        absent = [c for c in cfg.classes if c not in present]
        if absent and check_classes:
            cased = [f"'{c}' is spelled '{p}'" for c in absent for p in present if p.lower() == c.lower()]
            hint = f" Class names are case-sensitive: {', '.join(cased)}." if cased else ""
            raise DataError(
                f"Class(es) {', '.join(absent)} of label '{cfg.label}' have no participant in {bids_dir} "
                f"(present: {', '.join(present)}).{hint} Fix --classes."
            )
        table = table[table["label"].isin(cfg.classes)].reset_index(drop=True)
    classes = sorted(set(table["label"]))
    if cfg.task is Task.CLASSIFICATION and len(classes) < 2 and check_classes:
        raise DataError(
            f"Label '{cfg.label}' has a single class ({classes[0]}) among the {len(table)} selected image(s) "
            f"of {bids_dir}: a classifier cannot be trained. Select at least two classes."
        )
    log.info(
        "Labels: %d image(s) of %d participant(s), label '%s'", len(table), table["participant_id"].nunique(), cfg.label
    )
    return table


def _numeric_labels(table: pd.DataFrame, cfg: LabelConfig) -> pd.DataFrame:
    values = pd.to_numeric(table["label"], errors="coerce")
    bad = table[values.isna() | ~np.isfinite(values)]
    if len(bad):
        shown = ", ".join(
            f"{p} {s}={v!r}"
            for p, s, v in bad[["participant_id", "session_id", "label"]].head(10).itertuples(index=False)
        )
        raise DataError(
            f"Regression label '{cfg.label}' is not numeric for {len(bad)} image(s): {shown}. "
            "Fix the values or use --task classification."
        )
    table["label"] = values.astype(float)
    if cfg.classes:
        log.warning("--classes is ignored for regression (label '%s').", cfg.label)
    return table


def format_label_table(table: pd.DataFrame) -> str:
    """The TSV text of a label table (``n/a`` for missing values, ``\\n`` line ends): byte-stable."""
    return table.to_csv(sep="\t", index=False, na_rep=NO_SESSION, lineterminator="\n")


def read_label_table(path: Path, numeric_label: bool = False) -> pd.DataFrame:
    """Read back a table written by ``format_label_table``, converting age, is_baseline and the label."""
    table = read_tsv(path)
    _require_columns(table, path, ("participant_id", "session_id"))
    if "age" in table.columns:
        table["age"] = pd.to_numeric(table["age"].replace(NO_SESSION, np.nan), errors="coerce").astype(float)
    if "is_baseline" in table.columns:
        table["is_baseline"] = table["is_baseline"].map({"True": True, "False": False}).astype(bool)
    if numeric_label and "label" in table.columns:
        table["label"] = pd.to_numeric(table["label"], errors="raise").astype(float)
    return table


def demographics_table(table: pd.DataFrame) -> pd.DataFrame:
    """Demographics per group and class: subjects, sessions, age mean ± sd and sex counts.

    Args:
        table: A label table, optionally with a ``group`` column (e.g. ``test``, ``split-0/train``); without
            it every row is group ``all``.

    Returns:
        One row per group and class (classes are the session labels; a regression label gives one ``all``
        row per group) plus an ``all`` row per group, with columns ``group, label, n_subjects, n_sessions,
        age_mean, age_sd, age`` (``"72.1 ± 6.3"``) and ``sex_<value>`` counts. Age and sex are counted once
        per subject, at the subject's first session within the row's subset.
    """
    if "group" not in table.columns:
        table = table.assign(group="all")
    numeric = pd.api.types.is_numeric_dtype(table["label"])
    sexes = sorted(set(table["sex"]), key=natural_key)
    rows = []
    for group in dict.fromkeys(table["group"]):
        members = sort_table(table[table["group"] == group])
        classes = [] if numeric else sorted(set(members["label"].astype(str)), key=natural_key)
        for cls in [*classes, "all"]:
            subset = members if cls == "all" else members[members["label"].astype(str) == cls]
            first = subset[~subject_ids(subset).duplicated()]
            age_mean, age_sd = float(first["age"].mean()), float(first["age"].std())
            row: dict[str, object] = {
                "group": group,
                "label": cls,
                "n_subjects": len(first),
                "n_sessions": len(subset),
                "age_mean": round(age_mean, 2),
                "age_sd": round(age_sd, 2),
                "age": NO_SESSION
                if np.isnan(age_mean)
                else f"{age_mean:.1f} ± {0.0 if np.isnan(age_sd) else age_sd:.1f}",
            }
            for sex in sexes:
                row[f"sex_{'unknown' if sex == NO_SESSION else sex}"] = int((first["sex"] == sex).sum())
            rows.append(row)
    return pd.DataFrame(rows)
