"""Results a reader can trust at a glance: n and positive class in every metric row, small-group warnings, and the
metrics summarised across splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.metrics import classification_metrics
from tests.conftest import make_cohort, run_cli

SMALL_SPLIT_COLUMNS = ["metric", "value", "ci_low", "ci_high", "baseline_value", "baseline_ci_low",
                       "baseline_ci_high", "n_images", "n_participants", "positive_class", "warning",
                       "training_status"]  # fmt: skip


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def group_args(dataset, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "4", "--n-bootstrap", "20", "--model-name", name,
            "--seed", "3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory):
    return make_cohort(tmp_path_factory.mktemp("small"), 10, 1, "--modes", "image", seed=21, effect_size=0.8)


@pytest.fixture(scope="module")
def small_run(small_cohort):
    """2 splits, 3 test participants, sensitivity/specificity for AD."""
    dataset, out = small_cohort
    result = run_cli(*group_args(dataset, out, "ad", "--n-splits", "2", "--test-size", "3", "--positive-class", "AD"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "models" / "ad", result.stderr


def test_metric_rows_carry_n_and_positive_class(small_run) -> None:
    maps, _ = small_run
    for k in (0, 1):
        for group in ("test", "validation"):
            folder = maps / f"split-{k}/best-loss/{group}"
            metrics = read_tsv(folder / f"{group}_image_level_metrics.tsv")
            predictions = read_tsv(folder / f"{group}_image_level_prediction.tsv")
            assert list(metrics.columns) == SMALL_SPLIT_COLUMNS
            assert set(metrics["n_images"]) == {str(len(predictions))}
            assert set(metrics["n_participants"]) == {str(predictions["participant_id"].nunique())}
            assert set(metrics["positive_class"]) == {"AD"}
        assert set(read_tsv(maps / f"split-{k}/best-loss/test/test_image_level_metrics.tsv")["n_participants"]) == {"3"}


def test_positive_class_ad_flips_sensitivity_and_specificity(small_run) -> None:
    """The TSV's values are those of AD; with CN positive (index 1, the default) they swap."""
    maps, log = small_run
    folder = maps / "split-0/best-loss/validation"
    predictions = read_tsv(folder / "validation_image_level_prediction.tsv")
    encoding = {"AD": 0, "CN": 1}
    true = predictions["true_label"].map(encoding).to_numpy()
    predicted = predictions["predicted_label"].map(encoding).to_numpy()
    as_ad = classification_metrics(true, predicted, n_classes=2, positive_class=0)
    as_cn = classification_metrics(true, predicted, n_classes=2)
    for a, b in (("sensitivity", "specificity"), ("ppv", "npv")):
        np.testing.assert_equal(as_ad[a], as_cn[b])
        np.testing.assert_equal(as_ad[b], as_cn[a])
    assert as_ad["balanced_accuracy"] == as_cn["balanced_accuracy"]
    metrics = read_tsv(folder / "validation_image_level_metrics.tsv").set_index("metric")
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        expected = "n/a" if np.isnan(as_ad[name]) else f"{as_ad[name]:.6f}"
        assert metrics.loc[name, "value"] == expected, name
    assert "sensitivity/specificity are for class AD (--positive-class AD)" in log


def test_unknown_positive_class_exits_64_and_trains_nothing(small_cohort, tmp_path: Path) -> None:
    dataset, out = small_cohort
    with_classes = run_cli(*group_args(dataset, out, "bad1", "--classes", "AD", "CN", "--positive-class", "MCI"))
    assert with_classes.returncode == 64, with_classes.stderr[-2000:]
    assert "MCI" in with_classes.stderr and "AD, CN" in with_classes.stderr
    assert not (out / "models" / "bad1").exists()
    # Without --classes the classes are known from the labels: refused before the split writes the model folder.
    from_labels = run_cli(*group_args(dataset, out, "bad2", "--n-splits", "2", "--positive-class", "MCI"))
    assert from_labels.returncode == 64, from_labels.stderr[-2000:]
    assert "AD, CN" in from_labels.stderr
    assert not (out / "models" / "bad2").exists()


def test_small_groups_are_flagged_in_log_tsv_and_report(small_run) -> None:
    maps, log = small_run
    metrics = read_tsv(maps / "split-0/best-loss/test/test_image_level_metrics.tsv")
    warning = set(metrics["warning"])
    assert len(warning) == 1 and warning.pop().startswith("small group: 3 participant(s)")
    warnings = [line for line in log.splitlines() if "WARNING" in line and "Group 'test' of split 0" in line]
    assert len(warnings) == 1
    assert "3 participant(s)" in warnings[0] and "fewer than 10 participants in some class" in warnings[0]
    assert "selected on this small validation group" in log
    report = (maps / "report.html").read_text()
    assert '<p class="warning">small group: 3 participant(s)' in report
    assert "the selected epoch was chosen on a small validation group" in report
    assert "sensitivity/specificity are for class AD" in report


def test_summary_across_splits_has_mean_and_sd_of_the_split_values(small_run) -> None:
    maps, _ = small_run
    for group in ("test", "validation"):
        summary = pd.read_csv(maps / f"summary/{group}_best-loss_metrics_across_splits.tsv", sep="\t",
                              na_values=["n/a"], keep_default_na=False).set_index("metric")  # fmt: skip
        assert list(summary.columns) == ["n_splits", "mean", "sd", "split-0", "split-1"]
        for k in (0, 1):
            per_split = pd.read_csv(maps / f"split-{k}/best-loss/{group}/{group}_image_level_metrics.tsv", sep="\t",
                                    na_values=["n/a"], keep_default_na=False).set_index("metric")  # fmt: skip
            np.testing.assert_allclose(summary[f"split-{k}"], per_split.loc[summary.index, "value"], atol=1e-6)
        for metric, row in summary.iterrows():
            values = row[["split-0", "split-1"]].to_numpy(dtype=float)
            values = values[~np.isnan(values)]
            assert row["n_splits"] == len(values), metric
            if len(values) == 2:
                assert row["mean"] == pytest.approx(values.mean(), abs=2e-6)
                assert row["sd"] == pytest.approx(values.std(ddof=1), abs=2e-6)
    assert "Across splits" in (maps / "report.html").read_text()


def test_a_large_test_group_is_not_flagged(tmp_path_factory: pytest.TempPathFactory) -> None:
    """48 participants: 22 tested, 22 validate (about 11 per class each), default positive class."""
    dataset, out = make_cohort(tmp_path_factory.mktemp("large"), 48, 1, "--modes", "image", seed=5, effect_size=0.8)
    result = run_cli(*group_args(dataset, out, "large", "--n-splits", "1", "--test-size", "22", "--validation-size",
                                 "22"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    maps = out / "models" / "large"
    metrics = read_tsv(maps / "split-0/best-loss/test/test_image_level_metrics.tsv")
    assert set(metrics["n_participants"]) == {"22"}
    assert set(metrics["warning"]) == {"n/a"}
    assert set(metrics["positive_class"]) == {"CN"}
    assert "small group" not in result.stderr
    assert "sensitivity/specificity are for class CN (the default: the second class of AD, CN" in result.stderr
    report = (maps / "report.html").read_text()
    assert '<p class="warning">' not in report
    assert not (maps / "summary").exists()  # one split: nothing to summarise
