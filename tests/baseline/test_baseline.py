"""The linear baseline beside every network: its own files, its metrics in the network's TSVs, its selection on
validation only, its determinism, and --no-baseline.

One tiny cohort (14 participants, strong hippocampal atrophy, roi tensors) is trained once for 1 epoch; the
selection of the hyper-parameter and the pooling are also tested on synthetic arrays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.baseline.features import MAX_FEATURES, choose_pooling, image_features, pool_mean
from bids_app.baseline.linear import ALPHA_GRID, C_GRID, choose, predict_linear, score, select_models
from bids_app.baseline.stage import encode_targets, image_table, predict_with_saved_baselines
from bids_app.cli.model import main as model_main
from bids_app.config import AnalysisLevel, ExtractionMode, PredictConfig, RunConfig, Task
from bids_app.errors import DataError
from bids_app.extraction.storage import write_tensor
from bids_app.maps import Maps
from bids_app.maps.results import read_baseline_metrics, write_image_outputs
from bids_app.maps.weights import load_arrays
from tests.conftest import make_cohort, run_cli

MODEL = "m"
N_SPLITS = 2


def group_args(dataset, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--mode", "roi", "--architecture",
            "small_cnn", "--epochs", "1", "--batch-size", "2", "--n-splits", str(N_SPLITS), "--test-size", "4",
            "--n-bootstrap", "20", "--model-name", name, "--seed", "5", *extra]  # fmt: skip


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("baseline")
    mask = root / "bids" / "code" / "template" / "roi-hippocampus_mask.nii.gz"  # written by the generator
    return make_cohort(root, 14, 1, "--modes", "roi", "--roi-mask", f"hippocampus={mask}", "--skip-bids-validation",
                       seed=8, effect_size=0.8)  # fmt: skip


@pytest.fixture(scope="module")
def trained(cohort):
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, MODEL))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "models" / MODEL, result.stderr


def baseline_files(maps: Path) -> dict[str, bytes]:
    return {p.relative_to(maps).as_posix(): p.read_bytes() for p in sorted(maps.glob("split-*/baseline/**/*"))
            if p.is_file()}  # fmt: skip


def test_baseline_metrics_sit_beside_the_network_s_and_in_its_own_files(trained) -> None:
    maps, log = trained
    for split in range(N_SPLITS):
        best = maps / f"split-{split}/baseline/best-loss"
        selection = json.loads((best / "selection.json").read_text())
        assert selection["model"] == "logistic_regression" and selection["chosen_on"] == "validation"
        assert selection["chosen_value"] in selection["grid"] and len(selection["validation_scores"]) == len(C_GRID)
        assert selection["features"]["n_features"] <= MAX_FEATURES
        arrays = load_arrays(best / "model.safetensors")
        n_features = selection["features"]["n_features"]
        assert arrays["coef"].shape == (1, n_features) and arrays["feature_mean"].shape == (n_features,)
        for group in ("validation", "test"):
            network = read(maps / f"split-{split}/best-loss/{group}/{group}_image_level_metrics.tsv")
            baseline = read(best / f"{group}/{group}_image_level_metrics.tsv")
            columns = list(network.columns)
            assert columns[columns.index("ci_high") + 1 :][:3] == ["baseline_value", "baseline_ci_low",
                                                                   "baseline_ci_high"]  # fmt: skip
            assert list(network["metric"]) == list(baseline["metric"])
            for ours, theirs in (("baseline_value", "value"), ("baseline_ci_low", "ci_low"),
                                 ("baseline_ci_high", "ci_high")):  # fmt: skip
                assert list(network[ours]) == list(baseline[theirs])
            assert [c for c in columns if c in baseline.columns] == list(baseline.columns)  # the same format
            assert set(baseline["n_images"]) == set(network["n_images"])
            predictions = read(best / f"{group}/{group}_image_level_prediction.tsv")
            network_predictions = read(maps / f"split-{split}/best-loss/{group}/{group}_image_level_prediction.tsv")
            assert list(predictions.columns) == list(network_predictions.columns)
            assert list(predictions["participant_id"]) == list(network_predictions["participant_id"])
    for group in ("validation", "test"):
        summary = read(maps / f"summary/{group}_best-loss_baseline_metrics_across_splits.tsv")
        assert list(summary.columns)[:4] == ["metric", "n_splits", "mean", "sd"]
        assert set(summary["n_splits"]) == {str(N_SPLITS)}
    assert "linear baseline (best-loss): C = " in log
    assert "(network) vs " in log and "(linear baseline)" in log


def test_a_strong_effect_gives_the_baseline_a_balanced_accuracy_well_above_chance(trained) -> None:
    maps, _ = trained
    values = []
    for split in range(N_SPLITS):
        metrics = read(maps / f"split-{split}/baseline/best-loss/test/test_image_level_metrics.tsv")
        values.append(float(metrics.set_index("metric").loc["balanced_accuracy", "value"]))
    assert np.mean(values) >= 0.8, values


def test_the_baseline_never_sees_test_labels_when_choosing(cohort, trained, tmp_path: Path) -> None:
    """Flipping the test participants' labels changes the test metrics, not the choice nor the coefficients."""
    dataset, out = cohort
    maps, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = baseline_files(maps)
    test_ids = sorted(set(read(maps / "groups/test/data.tsv")["participant_id"]))
    assert len(test_ids) == 4
    # The diagnosis is a session-level label: flip it in the test participants' sessions.tsv (restored after).
    tables = [dataset.bids_dir / p / f"{p}_sessions.tsv" for p in test_ids]
    originals = [path.read_text() for path in tables]
    try:
        for path in tables:
            table = read(path)
            table["diagnosis"] = table["diagnosis"].map({"AD": "CN", "CN": "AD"})
            path.write_text(table.to_csv(sep="\t", index=False))
        result = run_cli(str(dataset.bids_dir), str(copy), "group", "--stages", "baseline", "--model-name", MODEL,
                         "--n-bootstrap", "20")  # fmt: skip
    finally:
        for path, text in zip(tables, originals, strict=True):
            path.write_text(text)
    assert result.returncode == 0, result.stderr[-3000:]
    after = baseline_files(copy / "models" / MODEL)
    for split in range(N_SPLITS):
        for name in ("selection.json", "model.safetensors", "validation/validation_image_level_metrics.tsv",
                     "validation/validation_image_level_prediction.tsv"):  # fmt: skip
            key = f"split-{split}/baseline/best-loss/{name}"
            assert after[key] == before[key], key
        test_key = f"split-{split}/baseline/best-loss/test/test_image_level_metrics.tsv"
        assert after[test_key] != before[test_key]  # the corruption did reach the test group


def test_same_seed_gives_identical_baseline_files_and_no_baseline_writes_none(cohort, trained) -> None:
    dataset, out = cohort
    maps, _ = trained
    again = run_cli(*group_args(dataset, out, "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert baseline_files(out / "models" / "again") == baseline_files(maps)
    off = run_cli(*group_args(dataset, out, "off", "--no-baseline"))
    assert off.returncode == 0, off.stderr[-3000:]
    off_maps = out / "models" / "off"
    assert not list(off_maps.rglob("*baseline*"))
    header = (off_maps / "split-0/best-loss/test/test_image_level_metrics.tsv").read_text().splitlines()[0]
    assert "baseline" not in header
    assert "Linear baseline off (--no-baseline)" in off.stderr


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory):
    """Four new participants (sub-061 to sub-064), processed like the cohort: another site's OUTPUT_DIR."""
    root = tmp_path_factory.mktemp("other")
    mask = root / "bids" / "code" / "template" / "roi-hippocampus_mask.nii.gz"
    return make_cohort(root, 4, 1, "--modes", "roi", "--roi-mask", f"hippocampus={mask}", "--skip-bids-validation",
                       seed=41, effect_size=0.8, first_label=61)  # fmt: skip


def test_a_predict_from_group_is_predicted_by_the_baseline_too(cohort, trained, other_site) -> None:
    dataset, out = cohort
    maps, _ = trained
    _, other_out = other_site
    # A predict-only run applies the baselines already fitted (their coefficients and standardisation).
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--stages", "predict", "--model-name", MODEL,
                     "--predict-from", str(other_out), "--group-name", "site2", "--n-bootstrap", "20")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear baseline (best-loss, saved) predicted group 'site2'" in result.stderr
    predictions = read(maps / "split-0/baseline/best-loss/site2/site2_image_level_prediction.tsv")
    assert len(predictions) == 4
    network = read(maps / "split-0/best-loss/site2/site2_image_level_metrics.tsv")
    baseline = read(maps / "split-0/baseline/best-loss/site2/site2_image_level_metrics.tsv")
    assert list(network["baseline_value"]) == list(baseline["value"])


def test_a_group_refused_as_a_leak_keeps_no_baseline_prediction(cohort, trained) -> None:
    """The baseline predicts a --predict-from group before the network's leak check: a refusal removes them."""
    dataset, out = cohort
    maps, _ = trained
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--stages", "predict", "--model-name", MODEL,
                     "--predict-from", str(out), "--group-name", "itself", "--n-bootstrap", "20")  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "Group 'itself' shares" in result.stderr
    assert "predictions of the refused group 'itself' were removed" in result.stderr
    assert not list(maps.glob("split-*/baseline/best-*/itself")) and not list(maps.glob("summary/itself_*"))


def test_an_imported_model_s_baseline_predicts_only_the_images_the_guard_checked(
    trained, other_site, tmp_path: Path
) -> None:
    """--model with --participant-label: the baseline predicts the two selected participants, as the network."""
    maps_dir, _ = trained
    other, other_out = other_site
    archive = tmp_path / "m.zip"
    assert model_main(["export", str(maps_dir), str(archive), "--no-fingerprints"]) == 0
    site = tmp_path / "site"
    shutil.copytree(other_out, site)
    result = run_cli(str(other.bids_dir), str(site), "group", "--model", str(archive), "--group-name", "site2",
                     "--participant-label", "061", "062", "--n-bootstrap", "20")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    imported = site / "models" / MODEL
    for split in range(N_SPLITS):
        network = read(imported / f"split-{split}/best-loss/site2/site2_image_level_prediction.tsv")
        baseline = read(imported / f"split-{split}/baseline/best-loss/site2/site2_image_level_prediction.tsv")
        assert sorted(network["participant_id"]) == sorted(baseline["participant_id"]) == ["sub-061", "sub-062"]
        metrics = read(imported / f"split-{split}/best-loss/site2/site2_image_level_metrics.tsv")
        baseline_metrics = read(imported / f"split-{split}/baseline/best-loss/site2/site2_image_level_metrics.tsv")
        assert list(metrics["baseline_value"]) == list(baseline_metrics["value"])
        assert set(baseline_metrics["n_images"]) == {"2"}
    assert "cover other images than the network's" not in result.stderr


def test_predict_from_with_the_baseline_but_without_predict_is_refused(cohort, trained) -> None:
    """Only the predict stage checks a --predict-from group for leaks: the baseline never predicts it alone."""
    dataset, out = cohort
    maps, _ = trained
    before = baseline_files(maps)
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--stages", "baseline", "--model-name", MODEL,
                     "--predict-from", str(out), "--group-name", "itself", "--n-bootstrap", "20")  # fmt: skip
    assert result.returncode == 64, result.stderr[-3000:]
    refusal = [line for line in result.stderr.splitlines() if "Add predict to --stages" in line]
    assert len(refusal) == 1 and "--stages baseline would have the baseline predict" in refusal[0]
    assert baseline_files(maps) == before and not list(maps.glob("split-*/baseline/best-*/itself"))


def test_baseline_prediction_keeps_the_cohort_column_and_matches_images_by_cohort(tmp_path: Path) -> None:
    rows = pd.DataFrame({"cohort": ["a", "b"], "participant_id": ["sub-1", "sub-1"], "session_id": ["ses-M000"] * 2,
                         "label": ["AD", "CN"]})  # fmt: skip
    output = np.array([[0.2, 0.8], [0.7, 0.3]])
    image = image_table(rows, encode_targets(rows, Task.CLASSIFICATION, {"CN": 0, "AD": 1}), output,
                        Task.CLASSIFICATION)  # fmt: skip
    write_image_outputs(tmp_path, "g", image, Task.CLASSIFICATION, ["CN", "AD"], 5, "AD")
    prediction, metrics = tmp_path / "g_image_level_prediction.tsv", tmp_path / "g_image_level_metrics.tsv"
    written = read(prediction)
    assert list(written.columns) == ["cohort", "participant_id", "session_id", "true_label", "predicted_label",
                                     "proba_CN", "proba_AD"]  # fmt: skip
    assert list(written["cohort"]) == ["a", "b"] and list(written["predicted_label"]) == ["AD", "CN"]
    assert read_baseline_metrics(prediction, metrics, image.iloc[::-1]) is not None  # order is moot
    # The same participant and session ids in other cohorts, or repeated, are other images.
    assert read_baseline_metrics(prediction, metrics, image.assign(cohort=["a", "a"])) is None
    repeated = pd.concat([image.iloc[:1], image.iloc[:1]]).assign(cohort=["a", "a"])
    written.iloc[[0, 0]].assign(cohort=["a", "a"]).to_csv(prediction, sep="\t", index=False)
    assert read_baseline_metrics(prediction, metrics, repeated) is not None
    assert read_baseline_metrics(prediction, metrics, repeated.iloc[:1]) is None


def test_a_label_the_model_cannot_encode_is_refused_by_file_value_and_fix() -> None:
    rows = pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "session_id": ["ses-M000"] * 2,
                         "tensor_path": ["/t/sub-1.npy", "/t/sub-2.npy"], "label": ["CN", "MCI"]})  # fmt: skip
    with pytest.raises(DataError, match=r"/t/sub-2.npy \(sub-2 ses-M000\) has label 'MCI', which is not a class of "
                                        r"the model \(AD, CN\)\. Check the label column"):  # fmt: skip
        encode_targets(rows, Task.CLASSIFICATION, {"CN": 0, "AD": 1})
    with pytest.raises(DataError, match=r"/t/sub-1.npy \(sub-1 ses-M000\) has label 'CN', but a regression label "
                                        r"must be a number\. Fix the label column"):  # fmt: skip
        encode_targets(rows, Task.REGRESSION, None)
    numbers = rows.assign(label=["71.5", "n/a"])
    assert np.array_equal(encode_targets(numbers, Task.REGRESSION, None), [71.5, np.nan], equal_nan=True)


def test_a_saved_baseline_without_its_selection_is_refused_before_any_read(trained, tmp_path: Path) -> None:
    maps_dir, _ = trained
    copy = tmp_path / "models" / MODEL
    shutil.copytree(maps_dir, copy)
    (copy / "split-1/baseline/best-loss/selection.json").unlink()
    predict = PredictConfig(predict_from=tmp_path / "absent", group_name="site9")
    cfg = RunConfig(tmp_path, tmp_path, AnalysisLevel.GROUP, predict=predict)
    rows = pd.DataFrame({"participant_id": ["sub-99"], "session_id": ["ses-M000"], "tensor_path": [str(tmp_path)]})
    with pytest.raises(DataError, match=r"selection.json is missing or malformed .* or pass --no-baseline"):
        predict_with_saved_baselines(cfg, Maps.open(copy), "site9", rows)
    assert not (copy / "split-0/baseline/best-loss/site9").exists()


def test_a_tensor_of_another_shape_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_desc-roi_T1w.npy"
    write_tensor(path, np.zeros((2, 1, 3, 3, 3), np.float32), {"Mode": "roi"})
    with pytest.raises(DataError, match=r"sub-01_desc-roi_T1w.npy has shape \(2, 1, 3, 3, 3\), but the baseline's "
                                        r"features were made from 3 part\(s\)"):  # fmt: skip
        image_features(path, ExtractionMode.ROI, choose_pooling(3, (3, 3, 3)))
    assert image_features(path, ExtractionMode.ROI, choose_pooling(2, (3, 3, 3))).shape == (54,)


# -- units: the choice of the hyper-parameter, the pooling --------------------------------------------------


def test_choose_follows_the_metric_s_direction_ties_and_nans() -> None:
    assert choose("loss", [0.9, 0.3, 0.3, 0.5]) == 1  # lower is better; a tie goes to the stronger regularisation
    assert choose("balanced_accuracy", [0.5, float("nan"), 0.8, 0.8]) == 2
    assert choose("mae", [float("nan"), float("nan")]) == 0


def classification_arrays(seed: int, n: int = 60, p: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, p)) / np.sqrt(p)
    x[:, 0] += (2 * y - 1) * 0.5  # one informative feature
    return x, y.astype(float)


def test_select_models_scores_each_value_on_validation_and_keeps_the_best() -> None:
    train, validation = classification_arrays(1), classification_arrays(2)
    models, selections = select_models(Task.CLASSIFICATION, train, validation, ("loss", "balanced_accuracy"), 2, 1, 0)
    assert [m.value for m in models] == list(C_GRID)
    by_metric = {s.metric: s for s in selections}
    outputs = [predict_linear(Task.CLASSIFICATION, model, validation[0]) for model in models]
    losses = [score(Task.CLASSIFICATION, "loss", validation[1], output, 1) for output in outputs]
    assert by_metric["loss"].scores == tuple(losses)
    assert by_metric["loss"].chosen == int(np.argmin(losses))
    assert by_metric["balanced_accuracy"].best_score() >= 0.9
    # Flipped validation labels: every learned direction hurts, so the strongest regularisation wins the loss.
    flipped = (validation[0], 1.0 - validation[1])
    _, selections = select_models(Task.CLASSIFICATION, train, flipped, ("loss",), 2, 1, 0)
    assert selections[0].chosen == 0


def test_ridge_prefers_strong_regularisation_on_noise_and_weak_on_signal() -> None:
    rng = np.random.default_rng(3)
    x_train, x_validation = rng.normal(size=(50, 30)) / np.sqrt(30), rng.normal(size=(50, 30)) / np.sqrt(30)
    weights = rng.normal(size=30) * 10
    noise_train, noise_validation = rng.normal(size=50), rng.normal(size=50)
    _, selections = select_models(Task.REGRESSION, (x_train, noise_train), (x_validation, noise_validation),
                                  ("loss",), 0, 1, 0)  # fmt: skip
    assert ALPHA_GRID[selections[0].chosen] >= 10.0
    _, selections = select_models(Task.REGRESSION, (x_train, x_train @ weights), (x_validation, x_validation @ weights),
                                  ("mae",), 0, 1, 0)  # fmt: skip
    assert ALPHA_GRID[selections[0].chosen] <= 1e-2


def test_pooling_keeps_small_regions_whole_and_bounds_whole_images() -> None:
    assert choose_pooling(2, (17, 7, 4)).factor == 1
    whole = choose_pooling(1, (169, 208, 179))
    assert whole.factor == 7 and whole.pooled_shape == (25, 30, 26) and whole.n_features == 19_500
    slices = choose_pooling(100, (169, 179))  # 2D parts pooled in factor² blocks
    assert slices.factor == 13 and slices.n_features == 100 * 13 * 14 <= MAX_FEATURES
    part = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    pooled = pool_mean(part, 2)
    assert pooled.shape == (3, 2)
    assert pooled[0, 0] == np.mean([0, 1, 4, 5]) and pooled[2, 1] == np.mean([18, 19])  # border block: its voxels
