"""The model folder as the group level writes it, and the model folder deciding how a later run reads the data.

A roi or patch model is predicted in a run that does not repeat ``--mode``, on an output that also holds image
tensors (the default mode): the model folder's record decides which tensors are read, never the default.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_cohort, run_cli

GOLDEN_TREE = Path(__file__).parent / "golden" / "maps_tree.txt"
PATCH = ("--patch-size", "20", "--stride", "20")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    """10 participants x 1 session: image, patch and roi tensors side by side in one output."""
    root = tmp_path_factory.mktemp("model_folder")
    mask = root / "bids" / "code" / "template" / "roi-hippocampus_mask.nii.gz"  # written by the generator
    return make_cohort(root, 10, 1, "--modes", "image", "patch", "roi", *PATCH, "--roi-mask", f"hippocampus={mask}",
                       "--skip-bids-validation", seed=21, effect_size=0.8)  # fmt: skip


def group(dataset, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--epochs", "2", "--batch-size", "2", "--n-splits", "2", "--test-size", "2", "--n-bootstrap", "20",
            "--model-name", name, "--seed", "3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def roi_model(cohort) -> Path:
    dataset, out = cohort
    result = run_cli(*group(dataset, out, "roi_model", "--mode", "roi"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "models" / "roi_model"


def model_tree(maps: Path) -> list[str]:
    """Every file of a model folder, relative; TensorBoard event files are named after a time and a host."""
    names = []
    for path in maps.rglob("*"):
        if path.is_file():
            name = path.relative_to(maps).as_posix()
            if path.name.startswith("events.out.tfevents."):
                name = f"{path.parent.relative_to(maps).as_posix()}/events.out.tfevents.<time>.<host>"
            names.append(name)
    return sorted(set(names))


def test_model_folder_tree_matches_the_golden_list(roi_model: Path) -> None:
    """The model folder's layout is a contract: change tests/golden/maps_tree.txt on purpose, in review."""
    tree = model_tree(roi_model)
    if os.environ.get("BIDS_APP_UPDATE_GOLDEN"):
        GOLDEN_TREE.write_text("\n".join(tree) + "\n")
    assert tree == GOLDEN_TREE.read_text().splitlines()


def test_a_roi_model_predicts_without_mode_although_image_tensors_exist(cohort, roi_model: Path) -> None:
    """The roi model is predicted again by a run that names neither --mode nor --roi-mask: same bytes."""
    dataset, out = cohort
    tsv = "split-1/best-loss/test/test_image_level_prediction.tsv"
    before = (roi_model / tsv).read_bytes()
    (roi_model / tsv).unlink()
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--stages", "predict", "--model-name", "roi_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (roi_model / tsv).read_bytes() == before
    assert "trained on roi tensors: predicting roi tensors" in result.stderr
    assert (roi_model / "report.html").is_file()


def test_a_regression_model_predicts_without_label_nor_task(cohort, tmp_path: Path) -> None:
    """The label column and the task come from the model folder too (age regression, default --label diagnosis)."""
    dataset, out = cohort
    output = tmp_path / "out"
    shutil.copytree(out, output, ignore=shutil.ignore_patterns("models"))
    trained = run_cli(*group(dataset, output, "age", "--mode", "image", "--label", "age", "--task", "regression"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    predicted = run_cli(str(dataset.bids_dir), str(output), "group", "--stages", "predict", "--model-name", "age")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    metrics = (output / "models/age/split-0/best-loss/test/test_image_level_metrics.tsv").read_text()
    assert "mae" in metrics and "balanced_accuracy" not in metrics


def test_a_patch_model_predicts_another_output_without_mode(cohort, tmp_path: Path) -> None:
    """``--predict-from`` reads the other output's patch tensors for a patch model (not its image tensors)."""
    dataset, out = cohort
    other_dataset, other_out = make_cohort(tmp_path / "other", 4, 1, "--modes", "image", "patch", *PATCH, seed=77,
                                           first_label=31)  # fmt: skip
    trained = run_cli(*group(dataset, out, "patch_model", "--mode", "patch"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--stages", "predict", "--model-name", "patch_model",
                     "--predict-from", str(other_out), "--group-name", "site2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    maps = out / "models" / "patch_model"
    parts = (maps / "split-0/best-loss/site2/site2_patch_level_prediction.tsv").read_text().splitlines()
    images = (maps / "split-0/best-loss/site2/site2_image_level_prediction.tsv").read_text().splitlines()
    assert len(images) == 1 + 4
    n_patches = json.loads(next(other_out.rglob("*desc-patch_T1w.json")).read_text())["Shape"][0]
    assert len(parts) == 1 + 4 * n_patches
    assert other_dataset.bids_dir.is_dir()
