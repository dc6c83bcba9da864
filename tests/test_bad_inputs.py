"""Bad inputs, one test per row of docs/bad_inputs.md: message, exit code, and no damage to existing outputs.

The runs go through ``bids_app.cli.main.main``, the function behind ``bids_app`` and ``python -m bids_app``
(``raise SystemExit(main())``): it returns the exit code the process would end with and logs the message
to stderr, without paying an interpreter start per row. A module-wide output (every participant processed,
one model trained) exists before the bad runs; each row checks that its files are byte-identical afterwards
(records of the latest run excepted: its ``logs/<run-id>/``, the status tables and the participant's report).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.cli.main import main
from bids_app.derivatives import file_sha256
from tests.conftest import TINY_CROP, make_cohort

# Records of the latest run rather than outputs: its log folder, the status tables that list its failures, and
# a participant's HTML report (with its figures), which shows the images that run processed.
RECORDS_OF_THE_RUN = re.compile(r"^(logs/|status/|participant_status\.tsv$|sub-\w+/(figures/|sub-\w+_report\.html$))")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not RECORDS_OF_THE_RUN.match(p.relative_to(root).as_posix())
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """6 participants x 2 sessions processed (image tensors) and one trained model, before any bad run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dataset, out = make_cohort(root, 6, 2, "--modes", "image", "--skip-bids-validation", seed=4, effect_size=0.5)
    assert main(group_args(dataset, out, "--model-name", "model")) == 0
    return {"dataset": dataset, "out": out, "hashes": tree_hashes(out)}


def participant_args(dataset: Any, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
            "--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--modes", "image",
            "--skip-bids-validation", *extra]  # fmt: skip


def group_args(dataset: Any, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "2", "--n-splits", "2", "--test-size", "0.34",
            "--seed", "1", "--device", "cpu", *extra]  # fmt: skip


@contextlib.contextmanager
def altered(*paths: Path) -> Iterator[None]:
    """Restore ``paths`` (files) to their current bytes, or absence, when the block ends."""
    saved = {path: path.read_bytes() if path.is_file() else None for path in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def assert_outputs_untouched(world: dict[str, Any]) -> None:
    assert tree_hashes(world["out"]) == world["hashes"]


def errors_of(stderr: str) -> str:
    """The ERROR lines of a run's log output, joined."""
    return "\n".join(line for line in stderr.splitlines() if " ERROR " in line)


# -- the dataset itself -----------------------------------------------------------------------------------


def test_missing_bids_dir(tmp_path: Path, capsys) -> None:
    code, err = run([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"], capsys)
    assert code == 66
    assert re.search(r"BIDS_DIR .*nope does not exist or is not a folder\. Check the first argument", err)
    assert not (tmp_path / "out").exists()


def test_empty_bids_dir(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, err = run([str(tmp_path / "empty"), str(tmp_path / "out"), "participant"], capsys)
    assert code == 66
    assert re.search(r"empty/dataset_description\.json is missing: .* is not a BIDS dataset\. Add a", err)
    assert not (tmp_path / "out").exists()


def test_participant_without_t1w(world: dict[str, Any], capsys) -> None:
    dataset = world["dataset"]
    images = sorted((dataset.bids_dir / "sub-002").rglob("*_T1w.*")) + sorted(
        (dataset.derivative_dir / "sub-002").rglob("*_T1w.*")
    )
    with altered(*images):
        for image in images:
            image.unlink()
        code, err = run(participant_args(dataset, world["out"], "--participant-label", "002"), capsys)
        assert code == 66
        assert "No t1w image for participant(s) 002 in" in err and "anat/*_T1w.nii[.gz]" in err
        # among other participants: they are processed, the missing one is a failed row of the status table
        code, err = run(participant_args(dataset, world["out"], "--participant-label", "001", "002"), capsys)
        assert code == 65
        assert "participant_status.tsv" in errors_of(err)
    status = pd.read_csv(world["out"] / "participant_status.tsv", sep="\t", dtype=str, keep_default_na=False)
    failed = status[status["status"] == "failed"]
    assert list(failed["participant_id"]) == ["sub-002"]
    assert "No T1w image for participant 002" in failed["message"].iloc[0]
    assert_outputs_untouched(world)


# -- images -----------------------------------------------------------------------------------------------


def write_bad_image(path: Path, case: str) -> None:
    """Replace the (already processed) image ``path`` by a defective one."""
    good = nib.load(path)
    data, affine = np.asarray(good.dataobj, dtype=np.float32), good.affine
    if case == "corrupted":
        path.write_bytes(path.read_bytes()[:400])  # a truncated gzip stream
        return
    if case == "4d":
        data = np.stack([data, data], axis=-1)
    elif case == "2d":
        data = data[:, :, data.shape[2] // 2]
    elif case == "nan":
        data[3, 4, 5] = np.nan
    elif case == "inf":
        data[3, 4, 5] = np.inf
    elif case == "absurd_voxels":
        affine = np.diag([40.0, 40.0, 40.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("corrupted", r"Cannot read .*preprocessed image .*\.nii\.gz.* Re-export or re-download the image"),
        ("4d", r"preprocessed image .*\.nii\.gz is 4D with shape \(\d+, \d+, \d+, 2\); a 3D volume is expected\. "
               r"Pass a single volume"),
        ("2d", r"preprocessed image .*\.nii\.gz has shape \(\d+, \d+\): it is 2D .*Check the conversion from DICOM"),
        ("nan", r"preprocessed image .*\.nii\.gz contains 1 NaN and 0 infinite voxel\(s\)\. Replace them"),
        ("inf", r"preprocessed image .*\.nii\.gz contains 0 NaN and 1 infinite voxel\(s\)\. Replace them"),
        ("absurd_voxels", r"preprocessed image .*\.nii\.gz has voxel size \(40\.0, 40\.0, 40\.0\) mm, outside "
                          r"0\.1–10\.0 mm\. Check the header's units"),
    ],
)  # fmt: skip
def test_defective_image(case: str, pattern: str, world: dict[str, Any], capsys) -> None:
    dataset = world["dataset"]
    image = sorted((dataset.derivative_dir / "sub-002").rglob("*desc-preproc_T1w.nii.gz"))[0]
    with altered(image):
        write_bad_image(image, case)
        code, err = run(participant_args(dataset, world["out"], "--participant-label", "002"), capsys)
    assert code == 65
    assert re.search(pattern, errors_of(err)), err[-2000:]
    assert image.name in errors_of(err)
    status = pd.read_csv(world["out"] / "status" / "sub-002_status.tsv", sep="\t", dtype=str)
    assert (status["status"] == "failed").sum() == 1  # the defective session; the other one is up to date
    assert_outputs_untouched(world)  # the earlier outputs of that session are kept, not half-replaced


# -- label tables -----------------------------------------------------------------------------------------


def edit_tsv(path: Path, change: Any) -> None:
    """Rewrite a TSV with ``change(table)``: it edits the table in place or returns the new one."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    changed = change(table)
    table = table if changed is None else changed
    path.write_text(table.to_csv(sep="\t", index=False, lineterminator="\n"))


def test_participants_tsv_missing(world: dict[str, Any], capsys) -> None:
    tsv = world["dataset"].bids_dir / "participants.tsv"
    sessions = sorted(world["dataset"].bids_dir.glob("sub-*/sub-*_sessions.tsv"))
    with altered(tsv, *sessions):
        tsv.unlink()
        for path in sessions:  # the label would otherwise come from sessions.tsv
            edit_tsv(path, lambda t: t.drop(columns=["diagnosis"]))
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m1"), capsys)
    assert code == 66
    assert re.search(r"No participants\.tsv in .*bids: the group level reads labels from it\. Add a participants", err)
    assert_outputs_untouched(world)


def test_label_column_missing(world: dict[str, Any], capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m2", "--label", "dx"), capsys)
    assert code == 65
    assert re.search(
        r"Label column 'dx' is in neither .*participants\.tsv.*\(available columns: age, diagnosis, sex\)", err
    ), err[-2000:]
    assert_outputs_untouched(world)


def test_mixed_types_in_a_regression_label(world: dict[str, Any], capsys) -> None:
    tsv = world["dataset"].bids_dir / "participants.tsv"
    sessions = sorted(world["dataset"].bids_dir.glob("sub-*/sub-*_sessions.tsv"))

    def older(table: pd.DataFrame) -> None:
        table.loc[table["participant_id"] == "sub-003", "age"] = "old"

    with altered(tsv, *sessions):
        edit_tsv(tsv, older)
        for path in sessions:
            edit_tsv(path, lambda t: t.drop(columns=["age"]))
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m3", "--label", "age",
                                   "--task", "regression"), capsys)  # fmt: skip
    assert code == 65
    assert re.search(r"Regression label 'age' is not numeric for 2 image\(s\): sub-003 ses-M000='old'", err)
    assert "Fix the values or use --task classification" in err
    assert_outputs_untouched(world)


def test_label_for_some_sessions_only(world: dict[str, Any], capsys) -> None:
    path = world["dataset"].bids_dir / "sub-003" / "sub-003_sessions.tsv"

    def drop_second(table: pd.DataFrame) -> None:
        table.loc[table["session_id"] == "ses-M012", "diagnosis"] = "n/a"

    with altered(path):
        edit_tsv(path, drop_second)
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m4"), capsys)
    assert code == 65
    assert "Label 'diagnosis' is missing (n/a or empty) for 1 participant/session(s)" in err
    assert "sub-003 ses-M012. Fill them in participants.tsv / sessions.tsv" in err
    assert_outputs_untouched(world)


def test_one_class_only(world: dict[str, Any], capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m5", "--classes", "AD"), capsys)
    assert code == 65
    assert "Label 'diagnosis' has a single class (AD)" in err and "Select at least two classes" in err
    assert_outputs_untouched(world)


# -- splits -----------------------------------------------------------------------------------------------


def test_fewer_subjects_than_folds(world: dict[str, Any], capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m6", "--n-splits", "10"), capsys)
    assert code == 65
    assert "fewer than 10 folds (n_splits). Lower --n-splits or --test-size, or add participants" in err
    assert not (world["out"] / "models" / "m6" / "groups").exists()
    assert_outputs_untouched(world)


def test_split_file_that_leaks(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    split_file = tmp_path / "split.tsv"
    split_file.write_text(
        "participant_id\tsplit\tside\n"
        "sub-001\ttest\tn/a\nsub-002\t0\ttrain\nsub-003\t0\ttrain\nsub-004\t0\tvalidation\n"
        "sub-005\t0\tvalidation\nsub-001\t0\ttrain\nsub-006\t0\ttrain\n"
    )
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m7", "--split-file",
                               str(split_file)), capsys)  # fmt: skip
    assert code == 65
    assert re.search(
        r"Data leak in split file .*split\.tsv \(test vs train/validation\): 1 participant\(s\) on both "
        r"sides: sub-001\. A participant must be on one side only",
        err,
    )
    assert not (world["out"] / "models" / "m7" / "groups").exists()
    assert_outputs_untouched(world)


# -- model folders ----------------------------------------------------------------------------------------


def test_maps_from_another_major_version(world: dict[str, Any], capsys) -> None:
    maps_json = world["out"] / "models" / "model" / "maps.json"
    content = json.loads(maps_json.read_text())
    with altered(maps_json):
        maps_json.write_text(json.dumps({**content, "bids_app_version": "9.0.0"}))
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "model", "--stages", "predict"),
                        capsys)  # fmt: skip
        assert code == 65
        assert "maps.json was written by bids_app 9.0.0" in err and "Use bids_app 9.x to read it, or re-train" in err
    assert_outputs_untouched(world)


def test_maps_with_a_missing_file(world: dict[str, Any], capsys) -> None:
    model = world["out"] / "models" / "model" / "split-0" / "best-loss" / "model.safetensors"
    with altered(model):
        model.unlink()
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "model", "--stages", "predict"),
                        capsys)  # fmt: skip
        assert code == 65
        assert "model.safetensors is missing although split 0 finished training. Re-train split 0" in err
    assert_outputs_untouched(world)


def test_maps_that_does_not_exist(world: dict[str, Any], capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "absent", "--stages", "predict"),
                    capsys)  # fmt: skip
    assert code == 66
    assert re.search(r"Model folder .*models/absent does not exist\. Train a model first", err)
    assert_outputs_untouched(world)


def test_amp_on_a_cpu(world: dict[str, Any], capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m8", "--amp"), capsys)
    assert code == 64
    assert "--amp (runtime.amp) is refused on device cpu: CPU mixed precision is bfloat16" in errors_of(err)
    assert "Drop --amp (--channels-last is the CPU speed-up) or train on a GPU (--device cuda)" in err
    assert not (world["out"] / "models" / "m8").exists()
    assert_outputs_untouched(world)


# -- command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["../x", "a/b", "0_1", "01.2", "sub-0 1"])
def test_participant_label_with_path_or_other_characters(label: str, world: dict[str, Any], capsys) -> None:
    code, err = run(participant_args(world["dataset"], world["out"], "--participant-label", label), capsys)
    assert code == 64
    assert f"Invalid participant label {label!r}: BIDS labels are alphanumeric only" in err
    assert_outputs_untouched(world)


def test_every_row_of_the_table_names_an_existing_test() -> None:
    """docs/bad_inputs.md and the tests stay one to one."""
    repo = Path(__file__).resolve().parent.parent
    table = (repo / "docs" / "bad_inputs.md").read_text()
    named = re.findall(r"`(tests/(?:\w+/)*test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 20
    for file, test in named:
        assert re.search(rf"^def {test}\(", (repo / file).read_text(), flags=re.MULTILINE), f"{file}::{test}"
    here = set(re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), flags=re.MULTILINE))
    here.discard("test_every_row_of_the_table_names_an_existing_test")
    assert here <= {test for file, test in named if file == "tests/test_bad_inputs.py"}
