"""The participant level starts its worker processes before validating and indexing the inputs (issue 16: their
imports and template loading overlap that work), without changing what a refused run does."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli


def test_the_validators_refusal_still_comes_first_with_workers_started(tiny_copy: Path, tmp_path: Path) -> None:
    """Two processes, an invalid file and a session filter that selects nothing: the validator's refusal (exit 16)
    wins over the query's (exit 18), as when validation ran before the query, and no participant is processed."""
    anat = next((tiny_copy / "sub-001").glob("ses-*/anat"))
    (anat / "sub-001_notbids.nii.gz").write_bytes(b"x")
    out = tmp_path / "out"
    result = run_cli(str(tiny_copy), str(out), "participant", "--participant-label", "001", "002",
                     "--session-label", "M999", "--nprocs", "2")  # fmt: skip
    assert result.returncode == 16, result.stderr[-2000:]
    assert "NOT_INCLUDED" in result.stderr or "FILENAME" in result.stderr
    assert not list(out.glob("sub-*"))


def test_a_prepared_worker_holds_the_qc_reference_and_the_parent_does_not(tiny_dataset) -> None:
    from bids_app.config import PreprocessConfig
    from bids_app.participant import job

    preprocess = PreprocessConfig(crop_shape=(40, 48, 40), template_path=next(
        (tiny_dataset.bids_dir / "code" / "template").glob("tpl-*_T1w.nii.gz")))  # fmt: skip
    job._TEMPLATE_SETS.clear()
    template, crop, reference = job._load_template_set(preprocess, qc=False)  # the parent's check_extraction
    assert reference is None and crop.shape == (40, 48, 40)
    job.prepare_worker(preprocess)
    again, same_crop, reference = job._load_template_set(preprocess, qc=False)
    assert again is template and same_crop is crop  # read once per process
    assert reference is not None and reference.shape == (40, 48, 40)
    job._TEMPLATE_SETS.clear()
