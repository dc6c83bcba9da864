"""Label tables: sources and precedence, filters, every documented error, demographics, TSV round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.config import LabelConfig, Task
from bids_app.errors import DataError, InputMissingError
from bids_app.labels import (
    TABLE_COLUMNS,
    demographics_table,
    format_label_table,
    load_labels,
    natural_key,
    read_label_table,
)


def write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def write_bids(root: Path, participants: list[dict[str, str]], sessions: dict[str, list[dict[str, str]]]) -> Path:
    """participants.tsv rows and, per participant_id, its sessions.tsv rows."""
    write_tsv(root / "participants.tsv", participants)
    for pid, rows in sessions.items():
        write_tsv(root / pid / f"{pid}_sessions.tsv", rows)
    return root


@pytest.fixture
def longitudinal(tmp_path: Path) -> Path:
    """Three participants: 01 converts CN→AD (session label wins), 02 has no sessions.tsv, 10 is AD."""
    return write_bids(
        tmp_path,
        [
            {"participant_id": "sub-10", "diagnosis": "AD", "age": "80", "sex": "female"},
            {"participant_id": "sub-02", "diagnosis": "CN", "age": "70", "sex": "m"},
            {"participant_id": "sub-01", "diagnosis": "CN", "age": "60", "sex": "F"},
        ],
        {
            "sub-01": [
                {"session_id": "ses-M12", "diagnosis": "AD", "age": "61"},
                {"session_id": "ses-M6", "diagnosis": "CN", "age": "60.5"},
                {"session_id": "ses-M0", "diagnosis": "CN", "age": "60"},
            ],
            "sub-10": [{"session_id": "ses-M0", "diagnosis": "AD", "age": "89+"}],
        },
    )


def test_load_labels_sources_precedence_and_order(longitudinal: Path) -> None:
    table = load_labels(longitudinal, LabelConfig())
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(zip(table["participant_id"], table["session_id"], strict=True)) == [
        ("sub-01", "ses-M0"),
        ("sub-01", "ses-M6"),
        ("sub-01", "ses-M12"),  # natural order, not text order
        ("sub-02", "n/a"),  # no sessions.tsv: one session-less row
        ("sub-10", "ses-M0"),
    ]
    assert list(table["label"]) == ["CN", "CN", "AD", "CN", "AD"]  # the session value wins
    assert list(table["age"]) == [60.0, 60.5, 61.0, 70.0, 89.0]  # session age, else participant age; 89+ → 89
    assert list(table["sex"]) == ["F", "F", "F", "M", "F"]  # normalised spellings
    assert list(table["is_baseline"]) == [True, False, False, True, True]


def test_sessions_argument_restricts_pairs_and_baseline(longitudinal: Path) -> None:
    outputs = pd.DataFrame(
        {"participant_id": ["sub-01", "sub-01", "sub-10"], "session_id": ["ses-M12", "ses-M6", "ses-M0"]}
    )
    table = load_labels(longitudinal, LabelConfig(baseline_only=True), sessions=outputs)
    # sub-01's first session with outputs is M6; sub-02 has no outputs
    assert list(zip(table["participant_id"], table["session_id"], strict=True)) == [
        ("sub-01", "ses-M6"),
        ("sub-10", "ses-M0"),
    ]
    assert table["is_baseline"].all()


def test_classes_restrict_rows(longitudinal: Path) -> None:
    table = load_labels(longitudinal, LabelConfig(classes=("AD", "CN")))
    assert len(table) == 5
    table = load_labels(longitudinal, LabelConfig(baseline_only=True))
    assert list(table["label"]) == ["CN", "CN", "AD"]


def test_participants_tsv_missing(tmp_path: Path) -> None:
    with pytest.raises(InputMissingError, match=r"No participants\.tsv in .*participant_id"):
        load_labels(tmp_path, LabelConfig())


def test_label_column_missing_lists_available(longitudinal: Path) -> None:
    with pytest.raises(DataError, match=r"'mmse' .*available columns: .*age.*diagnosis.*--label") as info:
        load_labels(longitudinal, LabelConfig(label="mmse"))
    assert info.value.exit_code == 65


def test_requested_class_absent(longitudinal: Path) -> None:
    with pytest.raises(DataError, match=r"Class\(es\) MCI .*present: AD, CN"):
        load_labels(longitudinal, LabelConfig(classes=("AD", "MCI")))


def test_missing_labels_are_listed_up_to_ten(tmp_path: Path) -> None:
    rows = [{"participant_id": f"sub-{i:02d}", "diagnosis": "n/a" if i < 12 else "AD"} for i in range(14)]
    rows[0]["diagnosis"] = ""
    write_bids(tmp_path, rows, {})
    with pytest.raises(DataError, match=r"missing .* for 12 participant/session") as info:
        load_labels(tmp_path, LabelConfig())
    message = str(info.value)
    assert "sub-00 n/a" in message and "sub-09 n/a" in message and "sub-10" not in message
    assert "(12 in all)" in message


def test_missing_session_label_is_not_filled_from_participants(longitudinal: Path) -> None:
    rows = pd.read_csv(longitudinal / "sub-01" / "sub-01_sessions.tsv", sep="\t", dtype=str)
    rows.loc[rows["session_id"] == "ses-M12", "diagnosis"] = "n/a"
    rows.to_csv(longitudinal / "sub-01" / "sub-01_sessions.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match=r"sub-01 ses-M12"):
        load_labels(longitudinal, LabelConfig())
    assert len(load_labels(longitudinal, LabelConfig(baseline_only=True))) == 3  # follow-up not used


def test_output_without_label_row_is_an_error(longitudinal: Path) -> None:
    outputs = pd.DataFrame({"participant_id": ["sub-01", "sub-99"], "session_id": ["ses-M0", "ses-M0"]})
    with pytest.raises(DataError, match=r"sub-99 ses-M0"):
        load_labels(longitudinal, LabelConfig(), sessions=outputs)


def test_regression_label(tmp_path: Path) -> None:
    write_bids(tmp_path, [{"participant_id": "sub-1", "mmse": "28"}, {"participant_id": "sub-2", "mmse": "21.5"}], {})
    table = load_labels(tmp_path, LabelConfig(label="mmse", task=Task.REGRESSION))
    assert table["label"].dtype == float and list(table["label"]) == [28.0, 21.5]
    write_bids(tmp_path, [{"participant_id": "sub-1", "mmse": "28"}, {"participant_id": "sub-2", "mmse": "high"}], {})
    with pytest.raises(DataError, match=r"not numeric for 1 image.*sub-2 n/a='high'"):
        load_labels(tmp_path, LabelConfig(label="mmse", task=Task.REGRESSION))


def test_single_class_cannot_train(tmp_path: Path) -> None:
    write_bids(tmp_path, [{"participant_id": f"sub-{i}", "diagnosis": "AD"} for i in range(3)], {})
    with pytest.raises(DataError, match=r"single class \(AD\).*cannot be trained"):
        load_labels(tmp_path, LabelConfig())


def test_mixed_type_classes_are_strings(tmp_path: Path) -> None:
    write_bids(tmp_path, [{"participant_id": "sub-1", "dx": "0"}, {"participant_id": "sub-2", "dx": "AD"}], {})
    table = load_labels(tmp_path, LabelConfig(label="dx"))
    assert list(table["label"]) == ["0", "AD"]


def test_reconstruction_needs_no_label(tmp_path: Path) -> None:
    write_bids(tmp_path, [{"participant_id": "sub-1"}, {"participant_id": "sub-2"}], {})
    table = load_labels(tmp_path, LabelConfig(task=Task.RECONSTRUCTION))
    assert list(table["label"]) == ["n/a", "n/a"] and table["age"].isna().all() and list(table["sex"]) == ["n/a"] * 2


def test_phenotype_label(tmp_path: Path) -> None:
    write_bids(tmp_path, [{"participant_id": "sub-1"}, {"participant_id": "sub-2"}], {})
    write_tsv(
        tmp_path / "phenotype" / "cognition.tsv",
        [{"participant_id": "sub-2", "mmse": "20"}, {"participant_id": "sub-1", "mmse": "30"}],
    )
    table = load_labels(tmp_path, LabelConfig(label="mmse", task=Task.REGRESSION))
    assert list(table["label"]) == [30.0, 20.0]


def test_duplicate_participant_rows(tmp_path: Path) -> None:
    write_bids(
        tmp_path, [{"participant_id": "sub-1", "diagnosis": "AD"}, {"participant_id": "sub-1", "diagnosis": "CN"}], {}
    )
    with pytest.raises(DataError, match=r"participants\.tsv lists some rows twice: sub-1"):
        load_labels(tmp_path, LabelConfig())


def test_synthetic_dataset(tiny_dataset) -> None:
    table = load_labels(tiny_dataset.bids_dir, LabelConfig())
    assert len(table) == 4 * 2 and table["participant_id"].nunique() == 4
    assert set(table["label"]) == {"AD", "CN"} and table["age"].notna().all()
    assert table.groupby("participant_id")["is_baseline"].sum().eq(1).all()


def test_natural_key_orders_numbers() -> None:
    assert sorted(["sub-10", "sub-2", "sub-1a"], key=natural_key) == ["sub-1a", "sub-2", "sub-10"]


def test_label_table_round_trip(longitudinal: Path) -> None:
    table = load_labels(longitudinal, LabelConfig())
    path = longitudinal / "out.tsv"
    path.write_text(format_label_table(table))
    back = read_label_table(path)
    pd.testing.assert_frame_equal(back, table)


def test_demographics_table_counts_and_age() -> None:
    table = pd.DataFrame(
        {
            "participant_id": ["sub-1", "sub-1", "sub-2", "sub-3", "sub-4"],
            "session_id": ["ses-M0", "ses-M12", "ses-M0", "ses-M0", "ses-M0"],
            "label": ["AD", "AD", "AD", "CN", "CN"],
            "age": [70.0, 71.0, 80.0, 60.0, np.nan],
            "sex": ["F", "F", "M", "F", "n/a"],
            "group": ["train", "train", "train", "train", "test"],
        }
    )
    demo = demographics_table(table).set_index(["group", "label"])
    ad = demo.loc[("train", "AD")]
    assert (ad["n_subjects"], ad["n_sessions"], ad["sex_F"], ad["sex_M"]) == (2, 3, 1, 1)
    assert ad["age_mean"] == 75.0 and math.isclose(ad["age_sd"], np.std([70, 80], ddof=1), abs_tol=0.01)
    assert ad["age"] == "75.0 ± 7.1"
    assert demo.loc[("train", "all"), "n_subjects"] == 3
    assert demo.loc[("test", "CN"), "sex_unknown"] == 1 and demo.loc[("test", "CN"), "age"] == "n/a"
