"""Input selection and its exit codes: missing participants, filters, validation, bad datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bids_app.inputs.bids_query import participant_ignore_regex
from tests.conftest import run_cli


def test_ignore_regex_keeps_only_requested_participants() -> None:
    pattern = participant_ignore_regex(["01", "10"])
    assert not pattern.search("/sub-01")
    assert not pattern.search("/sub-10/anat/x.nii.gz")
    assert pattern.search("/sub-011")
    assert pattern.search("/sub-02/anat")
    assert isinstance(pattern, re.Pattern)


def test_unknown_participant_exits_66_naming_it(tiny_dataset, tmp_path: Path) -> None:
    result = run_cli(str(tiny_dataset.bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "999")
    assert result.returncode == 66
    assert "999" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a refused run


def test_missing_or_empty_bids_dir(tmp_path: Path) -> None:
    assert run_cli(str(tmp_path / "nope"), str(tmp_path / "out"), "participant").returncode == 66
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(str(empty), str(tmp_path / "out"), "participant")
    assert result.returncode == 66


def test_dataset_without_description_exits_66(tiny_copy: Path, tmp_path: Path) -> None:
    (tiny_copy / "dataset_description.json").unlink()
    result = run_cli(str(tiny_copy), str(tmp_path / "out"), "participant")
    assert result.returncode == 66
    assert "dataset_description.json" in result.stderr


def test_filter_selecting_nothing_exits_18_and_prints_filters(tiny_dataset, tmp_path: Path) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    result = run_cli(str(tiny_dataset.bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "001",
                     "--bids-filter-file", str(filters), "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 18
    assert '"acquisition": "mprage"' in result.stderr


def test_session_filter_selecting_nothing_exits_18(tiny_dataset, tmp_path: Path) -> None:
    result = run_cli(str(tiny_dataset.bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "001",
                     "--session-label", "M999", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 18


def test_invalid_input_exits_16_with_validator_codes(tiny_copy: Path, tmp_path: Path) -> None:
    anat = next((tiny_copy / "sub-001").glob("ses-*/anat"))
    (anat / "sub-001_notbids.nii.gz").write_bytes(b"x")
    result = run_cli(str(tiny_copy), str(tmp_path / "out"), "participant", "--participant-label", "001")
    assert result.returncode == 16
    assert "NOT_INCLUDED" in result.stderr or "FILENAME" in result.stderr


def test_validation_is_restricted_to_requested_participants(tiny_copy: Path, tmp_path: Path) -> None:
    """A broken file of another participant does not fail validation of the requested one."""
    anat = next((tiny_copy / "sub-004").glob("ses-*/anat"))
    (anat / "sub-004_notbids.nii.gz").write_bytes(b"x")
    result = run_cli(str(tiny_copy), str(tmp_path / "out"), "participant", "--participant-label", "001",
                     "--modes", "image", "--crop-shape", "40", "48", "40",
                     "--template", str(next((tiny_copy / "code" / "template").glob("tpl-*_T1w.nii.gz"))))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_uncreatable_output_exits_73(tiny_dataset, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder's parent should be")
    result = run_cli(str(tiny_dataset.bids_dir), str(blocker / "out"), "participant", "--participant-label", "001")
    assert result.returncode == 73
    assert str(blocker) in result.stderr


def test_bids_database_dir_persists_the_index(tiny_dataset, tmp_path: Path) -> None:
    database = tmp_path / "db"
    args = [str(tiny_dataset.bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "001",
            "--bids-database-dir", str(database), "--skip-bids-validation", "--modes", "image",
            "--crop-shape", "40", "48", "40", "--template", str(tiny_dataset.template_path)]  # fmt: skip
    assert run_cli(*args).returncode == 0
    assert any(database.rglob("*.sqlite")) or any(p.is_file() for p in database.rglob("*"))


def test_filter_keys_that_change_nothing_are_named_with_the_reason(tmp_path: Path) -> None:
    """t2w/flair without --contrasts, pet without --pet-tracer and any filter on a Clinica CAPS are dropped by the
    queries; each is one warning sentence (the participant level logs them first)."""
    from bids_app.config import AnalysisLevel, PreprocessConfig, RunConfig
    from bids_app.inputs.bids_query import unused_filters

    caps, derivative = tmp_path / "caps", tmp_path / "fmriprep"
    (caps / "subjects").mkdir(parents=True)
    derivative.mkdir()
    filters = {key: {"acquisition": "x"} for key in ("t1w", "t2w", "flair", "pet")}
    cfg = RunConfig(tmp_path / "bids", tmp_path / "out", AnalysisLevel.PARTICIPANT, bids_filters=filters,
                    preprocess=PreprocessConfig(contrasts=("FLAIR",)))  # fmt: skip
    assert unused_filters(cfg) == [
        "--bids-filter-file key 'pet' has no effect: PET images are read only with --pet-tracer.",
        "--bids-filter-file key 't2w' has no effect: raw T2w images are read only with --contrasts T2w.",
    ]
    cfg = RunConfig(tmp_path / "bids", tmp_path / "out", AnalysisLevel.PARTICIPANT, bids_filters=filters,
                    preprocess=PreprocessConfig(derivatives_dirs=(derivative, caps), pet_tracers=("FDG",)))  # fmt: skip
    notes = unused_filters(cfg)
    assert len(notes) == 3 and notes[2].startswith(f"--bids-filter-file key(s) pet, t1w have no effect on the "
                                                   f"Clinica CAPS {caps}: ")  # fmt: skip
    assert str(derivative) not in notes[2]
    cfg = RunConfig(tmp_path / "bids", tmp_path / "out", AnalysisLevel.PARTICIPANT, bids_filters={"t1w": {}},
                    preprocess=PreprocessConfig(derivatives_dirs=(derivative,)))  # fmt: skip
    assert unused_filters(cfg) == []
