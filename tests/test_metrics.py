"""Metric values against hand-computed examples, scikit-learn, and SSIM/bootstrap invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bids_app.config import Task
from bids_app.errors import ConfigError
from bids_app.metrics import (
    bootstrap_intervals,
    classification_metrics,
    compute_metrics,
    confusion_matrix,
    higher_is_better,
    metric_names,
    psnr,
    reconstruction_metrics,
    reconstruction_metrics_per_image,
    regression_metrics,
    ssim,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

# 10 images: 4 of class 0, 6 of class 1. TP=4 (of 6 positives), FN=2, TN=3, FP=1.
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
Y_SCORE = np.array([0.1, 0.2, 0.3, 0.7, 0.9, 0.8, 0.6, 0.55, 0.4, 0.35])


def test_binary_metrics_match_hand_computation() -> None:
    result = classification_metrics(Y_TRUE, Y_PRED)
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["specificity"] == pytest.approx(3 / 4)
    assert result["ppv"] == pytest.approx(4 / 5)
    assert result["npv"] == pytest.approx(3 / 5)
    assert result["accuracy"] == pytest.approx(7 / 10)
    assert result["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert result["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert result["mcc"] == pytest.approx((4 * 3 - 1 * 2) / math.sqrt(5 * 6 * 4 * 5))
    assert "roc_auc" not in result


def test_binary_auc_hand_computed_and_matches_sklearn() -> None:
    # Positives .9 .8 .6 .55 .4 .35 vs negatives .1 .2 .3 .7: each positive outranks 4, 4, 3, 3, 3, 3
    # negatives, i.e. 20 of the 24 pairs.
    result = classification_metrics(Y_TRUE, Y_PRED, Y_SCORE)
    assert result["roc_auc"] == pytest.approx(20 / 24)
    assert result["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(Y_TRUE, Y_SCORE))
    two_columns = np.stack([1 - Y_SCORE, Y_SCORE], axis=1)
    assert classification_metrics(Y_TRUE, Y_PRED, two_columns)["roc_auc"] == pytest.approx(20 / 24)


def test_auc_counts_ties_as_half() -> None:
    result = classification_metrics([0, 1], [0, 1], [0.5, 0.5])
    assert result["roc_auc"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_and_multiclass_agree_with_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n_classes in (2, 3, 4):
        y_true = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, 60)])
        y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, n_classes, y_true.size))
        y_pred[:n_classes] = np.arange(n_classes)  # every class predicted at least once
        logits = rng.normal(size=(y_true.size, n_classes)) + 2 * np.eye(n_classes)[y_true]
        score = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        result = classification_metrics(y_true, y_pred, score, n_classes=n_classes)
        assert result["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y_true, y_pred))
        assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
        assert result["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(y_true, y_pred))
        average = "binary" if n_classes == 2 else "macro"
        assert result["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y_true, y_pred, average=average))
        assert result["ppv"] == pytest.approx(sklearn_metrics.precision_score(y_true, y_pred, average=average))
        assert result["f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average=average))
        if n_classes == 2:
            expected_auc = sklearn_metrics.roc_auc_score(y_true, score[:, 1])
        else:
            expected_auc = sklearn_metrics.roc_auc_score(y_true, score, multi_class="ovr", average="macro")
        assert result["roc_auc"] == pytest.approx(expected_auc)


def test_multiclass_specificity_and_npv_are_macro_one_vs_rest() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # one-vs-rest: class 0 TN=3 FP=1 FN=1; class 1 TN=3 FP=1 FN=0; class 2 TN=4 FP=0 FN=1.
    result = classification_metrics(y_true, y_pred)
    assert result["specificity"] == pytest.approx(np.mean([3 / 4, 3 / 4, 4 / 4]))
    assert result["npv"] == pytest.approx(np.mean([3 / 4, 3 / 3, 4 / 5]))


def test_confusion_matrix_rows_are_true_classes() -> None:
    matrix = confusion_matrix(Y_TRUE, Y_PRED, 2)
    np.testing.assert_array_equal(matrix, [[3, 1], [2, 4]])
    np.testing.assert_array_equal(matrix, sklearn_metrics.confusion_matrix(Y_TRUE, Y_PRED))
    assert confusion_matrix([0, 2], [2, 2], 4).shape == (4, 4)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_absent_class_gives_nan_not_crash() -> None:
    result = classification_metrics([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.8], n_classes=2)
    assert math.isnan(result["specificity"])
    assert math.isnan(result["balanced_accuracy"])
    assert math.isnan(result["roc_auc"])
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    never_predicted = classification_metrics([0, 1, 1], [0, 0, 0])
    assert math.isnan(never_predicted["ppv"])
    assert never_predicted["f1"] == 0.0
    assert math.isnan(never_predicted["mcc"])
    empty = classification_metrics(np.array([], dtype=int), np.array([], dtype=int))
    assert all(math.isnan(v) for v in empty.values())
    three = classification_metrics([0, 1, 1], [0, 1, 2], n_classes=3)
    assert math.isnan(three["balanced_accuracy"])  # class 2 has no true image: its recall is undefined


def test_regression_metrics_hand_and_sklearn() -> None:
    y_true = np.array([1.0, 2.0, 3.0, 4.0])
    y_pred = np.array([1.5, 2.0, 2.0, 5.0])
    result = regression_metrics(y_true, y_pred)
    assert result["mae"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert result["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 1 + 1) / 4))
    assert result["r2"] == pytest.approx(1 - 2.25 / 5.0)
    assert result["r2"] == pytest.approx(sklearn_metrics.r2_score(y_true, y_pred))
    two_outputs = np.stack([y_true, y_true * 3], axis=1)
    noisy = two_outputs + np.array([[0.1, -1], [0.2, 0.5], [-0.3, 0.0], [0.0, 2.0]])
    assert regression_metrics(two_outputs, noisy)["r2"] == pytest.approx(sklearn_metrics.r2_score(two_outputs, noisy))
    assert math.isnan(regression_metrics([2.0, 2.0], [2.0, 3.0])["r2"])


def _textured(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.0)


def _ssim_by_explicit_windows(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Slow reference: an explicit normalised 11x11 Gaussian window at each interior pixel."""
    radius = 5
    offsets = np.arange(-radius, radius + 1)
    kernel_1d = np.exp(-(offsets**2) / (2 * 1.5**2))
    kernel = np.outer(kernel_1d, kernel_1d)
    kernel /= kernel.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(radius, x.shape[0] - radius):
        for j in range(radius, x.shape[1] - radius):
            wx = x[i - radius : i + radius + 1, j - radius : j + radius + 1]
            wy = y[i - radius : i + radius + 1, j - radius : j + radius + 1]
            mx, my = (kernel * wx).sum(), (kernel * wy).sum()
            vx, vy = (kernel * (wx - mx) ** 2).sum(), (kernel * (wy - my) ** 2).sum()
            cxy = (kernel * (wx - mx) * (wy - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_explicit_window_definition() -> None:
    x = _textured((20, 22))
    y = x + np.random.default_rng(1).normal(0, 0.05, x.shape)
    data_range = float(x.max() - x.min())
    assert ssim(x, y) == pytest.approx(_ssim_by_explicit_windows(x, y, data_range), rel=1e-9)


def test_ssim_is_one_for_identical_and_decreases_with_noise() -> None:
    for shape in ((24, 24), (14, 14, 14), (4, 5, 6)):
        x = _textured(shape)
        assert ssim(x, x) == pytest.approx(1.0)
        rng = np.random.default_rng(2)
        values = [ssim(x, x + rng.normal(0, sigma, shape)) for sigma in (0.01, 0.05, 0.2)]
        assert 1.0 > values[0] > values[1] > values[2]
    assert math.isnan(ssim(np.zeros((8, 8)), np.ones((8, 8))))


def test_ssim_matches_skimage_when_available() -> None:
    skimage_metrics = pytest.importorskip("skimage.metrics")
    x = _textured((16, 18, 20))
    y = x + np.random.default_rng(3).normal(0, 0.05, x.shape)
    data_range = float(x.max() - x.min())
    expected = skimage_metrics.structural_similarity(
        x, y, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x, y) == pytest.approx(expected, rel=1e-6)


def test_psnr_and_reconstruction_batch() -> None:
    x = np.zeros((8, 8))
    x[0, 0] = 2.0  # range 2
    y = x + 0.1
    assert psnr(x, y) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(x, x) == math.inf
    batch = np.stack([_textured((1, 10, 10, 10), s) for s in range(3)])
    noisy = batch + np.random.default_rng(4).normal(0, 0.02, batch.shape)
    per_image = reconstruction_metrics_per_image(batch, noisy)
    assert {k: v.shape for k, v in per_image.items()} == {k: (3,) for k in ("mae", "rmse", "psnr", "ssim")}
    summary = reconstruction_metrics(batch, noisy)
    assert summary["mae"] == pytest.approx(np.abs(noisy - batch).mean())
    assert summary["ssim"] == pytest.approx(np.mean([ssim(batch[i, 0], noisy[i, 0]) for i in range(3)]))
    assert compute_metrics(Task.RECONSTRUCTION, batch, noisy) == summary


def test_compute_metrics_dispatches_by_task() -> None:
    assert set(compute_metrics(Task.CLASSIFICATION, Y_TRUE, Y_PRED)) == set(metric_names(Task.CLASSIFICATION)) - {
        "loss",
        "roc_auc",
    }
    assert "roc_auc" in compute_metrics(Task.CLASSIFICATION, Y_TRUE, Y_PRED, np.stack([1 - Y_SCORE, Y_SCORE], 1))
    assert compute_metrics(Task.REGRESSION, [1.0, 2.0], [1.0, 3.0]) == regression_metrics([1.0, 2.0], [1.0, 3.0])


def test_higher_is_better() -> None:
    assert not higher_is_better("loss")
    assert not higher_is_better("mae")
    assert not higher_is_better("rmse")
    assert higher_is_better("balanced_accuracy")
    assert higher_is_better("ssim")
    assert higher_is_better("r2")
    with pytest.raises(ConfigError, match="Unknown metric 'bacc'"):
        higher_is_better("bacc")


def test_bootstrap_contains_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 2, 80)
    y_pred = np.where(rng.random(80) < 0.75, y_true, 1 - y_true)
    point = classification_metrics(y_true, y_pred)
    first = bootstrap_intervals(classification_metrics, y_true, y_pred, n_bootstrap=300, seed=7)
    again = bootstrap_intervals(classification_metrics, y_true, y_pred, n_bootstrap=300, seed=7)
    other = bootstrap_intervals(classification_metrics, y_true, y_pred, n_bootstrap=300, seed=8)
    assert first == again
    assert first != other
    assert set(first) == set(point)
    for name, (low, high) in first.items():
        assert low <= point[name] <= high, name
        assert low < high, name


def test_bootstrap_passes_none_and_skips_nan_resamples() -> None:
    y_true = np.array([0] * 9 + [1])  # many resamples draw no positive: sensitivity nan there
    y_pred = y_true.copy()
    intervals = bootstrap_intervals(classification_metrics, y_true, y_pred, None, n_bootstrap=200, seed=0)
    assert intervals["sensitivity"] == (1.0, 1.0)
    assert "roc_auc" not in intervals
    all_nan = bootstrap_intervals(classification_metrics, np.ones(5, int), np.ones(5, int), n_bootstrap=20)
    assert all(math.isnan(v) for v in all_nan["specificity"])
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_intervals(regression_metrics, np.ones(3), np.ones(4))
