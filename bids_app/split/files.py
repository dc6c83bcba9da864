"""Split files: writing, reading and verifying the split TSV/JSON files under groups/, and users' own split files.

``write_splits`` records a drawn split (see ``bids_app.split.make``) as label-table TSVs plus ``splits.json``
(seed, config, balance p-values, and the SHA-256 of every file); ``read_splits`` refuses any file changed
since, and any split in which a participant is on two sides. ``load_split_file`` turns a user's split TSV
into the same ``Splits``. See docs/splits.md.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from bids_app.config import SplitConfig
from bids_app.derivatives import atomic_write_json, atomic_write_text
from bids_app.errors import DataError, InputMissingError
from bids_app.labels import (
    COHORT,
    MISSING_VALUES,
    NO_SESSION,
    demographics_table,
    format_label_table,
    image_keys,
    natural_key,
    read_tsv,
    sort_table,
    subject_ids,
)
from bids_app.maps.splits import (
    SPLITS_JSON,
    TEST_TSV,
    Fold,
    Splits,
    check_disjoint,
    label_columns,
    sha256_text,
    table_sha256,
)
from bids_app.split.balance import age_p_value, sex_p_value
from bids_app.split.make import prepare_table

log = logging.getLogger(__name__)

USER_SPLIT_SEED = -1  # Splits.seed of a split read from a user's file
# Kept in a multi-cohort train+validation.tsv beside the label columns (data.tables index columns).
POOL_COLUMNS = ("source_sha256", "raw_source_sha256", "dataset_name", "dataset_doi", "dataset_id")


def write_splits(
    groups_dir: Path, splits: Splits, table: pd.DataFrame, cfg: SplitConfig, extra_seen: pd.DataFrame | None = None
) -> None:
    """Write the split TSVs, demographics and ``splits.json`` (hashes, seed, config) under ``groups_dir``.

    Each file is written atomically; ``splits.json`` comes last, so a split without it is incomplete.
    ``extra_seen`` holds images the model saw elsewhere (a transfer source's training pool); they join
    ``train+validation.tsv`` so later leak checks cover them.
    """
    frames = {TEST_TSV: splits.test}
    for fold in splits.folds:
        frames[f"split-{fold.index}/train.tsv"] = fold.train
        frames[f"split-{fold.index}/validation.tsv"] = fold.validation
    pools = list(frames.values())[1:] + ([extra_seen] if extra_seen is not None else [])
    seen = pd.concat(pools)
    seen = seen.drop_duplicates(image_keys(seen))
    frames["train+validation.tsv"] = sort_table(seen)
    named = [f.assign(group=n.removesuffix(".tsv").removesuffix("/data")) for n, f in frames.items()]
    frames = {n: label_columns(f) for n, f in frames.items()}
    if COHORT in seen.columns:
        # A multi-cohort training pool also records each image's checksums and dataset: the same label in two
        # cohorts is two people, and the leak checks tell them apart by these columns, not by a join on ids.
        kept = [c for c in POOL_COLUMNS if c in seen.columns]
        frames["train+validation.tsv"] = frames["train+validation.tsv"].join(sort_table(seen)[kept])
    frames["demographics.tsv"] = _demographics(pd.concat(named))
    hashes = {}
    for name, frame in frames.items():
        text = format_label_table(frame)
        atomic_write_text(groups_dir / name, text)
        hashes[name] = sha256_text(text)
    for stale in sorted(groups_dir.glob("split-*")):
        if stale.is_dir() and f"{stale.name}/train.tsv" not in frames:
            log.info("Removing %s, left by an earlier split with more folds", stale)
            for name in ("train.tsv", "validation.tsv"):
                (stale / name).unlink(missing_ok=True)
            if not any(stale.iterdir()):
                stale.rmdir()
    # leave_cohort_out is recorded only when used, so a single-cohort split keeps its bytes
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if cfg.leave_cohort_out is None:
        del config["leave_cohort_out"]
    nested: dict[str, dict[str, float]] = {}
    for key, value in splits.p_values.items():
        group, _, test = key.partition("/")
        nested.setdefault(group, {})[test] = value
    record = {
        "format_version": 1,
        "seed": splits.seed,
        "attempts": splits.attempts,
        "n_splits": len(splits.folds),
        "label_type": "numeric" if pd.api.types.is_numeric_dtype(table["label"]) else "categorical",
        "config": config,
        "p_values": nested,
        "label_table_sha256": table_sha256(table),
        "files": hashes,
    }
    if COHORT in table.columns:  # who is where, per cohort (absent from a single-cohort split)
        record["cohorts"] = {
            str(cohort): {
                name.removesuffix(".tsv").removesuffix("/data"): int(subject_ids(f[f[COHORT] == cohort]).nunique())
                for name, f in frames.items()
                if COHORT in f.columns and name != "demographics.tsv"
            }
            for cohort in dict.fromkeys(table[COHORT])
        }
    atomic_write_json(groups_dir / SPLITS_JSON, record)


def _demographics(named: pd.DataFrame) -> pd.DataFrame:
    """``labels.demographics_table`` of the split's groups; in a multi-cohort split also per cohort, with a
    leading ``cohort`` column (``all`` for the cohorts together)."""
    pooled = demographics_table(named)
    if COHORT not in named.columns:
        return pooled
    parts = [pooled.assign(**{COHORT: "all"})]
    for cohort, rows in named.groupby(COHORT, sort=False):
        parts.append(demographics_table(rows).assign(**{COHORT: str(cohort)}))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame[[COHORT, *(c for c in frame.columns if c != COHORT)]]
    sexes = [c for c in frame.columns if c.startswith("sex_")]
    return frame.fillna({c: 0 for c in sexes}).astype({c: int for c in sexes})


def _select(table: pd.DataFrame, rows: pd.DataFrame, has_session: bool) -> pd.DataFrame:
    """Rows of ``table`` named by split-file ``rows``: whole participants, or given sessions only."""
    whole = rows if not has_session else rows[rows["session_id"].isin(list(MISSING_VALUES))]
    mask = table["participant_id"].isin(set(whole["participant_id"]))
    if has_session:
        pairs = set(zip(rows["participant_id"], rows["session_id"], strict=True))
        mask |= pd.Series(
            [p in pairs for p in zip(table["participant_id"], table["session_id"], strict=True)], index=table.index
        )
    return table[mask].reset_index(drop=True)


def _frame_p_values(name: str, a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    """Per-class age/sex p-values of two tables (first session per participant), for reporting."""
    first_a, first_b = a.drop_duplicates("participant_id"), b.drop_duplicates("participant_id")
    found = {}
    for cls in sorted(set(first_a["label"]) | set(first_b["label"]), key=natural_key):
        x, y = first_a[first_a["label"] == cls], first_b[first_b["label"] == cls]
        found[f"{name}/age[{cls}]"] = age_p_value(x["age"].to_numpy(float), y["age"].to_numpy(float))
        found[f"{name}/sex[{cls}]"] = sex_p_value(list(x["sex"]), list(y["sex"]))
    return found


def load_split_file(path: Path, table: pd.DataFrame) -> Splits:
    """A user's split TSV (``participant_id``, optional ``session_id``, ``split``, ``side``) as Splits.

    ``split`` is ``test`` or a fold index 0..k-1; fold rows need ``side`` = ``train``/``validation``. An
    ``n/a`` session (or no session_id column) means every session of the participant.

    Raises:
        InputMissingError: no such file. DataError: bad values or fold indices.
        LeakError: a participant in test and in a fold, or on both sides of one fold (all named, up to 10).
    """
    if not path.is_file():
        raise InputMissingError(f"Split file {path} does not exist. Check split.split_file.")
    rows = read_tsv(path)
    table = prepare_table(table)
    for column in ("participant_id", "split"):
        if column not in rows.columns:
            raise DataError(
                f"Split file {path} has no '{column}' column (columns: {', '.join(rows.columns)}). See docs/splits.md."
            )
    has_session = "session_id" in rows.columns
    rows["split"] = rows["split"].str.lower()
    rows["side"] = rows["side"].str.lower() if "side" in rows.columns else ""
    is_test = rows["split"] == "test"
    bad = rows[~is_test & ~rows["split"].str.fullmatch(r"\d+")]
    bad_side = rows[~is_test & ~rows["side"].isin(["train", "validation"])]
    bad_test = rows[is_test & ~rows["side"].isin(["", NO_SESSION, "test"])]
    for wrong, expect in (
        (bad, "split 'test' or a fold index"),
        (bad_side, "side 'train' or 'validation'"),
        (bad_test, "no side for test rows"),
    ):
        if len(wrong):
            first = wrong.iloc[0]
            raise DataError(
                f"Split file {path} row of {first['participant_id']} has split={first['split']!r} "
                f"side={first['side']!r}; expected {expect}. See docs/splits.md."
            )
    fold_rows = rows[~is_test].assign(fold=lambda r: r["split"].astype(int))
    indices = sorted(set(fold_rows["fold"]))
    if indices != list(range(len(indices))):
        raise DataError(f"Split file {path} has fold indices {indices}; use 0..k-1 without gaps.")
    test_rows = rows[is_test]
    check_disjoint(test_rows, fold_rows, f"split file {path} (test vs train/validation)")
    for k in indices:
        fold = fold_rows[fold_rows["fold"] == k]
        train, validation = fold[fold["side"] == "train"], fold[fold["side"] == "validation"]
        check_disjoint(train, validation, f"split file {path} (fold {k} train vs validation)")
    unknown = sorted(set(rows["participant_id"]) - set(table["participant_id"]), key=natural_key)
    if unknown:
        log.warning(
            "Split file %s names %d participant(s) absent from the label table (ignored): %s",
            path,
            len(unknown),
            ", ".join(unknown[:10]),
        )
    test = _select(table, test_rows, has_session)
    folds = []
    for k in indices:
        sides = [
            _select(table, fold_rows[(fold_rows["fold"] == k) & (fold_rows["side"] == s)], has_session)
            for s in ("train", "validation")
        ]
        folds.append(Fold(k, *sides))
    p_values = {}
    if not pd.api.types.is_numeric_dtype(table["label"]):  # balance of a user's split, reported only
        p_values = _frame_p_values("test", test, table[~table["participant_id"].isin(set(test["participant_id"]))])
        for fold in folds:
            p_values.update(_frame_p_values(f"split-{fold.index}", fold.validation, fold.train))
    return Splits(test, tuple(folds), USER_SPLIT_SEED, 0, p_values)


def write_split_file(path: Path, splits: Splits) -> None:
    """Write ``splits`` in the user split-file format that ``load_split_file`` (``--split-file``) reads."""
    rows = [
        [pid, sid, "test", NO_SESSION] for pid, sid in splits.test[["participant_id", "session_id"]].itertuples(False)
    ]
    for fold in splits.folds:
        for side, frame in (("train", fold.train), ("validation", fold.validation)):
            pairs = frame[["participant_id", "session_id"]].itertuples(index=False)
            rows.extend([pid, sid, str(fold.index), side] for pid, sid in pairs)
    lines = ["participant_id\tsession_id\tsplit\tside", *("\t".join(row) for row in rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")
