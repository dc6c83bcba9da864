"""The group level writes only where it must, loses nothing on a re-run and honours every input selection.

Each test runs ``bids_app.cli.main.main`` (the function behind the ``bids_app`` command) against one output
that holds processed participants and a trained model, and compares sha256 listings of BIDS_DIR and
OUTPUT_DIR before and after: a refused run writes nothing at all (not even its log folder), and no run loses
what was there. Rows of docs/bad_inputs.md name these tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bids_app.cli.main import main
from bids_app.derivatives import file_sha256
from tests.conftest import make_cohort, make_dataset


def listing(root: Path, skip_logs: bool = False) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (``logs/`` left out when ``skip_logs``)."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (skip_logs and p.relative_to(root).parts[0] == "logs")
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 participants x 2 sessions (image tensors) and one trained model ``m1``."""
    root = tmp_path_factory.mktemp("group_safety")
    dataset, out = make_cohort(root, 8, 2, "--modes", "image", "--skip-bids-validation", seed=8, effect_size=0.6)
    assert main(group_args(dataset, out, "--model-name", "m1")) == 0
    return {"root": root, "dataset": dataset, "out": out}


def group_args(dataset: Any, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "2", "--n-splits", "2", "--test-size", "2",
            "--n-bootstrap", "20", "--seed", "1", "--device", "cpu", *extra]  # fmt: skip


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def errors_of(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if " ERROR " in line)


@pytest.fixture
def untouched(world: dict[str, Any]):
    """Asserts, after the test, that BIDS_DIR and OUTPUT_DIR are byte-identical, logs included."""
    before = (listing(world["dataset"].bids_dir), listing(world["out"]))
    yield
    assert listing(world["dataset"].bids_dir) == before[0]
    assert listing(world["out"]) == before[1]


@pytest.fixture
def nothing_lost(world: dict[str, Any]):
    """Asserts, after the test, that BIDS_DIR and OUTPUT_DIR are byte-identical but for the run's own log folder.

    For refusals that depend on the data (which participants have tensors, which split a model keeps): the run
    reads the output first and records its error in ``logs/<run-id>/``.
    """
    before = (listing(world["dataset"].bids_dir), listing(world["out"], skip_logs=True))
    yield
    assert listing(world["dataset"].bids_dir) == before[0]
    assert listing(world["out"], skip_logs=True) == before[1]


# -- names that would become paths ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../bids/sub-001/model", "..", "../m2", "a/b", "<absolute>", ".m1"])
def test_model_name_that_is_a_path(name: str, world: dict[str, Any], tmp_path: Path, untouched, capsys) -> None:
    name = str(tmp_path / "elsewhere") if name == "<absolute>" else name
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", name), capsys)
    assert code == 64
    assert f"Invalid --model-name (train.model_name) {name!r}: a name, not a path" in errors_of(err)
    assert list(tmp_path.iterdir()) == []


def test_model_name_that_is_a_path_in_a_config_file(world: dict[str, Any], tmp_path: Path, untouched, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[train]\nmodel_name = "../../bids/sub-001/model"\n')
    code, err = run(group_args(world["dataset"], world["out"], "--config", str(config)), capsys)
    assert code == 64 and "Invalid --model-name (train.model_name)" in errors_of(err)


HOSTILE = ["..", "../x", "x/y", "/abs/x", "x/../y", "x\\y", ".", " x", ""]
LABEL_OPTIONS = {  # option → what else the run needs for the option to be used
    "--model-name": [],
    "--group-name": ["--stages", "predict", "--model-name", "m1", "--predict-from", "<out>"],
    "--interpret-group": ["--stages", "interpret", "--model-name", "m1"],
    "--parent-label": ["--model-name", "nested"],
}


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("option", sorted(LABEL_OPTIONS))
def test_label_options_refuse_paths(option: str, value: str, world: dict[str, Any], untouched, capsys) -> None:
    """Property: every group-level option whose value becomes a file or folder name refuses a path (64)."""
    extra = [str(world["out"]) if e == "<out>" else e for e in LABEL_OPTIONS[option]]
    code, err = run(group_args(world["dataset"], world["out"], *extra, option, value), capsys)
    assert code == 64, errors_of(err)
    assert f"Invalid {option} " in errors_of(err)


@pytest.mark.parametrize("option", ["--work-dir", "--bids-database-dir", "--track-dir"])
@pytest.mark.parametrize("inside", ["x", "derivatives/../sub-001", "sub-001/anat"])
def test_written_paths_never_point_into_bids_dir(option, inside, world: dict[str, Any], untouched, capsys) -> None:
    """Property: a folder the group level would write into is refused inside BIDS_DIR (but its derivatives/)."""
    target = f"{world['dataset'].bids_dir}/{inside}"
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m9", option, target), capsys)
    assert code == 64
    assert "bids_app never writes into the input dataset" in errors_of(err)


# -- re-runs of a trained model ---------------------------------------------------------------------------


def test_retraining_a_trained_model_needs_overwrite(world: dict[str, Any], untouched, capsys) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m1", "--stages", "train"), capsys)
    assert code == 64
    assert "already holds trained split(s) [0, 1]: --stages train would replace them. Pass --overwrite" in err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--learning-rate", "-1"], 64, "Invalid --learning-rate (train.learning_rate) -1.0"),
        (["--split-file", "/nonexistent/split.tsv"], 66, "--split-file /nonexistent/split.tsv does not exist"),
        (["--architecture", "conv5fc3"], 64, "Unknown architecture 'conv5fc3'"),
    ],
)
def test_overwrite_validates_before_deleting(extra, code, message, world: dict[str, Any], untouched, capsys) -> None:
    result, err = run(group_args(world["dataset"], world["out"], "--model-name", "m1", "--overwrite", *extra), capsys)
    assert result == code
    assert message in errors_of(err)


def test_a_failed_overwrite_leaves_the_old_model_whole(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    """The new model is built aside: a split file that empties a fold fails after the run started."""
    out, maps = world["out"], world["out"] / "models" / "m1"
    split = tmp_path / "split.tsv"
    split.write_text("participant_id\tsplit\tside\nsub-001\ttest\t\nsub-002\t0\ttrain\nsub-003\t0\tvalidation\n"
                     "sub-004\t1\tvalidation\nsub-005\t1\tvalidation\n")  # fmt: skip
    before = listing(maps)
    code, err = run(group_args(world["dataset"], out, "--model-name", "m1", "--overwrite", "--split-file", str(split)),
                    capsys)  # fmt: skip
    assert code == 65
    assert "Split 1 of --split-file" in err and "has an empty training set" in err
    assert listing(maps) == before
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(
        p.name for p in (out / "models").iterdir() if not p.name.startswith(".")
    )


def test_a_successful_overwrite_replaces_the_model_whole(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    maps = out / "models" / "m1"
    before = listing(maps)
    code, _ = run(group_args(world["dataset"], out, "--model-name", "m1", "--overwrite", "--seed", "2"), capsys)
    assert code == 0
    after = listing(maps)

    def names(files: dict[str, str]) -> set[str]:  # TensorBoard files are named after a time
        return {name.split("events.out.tfevents.")[0] for name in files}

    assert names(after) == names(before)  # the same files, made again
    assert after["groups/splits.json"] != before["groups/splits.json"]  # from the new seed
    assert not [p for p in (out / "models").iterdir() if p.name.startswith(".")]  # nothing left aside
    assert "<title>m1 group report</title>" in (maps / "report.html").read_text()


# -- selection --------------------------------------------------------------------------------------------


def read_ids(maps: Path) -> pd.DataFrame:
    tables = [pd.read_csv(maps / "groups" / name, sep="\t", dtype=str) for name in ("train+validation.tsv",
                                                                                   "test/data.tsv")]  # fmt: skip
    return pd.concat(tables)


@pytest.mark.parametrize(
    ("extra", "participants", "sessions"),
    [
        (["--participant-label", "001", "002", "003", "sub-004", "005", "006"], 6, {"ses-M000", "ses-M012"}),
        (["--session-label", "M000"], 8, {"ses-M000"}),
        (["--bids-filter-file", "<filter>"], 8, {"ses-M012"}),
    ],
)
def test_group_level_selects_what_it_is_told(extra, participants, sessions, world, tmp_path: Path, capsys) -> None:
    filter_file = tmp_path / "filter.json"
    filter_file.write_text(json.dumps({"t1w": {"session": "M012"}}))
    args = [str(filter_file) if e == "<filter>" else e for e in extra]
    name = f"sel{len(list((world['out'] / 'models').iterdir()))}"
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", name, "--n-splits", "1", *args),
                    capsys)  # fmt: skip
    assert code == 0, errors_of(err)
    ids = read_ids(world["out"] / "models" / name)
    assert ids["participant_id"].nunique() == participants
    assert set(ids["session_id"]) == sessions
    config = json.loads((world["out"] / "models" / name / "maps.json").read_text())["config"]
    assert config["run"].get("participant_labels", []) == (
        ["001", "002", "003", "004", "005", "006"] if "--participant-label" in extra else []
    )


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--participant-label", "001", "042"], 66, "--participant-label: sub-042 have no image tensor"),
        (["--bids-filter-file", '{"T1W": {"session": "M000"}}'], 64, "t1w, t2w, flair, pet (lower case). Did you"),
        (["--session-label", "M099"], 18, "keep none of the 16 image(s)"),
    ],
)
def test_a_selection_that_cannot_be_met(extra, code, message, world, tmp_path: Path, nothing_lost, capsys) -> None:
    if extra[0] == "--bids-filter-file":
        path = tmp_path / "filter.json"
        path.write_text(extra[1])
        extra = [extra[0], str(path)]
    result, err = run(group_args(world["dataset"], world["out"], "--model-name", "m9", *extra), capsys)
    assert result == code
    assert message in errors_of(err)


def test_a_selection_must_keep_the_split_it_reuses(world: dict[str, Any], nothing_lost, capsys) -> None:
    args = group_args(world["dataset"], world["out"], "--model-name", "m1", "--stages", "predict",
                      "--participant-label", "001", "002")  # fmt: skip
    code, err = run(args, capsys)
    assert code == 64
    assert "The selection leaves out" in errors_of(err) and "participant(s) of the split of" in errors_of(err)


def test_resume_with_another_split_file_is_refused(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    maps = out / "models" / "m1"
    before = listing(maps)
    split = tmp_path / "split.tsv"
    rows = ["participant_id\tsplit\tside", "sub-001\ttest\t", "sub-002\ttest\t"]
    rows += [f"sub-00{k}\t{k % 2}\t{'validation' if k < 5 else 'train'}" for k in range(3, 9)]
    rows += [f"sub-00{k}\t{1 - k % 2}\ttrain" for k in range(3, 9)]
    split.write_text("\n".join(rows) + "\n")
    code, err = run(group_args(world["dataset"], out, "--model-name", "m1", "--resume", "--split-file", str(split)),
                    capsys)  # fmt: skip
    assert code == 64
    assert "--resume continues the split of" in errors_of(err)
    assert listing(maps) == before


# -- OUTPUT_DIR belongs to someone -----------------------------------------------------------------------


def test_output_dir_of_another_pipeline(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    other = tmp_path / "fmriprep"
    other.mkdir()
    (other / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}))  # fmt: skip
    (other / "README.md").write_text("fMRIPrep's own README\n")
    before = listing(other)
    for level in (["participant", "-d", str(world["dataset"].derivative_dir)], ["group", "--label", "diagnosis"]):
        code, err = run([str(world["dataset"].bids_dir), str(other), *level], capsys)
        assert code == 64
        assert "is the derivative of another pipeline (GeneratedBy: fMRIPrep)" in errors_of(err)
        assert listing(other) == before


def test_output_dir_of_another_bids_dir(world: dict[str, Any], tmp_path: Path, untouched, capsys) -> None:
    second = make_dataset(tmp_path, 2, 1, seed=99)
    code, err = run([str(second.bids_dir), str(world["out"]), "participant", "-d", str(second.derivative_dir)],
                    capsys)  # fmt: skip
    assert code == 64
    assert f"holds the outputs of BIDS_DIR {world['dataset'].bids_dir.resolve()}, not of" in errors_of(err)


def test_output_dir_with_foreign_files_but_no_description(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    code, err = run([str(world["dataset"].bids_dir), str(folder), "group", "--label", "diagnosis"], capsys)
    assert code == 64 and "holds README.md but no dataset_description.json" in errors_of(err)
    assert (folder / "README.md").read_text() == "my notes\n" and len(list(folder.iterdir())) == 1


# -- option values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--learning-rate", "-1", "Invalid --learning-rate (train.learning_rate) -1.0: use a finite number > 0.0."),
        ("--learning-rate", "nan", "Invalid --learning-rate (train.learning_rate) nan"),
        ("--seed", "-5", "Invalid --seed (run.seed) -5: use an integer >= 0 and <= 4294967295."),
        ("--test-size", "nan", "Invalid --test-size (split.test_size) nan: use a finite number >= 0.0."),
        ("--test-size", "2.5", "a fraction of the participants (0 <= x < 1) or a whole count (x >= 1)"),
        ("--dropout", "1", "Invalid --dropout (train.dropout) 1.0: use a finite number >= 0.0 and < 1.0."),
        ("--epochs", "0", "Invalid --epochs (train.epochs) 0: use an integer >= 1."),
        ("--batch-size", "0", "Invalid --batch-size (train.batch_size) 0"),
        ("--n-bootstrap", "-1", "Invalid --n-bootstrap (predict.n_bootstrap) -1"),
        ("--device", "tpu", "Unknown device 'tpu' (runtime.device)"),
    ],
)
def test_invalid_numbers_are_refused_before_anything_is_written(
    option: str, value: str, message: str, world: dict[str, Any], untouched, capsys
) -> None:
    code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m9", option, value), capsys)
    assert code == 64
    assert message in errors_of(err)


def test_invalid_omp_threads_is_a_usage_error_up_front(world: dict[str, Any], untouched, capsys) -> None:
    args = [str(world["dataset"].bids_dir), str(world["out"]), "participant", "--omp-nthreads", "0"]
    code, err = run(args, capsys)
    assert code == 64
    assert "Invalid --omp-nthreads (run.omp_nthreads) 0: use an integer >= 1." in errors_of(err)


def test_a_new_output_dir_is_not_created_by_a_usage_error(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    code, _ = run(group_args(world["dataset"], tmp_path / "new_out", "--learning-rate", "0"), capsys)
    assert code == 64
    assert not (tmp_path / "new_out").exists()


# -- no test set, incomplete participant level ------------------------------------------------------------


def test_no_test_set(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("models"))
    code, err = run(group_args(world["dataset"], out, "--model-name", "nt", "--test-size", "0"), capsys)
    assert code == 0, errors_of(err)
    maps = out / "models" / "nt"
    assert pd.read_csv(maps / "groups/test/data.tsv", sep="\t").empty
    for k in (0, 1):
        assert (maps / f"split-{k}/best-loss/validation/validation_image_level_metrics.tsv").is_file()
        assert not (maps / f"split-{k}/best-loss/test").exists()
    assert "has no test set (--test-size 0)" in err
    assert "This model has no test set (--test-size 0)" in (maps / "report.html").read_text()


def test_group_level_says_what_the_participant_level_left_out(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("models"))
    for tensor in (out / "sub-008").rglob("*desc-image_T1w.*"):
        tensor.unlink()
    status = out / "status" / "sub-007_status.tsv"
    lines = status.read_text().splitlines()
    lines.append("sub-007\tses-M012\tx.nii.gz\tpreprocess\tfailed\tCannot read the image\t0.1")
    status.write_text("\n".join(lines) + "\n")
    code, err = run(group_args(world["dataset"], out, "--model-name", "part", "--n-splits", "1"), capsys)
    assert code == 0, errors_of(err)
    assert "1 of 8 participant(s) of" in err and "have no tensor in" in err and "sub-008" in err
    assert "sub-007 ses-M012: its latest participant-level run failed (Cannot read the image)" in err


# -- label tables that point at the wrong cause ---------------------------------------------------------


def test_label_errors_name_their_cause(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(world["dataset"].bids_dir, bids)
    for sessions in bids.glob("sub-*/sub-*_sessions.tsv"):
        sessions.unlink()  # labels from participants.tsv alone
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("models"))
    description = json.loads((out / "dataset_description.json").read_text())
    description["DatasetLinks"]["raw"] = bids.resolve().as_uri()
    (out / "dataset_description.json").write_text(json.dumps(description))
    table = (bids / "participants.tsv").read_text()
    args = group_args(world["dataset"], out, "--model-name", "lab")
    args[0] = str(bids)
    code, err = run([*args, "--classes", "ad", "CN"], capsys)
    assert code == 65 and "Class names are case-sensitive: 'ad' is spelled 'AD'." in errors_of(err)
    (bids / "participants.tsv").write_text(table.replace("sub-003\t", "sub-3\t"))
    code, err = run(args, capsys)
    assert code == 65 and "have no row in" in err and "sub-003 (listed as sub-3)" in errors_of(err)
    (bids / "participants.tsv").write_text(table.replace("\t", ","))
    code, err = run(args, capsys)
    assert code == 65 and "participants.tsv is not tab-separated" in errors_of(err)


# -- a model folder edited by hand -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace('"label_encoding": {', '"label_encoding": {"AD": 1, ', 1), "given twice"),
        (lambda text: text.replace('"CN": 1', '"CN": 0', 1), "does not number two or more classes 0..n-1 once"),
        (lambda text: text.replace('"input_shape": [\n    1,\n    40', '"input_shape": [\n    1,\n    20', 1),
         "was trained on (1, 20, 48, 40)"),
    ],
)  # fmt: skip
def test_a_tampered_model_record_is_refused(edit, message, world: dict[str, Any], capsys) -> None:
    record = world["out"] / "models" / "m1" / "maps.json"
    original = record.read_text()
    try:
        edited = edit(original)
        assert edited != original
        record.write_text(edited)
        code, err = run(group_args(world["dataset"], world["out"], "--model-name", "m1", "--stages", "predict"),
                        capsys)  # fmt: skip
        assert code == 65
        assert message in errors_of(err)
    finally:
        record.write_text(original)


def test_a_model_notices_that_its_tensors_were_made_again(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    """The participant level re-run with other settings rewrites tensors the model was trained on: refused.

    float16 changes the tensors' bytes but not a setting prediction matches (a normalisation would be refused
    earlier, by the settings check, with another message)."""
    from tests.conftest import TINY_CROP

    dataset, out = world["dataset"], tmp_path / "out"
    shutil.copytree(world["out"], out)
    participant = [str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir), "--template",
                   str(dataset.template_path), "--crop-shape", *TINY_CROP, "--modes", "image",
                   "--skip-bids-validation", "--participant-label", "003", "--tensor-dtype", "float16"]  # fmt: skip
    assert main(participant) == 0
    maps = out / "models" / "m1"
    before = listing(maps)
    code, err = run(group_args(dataset, out, "--model-name", "m1", "--stages", "predict"), capsys)
    assert code == 65
    assert "are not the ones model m1 was made with: sub-003 ses-M000, sub-003 ses-M012" in errors_of(err)
    assert listing(maps) == before
