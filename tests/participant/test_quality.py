"""QC summary table, failed images for the split stage, and the label-table description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.derivatives import qc_path
from bids_app.participant.qc_summary import (
    QC_SUMMARY_FILE,
    SUMMARY_COLUMNS,
    describe_label_table,
    failed_images,
    write_qc_summary,
)
from bids_app.preprocess.qc import MIN_PET_NMI, MIN_T1W_CORRELATION, QC_KEYS


def qc_record(smoothed: float, nmi: float = 1.2) -> dict[str, float]:
    return {**dict.fromkeys(QC_KEYS, 0.5), "smoothed_correlation_to_template": smoothed, "nmi_to_template": nmi}


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    write = lambda path, obj: (path.parent.mkdir(parents=True, exist_ok=True), path.write_text(json.dumps(obj)))  # noqa: E731
    write(qc_path(out, "01", "M000", "T1w"), qc_record(0.85))
    write(qc_path(out, "01", "M012", "T1w"), qc_record(MIN_T1W_CORRELATION - 0.01))  # fails
    write(qc_path(out, "01", "M000", "pet", "trc-FDG"), qc_record(0.1, MIN_PET_NMI - 0.01))  # PET fails on NMI
    write(qc_path(out, "02", None, "T1w"), qc_record(MIN_T1W_CORRELATION))  # at the threshold: passes
    broken = qc_path(out, "03", None, "T1w")
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")  # unreadable: counted as failed
    # a preprocessed image whose QC file is missing: its sidecar's QC is used
    anat = out / "sub-04" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-04_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz").write_bytes(b"x")
    sidecar = {"QC": qc_record(0.9), "Complete": True}
    (anat / "sub-04_space-MNI152NLin2009aSym_desc-preproc_T1w.json").write_text(json.dumps(sidecar))
    return out


def test_qc_summary_rows_values_and_pass_column(output_dir: Path) -> None:
    table = write_qc_summary(output_dir)
    assert list(table.columns) == list(SUMMARY_COLUMNS)
    keys = list(zip(table["participant_id"], table["session_id"], table["suffix"], table["tracer"], strict=True))
    assert keys == [
        ("sub-01", "ses-M000", "T1w", "n/a"),
        ("sub-01", "ses-M000", "pet", "FDG"),
        ("sub-01", "ses-M012", "T1w", "n/a"),
        ("sub-02", "n/a", "T1w", "n/a"),
        ("sub-03", "n/a", "T1w", "n/a"),
        ("sub-04", "n/a", "T1w", "n/a"),
    ]
    assert table["qc_pass"].tolist() == [True, False, False, True, False, True]
    assert table["qc_metric"].tolist()[:2] == ["smoothed_correlation_to_template", "nmi_to_template"]
    assert np.isnan(table.loc[4, "nmi_to_template"])
    written = pd.read_csv(output_dir / QC_SUMMARY_FILE, sep="\t", dtype=str, keep_default_na=False)
    assert written["qc_pass"].tolist() == ["true", "false", "false", "true", "false", "true"]
    assert written.loc[2, "smoothed_correlation_to_template"] == f"{MIN_T1W_CORRELATION - 0.01:.6f}"
    assert written.loc[4, "correlation_to_template"] == "n/a"
    assert written.loc[0, "qc_file"] == "sub-01/ses-M000/qc/sub-01_ses-M000_desc-qc_T1w.json"


def test_failed_images_per_suffix(output_dir: Path) -> None:
    assert failed_images(output_dir) == {("sub-01", "ses-M012"), ("sub-03", "n/a")}
    assert failed_images(output_dir, suffix="pet") == {("sub-01", "ses-M000")}
    assert failed_images(output_dir.parent / "empty") == set()


def test_describe_label_table_classes_and_continuous(tiny_dataset) -> None:
    participants = pd.read_csv(tiny_dataset.bids_dir / "participants.tsv", sep="\t")
    summary = describe_label_table(tiny_dataset.bids_dir, "diagnosis").set_index("label")
    assert summary.index.tolist() == ["AD", "CN", "all"]
    for diagnosis in ("AD", "CN"):
        rows = participants[participants["diagnosis"] == diagnosis]
        assert summary.loc[diagnosis, "n_subjects"] == len(rows)
        assert summary.loc[diagnosis, "n_sessions"] == 2 * len(rows)
        assert summary.loc[diagnosis, "age_mean"] == pytest.approx(rows["age"].mean(), abs=0.01)
    assert summary.loc["all", "n_subjects"] == len(participants)
    assert 0.0 <= summary["age_p_value"].iloc[0] <= 1.0 and 0.0 <= summary["sex_p_value"].iloc[0] <= 1.0
    assert summary["label_mean"].isna().all()

    # more distinct numbers than half the subjects: a continuous label, one row, correlated with itself
    ages = describe_label_table(tiny_dataset.bids_dir, "age")
    assert ages["label"].tolist() == ["all"]
    assert ages.loc[0, "label_mean"] == pytest.approx(participants["age"].mean() + 0.5, abs=0.01)
    assert ages.loc[0, "age_p_value"] < 0.01
