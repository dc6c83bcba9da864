"""Group level end to end: participant outputs → split → train → predict, through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_cohort, run_cli, validate


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    """12 participants x 2 sessions at 4 mm, preprocessed input (no registration), image + slice tensors."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), 12, 2, "--modes", "image", "slice", "--discarded-slices", "4")


def group_args(dataset, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.01",
            "--n-splits", "2", "--test-size", "0.25", "--model-name", name, "--seed", "5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory: pytest.TempPathFactory):
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "cnn"))
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out, out / "models" / "cnn"


def test_maps_layout_is_complete(trained) -> None:
    _, out, maps = trained
    for name in ("maps.json", "environment.json", "groups/train+validation.tsv", "groups/test/data.tsv",
                 "groups/splits.json", "groups/demographics.tsv"):  # fmt: skip
        assert (maps / name).is_file(), name
    for k in (0, 1):
        assert (maps / f"split-{k}/best-loss/model.safetensors").is_file()
        training = read_tsv(maps / f"split-{k}/training_logs/training.tsv")
        assert len(training) == 2
        assert not (maps / f"split-{k}/tmp").exists()
        predictions = read_tsv(maps / f"split-{k}/best-loss/test/test_image_level_prediction.tsv")
        test = read_tsv(maps / "groups/test/data.tsv")
        assert len(predictions) == len(test)
        metrics = read_tsv(maps / f"split-{k}/best-loss/test/test_image_level_metrics.tsv")
        assert {"balanced_accuracy", "mcc", "roc_auc"} <= set(metrics["metric"])
    assert not list(maps.rglob("*.pt")) and not list(maps.rglob("*.pth"))
    assert validate(out).returncode == 0


def test_no_participant_on_two_sides(trained) -> None:
    _, _, maps = trained
    test = set(read_tsv(maps / "groups/test/data.tsv")["participant_id"])
    everyone: set[str] = set(test)
    for k in (0, 1):
        train = set(read_tsv(maps / f"groups/split-{k}/train.tsv")["participant_id"])
        validation = set(read_tsv(maps / f"groups/split-{k}/validation.tsv")["participant_id"])
        assert not train & validation
        assert not (train | validation) & test
        everyone |= train | validation
    assert len(everyone) == 12
    seen = set(read_tsv(maps / "groups/train+validation.tsv")["participant_id"])
    assert not seen & test


def test_same_seed_gives_identical_splits_and_predictions(trained, tmp_path: Path) -> None:
    dataset, out, maps = trained
    result = run_cli(*group_args(dataset, out, "cnn_again"))
    assert result.returncode == 0, result.stderr[-3000:]
    again = out / "models" / "cnn_again"
    for name in ("groups/test/data.tsv", "groups/split-0/train.tsv", "groups/split-1/validation.tsv",
                 "split-0/best-loss/test/test_image_level_prediction.tsv",
                 "split-1/best-loss/test/test_image_level_prediction.tsv",
                 "split-1/training_logs/training.tsv"):  # fmt: skip
        assert (maps / name).read_bytes() == (again / name).read_bytes(), name


def test_existing_model_folder_is_protected(trained) -> None:
    dataset, out, maps = trained
    before = (maps / "groups/splits.json").read_bytes()
    result = run_cli(*group_args(dataset, out, "cnn"))
    assert result.returncode == 64
    assert "--resume" in result.stderr
    assert (maps / "groups/splits.json").read_bytes() == before


def test_predicting_a_group_that_overlaps_training_is_refused(trained, tmp_path: Path) -> None:
    dataset, out, maps = trained
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("models", "logs"))
    result = run_cli(*group_args(dataset, out, "cnn", "--stages", "predict", "--predict-from", str(other),
                                 "--group-name", "external"))  # fmt: skip
    assert result.returncode == 65
    assert "leak" in result.stderr.lower()
    assert not list(maps.glob("split-*/best-loss/external/*_prediction.tsv"))


def test_renamed_duplicate_scan_is_refused(trained, tmp_path: Path) -> None:
    """The same image under another participant id (a second cohort) is caught by its checksum."""
    dataset, out, maps = trained
    seen = read_tsv(maps / "groups/train+validation.tsv")["participant_id"].iloc[0]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("dataset_description.json", ".bidsignore"):
        shutil.copy(out / name, other / name)
    source = out / seen
    target = other / "sub-999"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.html", "figures"))
    for path in sorted(target.rglob(f"{seen}_*"), reverse=True):
        path.rename(path.with_name(path.name.replace(seen, "sub-999")))
    result = run_cli(*group_args(dataset, out, "cnn", "--stages", "predict", "--predict-from", str(other),
                                 "--group-name", "renamed"))  # fmt: skip
    assert result.returncode == 65
    assert "sub-999" in result.stderr


def test_resolved_config_is_recorded(trained) -> None:
    _, out, _ = trained
    runs = sorted((out / "logs").glob("*_group_*"))
    assert runs
    text = (runs[0] / "config.toml").read_text()
    assert 'architecture = "small_cnn"' in text
    assert "seed = 5" in text


def test_missing_label_column_is_a_data_error(cohort) -> None:
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "nolabel", "--label", "nonexistent"))
    assert result.returncode == 65
    assert "nonexistent" in result.stderr


def test_unknown_architecture_is_refused_before_work(cohort) -> None:
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "badarch", "--architecture", "conv5fc3"))
    assert result.returncode == 64
    assert "Did you mean 'conv5_fc3'" in result.stderr


def test_parent_label_split_respects_the_subset_split(cohort) -> None:
    """Transfer-safe nesting: the parent split keeps every subset participant on the same side."""
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "nested", "--stages", "split", "--parent-label", "sex"))
    assert result.returncode == 0, result.stderr[-3000:]
    groups = out / "models" / "nested" / "groups"
    parent = read_tsv(groups / "parent-sex_split.tsv")
    subset_test = set(read_tsv(groups / "test/data.tsv")["participant_id"])
    assert subset_test <= set(parent[parent["split"] == "test"]["participant_id"])
    for k in (0, 1):
        validation = set(read_tsv(groups / f"split-{k}/validation.tsv")["participant_id"])
        rows = parent[parent["split"] == str(k)]
        assert validation <= set(rows[rows["side"] == "validation"]["participant_id"])
        assert not validation & set(rows[rows["side"] == "train"]["participant_id"])
    # the parent split is a valid --split-file: a pre-training model can use it as is
    pretrain = run_cli(*group_args(dataset, out, "parent", "--stages", "split", "--label", "sex",
                                   "--split-file", str(groups / "parent-sex_split.tsv")))  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]


def test_failed_qc_images_can_be_left_out_of_the_splits(cohort, tmp_path: Path) -> None:
    dataset, out = cohort
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("models", "logs"))
    qc_file = next(copy.glob("sub-002/ses-M000/qc/*_desc-qc_T1w.json"))
    record = json.loads(qc_file.read_text())
    record["smoothed_correlation_to_template"] = 0.1  # a gross misregistration
    qc_file.write_text(json.dumps(record))
    result = run_cli(*group_args(dataset, copy, "qc", "--stages", "split", "--exclude-failed-qc"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_tsv(copy / "qc_summary.tsv")
    assert len(summary) == 24

    def listed_pairs(name: str) -> set[tuple[str, str]]:
        groups = copy / "models" / name / "groups"
        tables = [read_tsv(p) for p in groups.rglob("*.tsv") if p.name != "demographics.tsv"]
        listed = pd.concat(tables)
        return set(zip(listed["participant_id"], listed["session_id"], strict=True))

    assert ("sub-002", "ses-M000") not in listed_pairs("qc")
    # the same split without the option keeps the image: the flag, not chance, left it out
    result = run_cli(*group_args(dataset, copy, "noqc", "--stages", "split"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("sub-002", "ses-M000") in listed_pairs("noqc")
