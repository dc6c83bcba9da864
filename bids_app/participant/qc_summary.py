"""Quality of a participant-level output and of a label table, summarised at group level.

``qc_table`` gathers every image's QC figures (``sub-*/[ses-*/]qc/*_desc-qc_<suffix>.json``, or the ``QC``
of a complete preprocessed sidecar when the QC file is missing) with the documented pass/fail rule
(``bids_app.preprocess.qc.qc_passes``); ``write_qc_summary`` writes it to ``OUTPUT_DIR/qc_summary.tsv`` and
``failed_images`` gives the images the split stage leaves out with ``--exclude-failed-qc``.
``describe_label_table`` describes a label of BIDS_DIR: per class, subjects, sessions, age and sex, and
whether age and sex differ between classes. See docs/quality.md.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_app.derivatives import atomic_write_text, read_complete_sidecar
from bids_app.labels import NO_SESSION
from bids_app.preprocess.qc import QC_KEYS, qc_passes, qc_rule

log = logging.getLogger(__name__)

QC_SUMMARY_FILE = "qc_summary.tsv"
SUMMARY_COLUMNS = ("participant_id", "session_id", "suffix", "tracer", "qc_file", *QC_KEYS, "qc_metric",
                   "qc_threshold", "qc_pass")  # fmt: skip
_QC_NAME = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?:_trc-(?P<trc>[A-Za-z0-9]+))?.*_desc-"
    r"(?:qc|preproc)_(?P<suffix>T1w|T2w|FLAIR|pet|[a-z][A-Za-z0-9]*)\.json$"  # the last: a --custom-map's name
)


def _row(output_dir: Path, path: Path, qc: dict[str, Any]) -> dict[str, Any] | None:
    match = _QC_NAME.match(path.name)
    if match is None:
        return None
    suffix = match.group("suffix")
    metric, threshold = qc_rule(suffix)
    row: dict[str, Any] = {
        "participant_id": f"sub-{match.group('sub')}",
        "session_id": f"ses-{match.group('ses')}" if match.group("ses") else NO_SESSION,
        "suffix": suffix,
        "tracer": match.group("trc") or NO_SESSION,
        "qc_file": path.relative_to(output_dir).as_posix(),
    }
    for key in QC_KEYS:
        value = qc.get(key)
        row[key] = float(value) if isinstance(value, int | float) else np.nan
    row.update(qc_metric=metric, qc_threshold=threshold, qc_pass=qc_passes(qc, suffix))
    return row


def qc_table(output_dir: Path) -> pd.DataFrame:
    """Every image's QC figures and pass/fail (columns ``SUMMARY_COLUMNS``), sorted by participant, session.

    A QC file that cannot be read counts as a failed image (its figures ``NaN``), so it is never trusted.
    """
    output_dir = Path(output_dir)
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for path in sorted(output_dir.glob("sub-*/**/qc/*_desc-qc_*.json")):
        try:
            qc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("Unreadable QC file %s (%s): counted as failed.", path, exc)
            qc = {}
        row = _row(output_dir, path, qc if isinstance(qc, dict) else {})
        if row is not None:
            rows[(row["participant_id"], row["session_id"], row["suffix"], row["tracer"])] = row
    for path in sorted(output_dir.glob("sub-*/**/*_desc-preproc_*.json")):  # images without a QC file
        image = path.with_name(path.name[: -len(".json")] + ".nii.gz")
        sidecar = read_complete_sidecar(image)
        row = _row(output_dir, path, sidecar.get("QC", {})) if sidecar else None
        if row is not None:
            rows.setdefault((row["participant_id"], row["session_id"], row["suffix"], row["tracer"]), row)
    table = pd.DataFrame(list(rows.values()), columns=list(SUMMARY_COLUMNS))
    return table.sort_values(["participant_id", "session_id", "suffix", "tracer"], ignore_index=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return NO_SESSION if np.isnan(value) else f"{float(value):.6f}"
    return str(value)


def write_qc_summary(output_dir: Path) -> pd.DataFrame:
    """Write ``OUTPUT_DIR/qc_summary.tsv`` (``qc_table``; floats with 6 decimals, ``qc_pass`` true/false).

    Returns:
        The table written.
    """
    table = qc_table(output_dir)
    lines = ["\t".join(table.columns)]
    lines += ["\t".join(_cell(v) for v in row) for row in table.itertuples(index=False, name=None)]
    atomic_write_text(Path(output_dir) / QC_SUMMARY_FILE, "\n".join(lines) + "\n")
    n_failed = int((~table["qc_pass"].astype(bool)).sum())
    log.info("QC summary: %d image(s), %d failed: %s", len(table), n_failed, Path(output_dir) / QC_SUMMARY_FILE)
    return table


def failed_images(output_dir: Path, suffix: str = "T1w") -> set[tuple[str, str]]:
    """``(participant_id, session_id)`` of the images of ``suffix`` whose QC failed (``session_id`` ``n/a``
    without sessions), as in the split stage's tables."""
    table = qc_table(output_dir)
    failed = table[(table["suffix"] == suffix) & ~table["qc_pass"].astype(bool)]
    return set(zip(failed["participant_id"], failed["session_id"], strict=True))


def describe_label_table(bids_dir: Path, label: str) -> pd.DataFrame:
    """Demographics and balance of one label of BIDS_DIR's tables (participants.tsv, sessions.tsv, phenotype).

    A label with more than ``max(5, n_subjects // 2)`` distinct numeric values is described as continuous
    (one ``all`` row), any other as classes.

    Returns:
        ``labels.demographics_table`` rows (``label`` = class or ``all``; ``n_subjects``, ``n_sessions``,
        ``age_mean``, ``age_sd``, ``age``, ``sex_<value>``) plus ``label_mean``, ``label_sd`` (continuous
        labels, else NaN), ``age_p_value`` (classes: Welch t-test for two, one-way ANOVA for more; continuous:
        Pearson correlation with age) and ``sex_p_value`` (classes: chi-square on the counts; continuous:
        Kruskal-Wallis across sexes), both over subjects at their first session and NaN when untestable.

    Raises:
        InputMissingError, DataError: as ``labels.load_labels`` (no participants.tsv, unknown label column,
            missing values).
    """
    from scipy import stats

    from bids_app.config import LabelConfig, Task
    from bids_app.labels import demographics_table, load_labels

    # reconstruction keeps the label as text and accepts a single class: any table can be described
    table = load_labels(Path(bids_dir), LabelConfig(label=label, task=Task.RECONSTRUCTION))
    numbers = pd.to_numeric(table["label"], errors="coerce")
    first = table.drop_duplicates("participant_id")
    continuous = bool(numbers.notna().all()) and numbers.nunique() > max(5, len(first) // 2)
    if continuous:
        table = table.assign(label=numbers.astype(float))
        first = table.drop_duplicates("participant_id")
    summary = demographics_table(table)
    age_p = sex_p = np.nan
    known_age = first[first["age"].notna()]
    if continuous:
        summary["label_mean"], summary["label_sd"] = float(table["label"].mean()), float(table["label"].std())
        if len(known_age) > 2 and known_age["age"].nunique() > 1:
            age_p = float(stats.pearsonr(known_age["label"], known_age["age"]).pvalue)
        by_sex = [g["label"].to_numpy() for _, g in first[first["sex"] != NO_SESSION].groupby("sex")]
        if len(by_sex) > 1 and len(np.unique(np.concatenate(by_sex))) > 1:
            sex_p = float(stats.kruskal(*by_sex).pvalue)
    else:
        summary["label_mean"] = summary["label_sd"] = np.nan
        ages = [g["age"].to_numpy() for _, g in known_age.groupby("label") if len(g) > 1]
        if len(ages) > 1:
            test = stats.ttest_ind(*ages, equal_var=False) if len(ages) == 2 else stats.f_oneway(*ages)
            age_p = float(test.pvalue)
        counts = pd.crosstab(first["label"], first["sex"]).drop(columns=NO_SESSION, errors="ignore")
        counts = counts.loc[counts.sum(axis=1) > 0, counts.sum(axis=0) > 0]
        if counts.shape[0] > 1 and counts.shape[1] > 1:
            sex_p = float(stats.chi2_contingency(counts.to_numpy()).pvalue)
    return summary.assign(age_p_value=age_p, sex_p_value=sex_p)
