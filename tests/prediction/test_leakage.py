"""Leak checks on in-memory tables: which pairs are found, in which order, and what is refused or recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from bids_app.config import AnalysisLevel, RunConfig
from bids_app.errors import DataError, InputMissingError, LeakError
from bids_app.maps import Maps
from bids_app.prediction.leakage import LEAK_WARNING_FILE, LeakFinding, check_leaks, enforce_no_leak, training_checksums

COLUMNS = ["participant_id", "session_id", "source_sha256", "raw_source_sha256"]


def frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


TRAIN = frame(
    [
        ("sub-r1", "ses-M000", "s-r1", "r-r1"),
        ("sub-r2", "ses-M000", "s-r2", "r-r2"),
        ("sub-r3", "ses-M000", "n/a", "n/a"),  # checksums unknown: only its id can match
    ]
)


def create_maps(root: Path) -> Maps:
    """A model folder in ``root`` (``maps.json``, ``environment.json``) without a split yet."""
    cfg = RunConfig(root / "bids", root, AnalysisLevel.GROUP)
    return Maps.create(root, cfg, {"input_shape": [1, 2, 2, 2], "n_outputs": 2, "label_encoding": {"CN": 0, "AD": 1}})


def write_train_tsv(maps_dir: Path, table: pd.DataFrame) -> None:
    (maps_dir / "groups").mkdir(parents=True, exist_ok=True)
    table.to_csv(maps_dir / "groups" / "train+validation.tsv", sep="\t", index=False)


def test_check_leaks_finds_ids_then_each_checksum_but_never_unknown_ones(tmp_path: Path) -> None:
    group = frame(
        [
            ("sub-g1", "ses-M000", "s-g1", "r-g1"),  # clean
            ("sub-r1", "ses-M006", "s-x", "r-x"),  # same participant, other session
            ("sub-g2", "ses-M000", "s-r2", "r-g2"),  # sub-r2's preprocessed image renamed
            ("sub-g3", "ses-M000", "s-g3", "r-r1"),  # sub-r1's raw scan renamed
            ("sub-g4", "ses-M000", "n/a", ""),  # unknown checksums must not match sub-r3's n/a
        ]
    )
    maps = create_maps(tmp_path)
    assert check_leaks(maps, group, TRAIN) == [
        LeakFinding("participant", "sub-r1", "ses-M006", "sub-r1", "ses-M000", ""),
        LeakFinding("source_sha256", "sub-g2", "ses-M000", "sub-r2", "ses-M000", "s-r2"),
        LeakFinding("raw_source_sha256", "sub-g3", "ses-M000", "sub-r1", "ses-M000", "r-r1"),
    ]
    assert check_leaks(maps, group.iloc[[0, 4]], TRAIN) == []


def test_check_leaks_reads_the_maps_pool_and_names_missing_inputs(tmp_path: Path) -> None:
    group = frame([("sub-r2", "ses-M000", "s-g", "r-g")])
    maps = create_maps(tmp_path)
    with pytest.raises(InputMissingError, match=r"train\+validation\.tsv does not exist.*Re-run the split stage"):
        check_leaks(maps, group)
    write_train_tsv(tmp_path, TRAIN.drop(columns="source_sha256"))
    with pytest.raises(DataError, match=r"train\+validation\.tsv has no column\(s\) source_sha256"):
        check_leaks(maps, group)
    write_train_tsv(tmp_path, TRAIN)
    assert maps.training_pool().equals(TRAIN)
    assert [f.reason for f in check_leaks(maps, group)] == ["participant"]


def test_enforce_no_leak_refuses_lists_five_and_records_when_allowed(tmp_path: Path) -> None:
    findings = [LeakFinding("participant", f"sub-{i}", "ses-M000", f"sub-{i}", "ses-M006") for i in range(7)]
    with pytest.raises(LeakError, match="Group 'ext' shares 7 image pair\\(s\\)") as caught:
        enforce_no_leak(findings, "ext", allow_leak=False, group_dir=tmp_path)
    message = str(caught.value)
    assert "sub-4 ses-M000 ~ sub-4 ses-M006 (participant)" in message and "sub-5 " not in message
    assert "and 2 more" in message and "--allow-leak" in message
    assert not (tmp_path / LEAK_WARNING_FILE).exists()

    enforce_no_leak(findings, "ext", allow_leak=True, group_dir=tmp_path)
    warning = json.loads((tmp_path / LEAK_WARNING_FILE).read_text())
    assert warning["Group"] == "ext" and [p["participant_id"] for p in warning["Pairs"]] == [
        f"sub-{i}" for i in range(7)
    ]
    enforce_no_leak([], "ext", allow_leak=False, group_dir=tmp_path)
    assert not (tmp_path / LEAK_WARNING_FILE).exists()


def test_training_checksums_fill_from_the_output_or_mark_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    maps = create_maps(tmp_path)
    write_train_tsv(tmp_path, TRAIN[["participant_id", "session_id"]].assign(label="CN"))
    output = frame([("sub-r1", "ses-M000", "s-r1", "r-r1"), ("sub-r2", "ses-M000", "s-r2", "r-r2")])
    with caplog.at_level(logging.WARNING, logger="bids_app.prediction.leakage"):
        train = training_checksums(maps, output)
    assert train[COLUMNS].values.tolist() == TRAIN.values.tolist()
    assert train["label"].tolist() == ["CN"] * 3
    assert "1 training/validation image(s) have no tensor left" in caplog.text

    write_train_tsv(tmp_path, TRAIN)
    assert training_checksums(maps, output.iloc[:0]).equals(TRAIN)  # recorded checksums win


def test_enforce_no_leak_groups_reasons_per_pair_and_shows_similarity(tmp_path: Path) -> None:
    findings = [
        LeakFinding("raw_source_sha256", "sub-b1", "ses-M000", "sub-a1", "ses-M000", "abc"),
        LeakFinding("fingerprint", "sub-b1", "ses-M000", "sub-a1", "ses-M000", "", 0.98765),
        LeakFinding("fingerprint", "sub-b2", "ses-M000", "sub-a2", "ses-M012", "", 0.61),
    ]
    with pytest.raises(LeakError) as caught:
        enforce_no_leak(findings, "cohortb", allow_leak=False, group_dir=tmp_path)
    message = str(caught.value)
    assert "shares 2 image pair(s)" in message
    assert "sub-b1 ses-M000 ~ sub-a1 ses-M000 (raw_source_sha256, fingerprint 0.988)" in message
    assert "sub-b2 ses-M000 ~ sub-a2 ses-M012 (fingerprint 0.610)" in message
    assert "groups/identity_fingerprints.json" in message
    enforce_no_leak(findings, "cohortb", allow_leak=True, group_dir=tmp_path)
    pairs = json.loads((tmp_path / LEAK_WARNING_FILE).read_text())["Pairs"]
    assert [p["similarity"] for p in pairs] == [None, 0.98765, 0.61]
