"""Evaluation metrics: pure functions on numpy arrays returning ``dict[str, float]``.

Metric names are the snake_case keys users type as selection metrics (``--selection-metrics``):

- classification: ``balanced_accuracy``, ``accuracy``, ``sensitivity``, ``specificity``, ``ppv``, ``npv``,
  ``f1``, ``mcc`` and ``roc_auc`` (only when scores are given);
- regression: ``mae``, ``rmse``, ``r2``;
- reconstruction: ``mae``, ``rmse``, ``psnr``, ``ssim``;
- every task: ``loss`` (computed by the caller, not here).

Small groups (``small_group_warning``): a group with fewer than ``MIN_PARTICIPANTS_PER_CLASS`` (10) participants
in some class (classification), or fewer than ``MIN_PARTICIPANTS`` (20) participants (regression,
reconstruction), has bootstrap intervals too wide, and too unstable, to mean much.

Conventions for classification (labels are integer class indices ``0 .. n_classes - 1``):

- Binary: sensitivity, specificity, PPV, NPV and F1 are those of the positive class, index 1 by default (the
  second class name in sorted order unless ``labels.classes`` fixes the order); ``positive_class`` (the
  ``--positive-class`` option, resolved by ``positive_class_index``) chooses the other. Balanced accuracy,
  accuracy, MCC and ROC AUC do not depend on it.
- Multiclass: sensitivity, specificity, PPV, NPV and F1 are **macro averages** of the one-vs-rest value of each
  class; balanced accuracy is the mean per-class recall (= macro sensitivity); MCC is Gorodkin's multiclass
  R_K (equal to the binary MCC for two classes); ROC AUC is the macro average of the one-vs-rest AUCs.
- Degenerate cases give ``nan`` instead of raising: a ratio whose denominator is zero (a class absent from
  ``y_true`` or never predicted) is ``nan``, and a macro average is ``nan`` as soon as one class' term is.
  scikit-learn returns 0 in these cases; elsewhere the values agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage, stats

from bids_app.config import Task
from bids_app.errors import ConfigError

CLASSIFICATION_METRICS = (
    "balanced_accuracy",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "mcc",
    "roc_auc",
)
REGRESSION_METRICS = ("mae", "rmse", "r2")
RECONSTRUCTION_METRICS = ("mae", "rmse", "psnr", "ssim")
LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
ONE_VS_REST_METRICS = frozenset({"sensitivity", "specificity", "ppv", "npv", "f1"})  # depend on the positive class
DEFAULT_POSITIVE_INDEX = 1
# With fewer participants, a 95 % interval spans most of the metric's range and moves with one participant.
MIN_PARTICIPANTS_PER_CLASS = 10
MIN_PARTICIPANTS = 20
SMALL_GROUP_RULE = (
    f"fewer than {MIN_PARTICIPANTS_PER_CLASS} participants in some class (classification) or fewer than "
    f"{MIN_PARTICIPANTS} participants (regression, reconstruction)"
)

# SSIM constants of Wang et al. (2004), "Image quality assessment: from error visibility to structural similarity".
SSIM_SIGMA = 1.5  # Gaussian window standard deviation, voxels
SSIM_TRUNCATE = 3.5  # window radius = int(3.5 * 1.5 + 0.5) = 5 voxels, i.e. an 11-voxel window per axis
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def metric_names(task: Task) -> tuple[str, ...]:
    """Every metric name valid as a selection metric for ``task`` (``loss`` first)."""
    names = {
        Task.CLASSIFICATION: CLASSIFICATION_METRICS,
        Task.REGRESSION: REGRESSION_METRICS,
        Task.RECONSTRUCTION: RECONSTRUCTION_METRICS,
    }[task]
    return ("loss", *names)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (``loss``, ``mae`` and ``rmse`` are lower-is-better).

    Raises:
        ConfigError: ``metric`` is not a metric of any task.
    """
    known = set(metric_names(Task.CLASSIFICATION)) | set(REGRESSION_METRICS) | set(RECONSTRUCTION_METRICS)
    if metric not in known:
        raise ConfigError(f"Unknown metric '{metric}'. Known metrics: {', '.join(sorted(known))}.")
    return metric not in LOWER_IS_BETTER


def positive_class_index(class_names: Sequence[str], positive_class: str | None) -> int:
    """Index of the positive class of a binary task: ``positive_class`` by name, or index 1 when None.

    Raises:
        ConfigError: ``positive_class`` is not one of ``class_names``, or there are not exactly two classes.
    """
    if positive_class is None:
        return DEFAULT_POSITIVE_INDEX
    if positive_class not in class_names:
        raise ConfigError(
            f"Unknown positive class '{positive_class}' (labels.positive_class, --positive-class). "
            f"The classes are: {', '.join(class_names)}."
        )
    if len(class_names) != 2:
        raise ConfigError(
            f"--positive-class {positive_class} applies to two classes; this task has {len(class_names)} "
            f"({', '.join(class_names)}), whose sensitivity and specificity are macro averages over every class."
        )
    return list(class_names).index(positive_class)


def describe_positive_class(class_names: Sequence[str], positive_class: str | None) -> str:
    """One sentence saying which class sensitivity/specificity/PPV/NPV are for (for logs and reports)."""
    if len(class_names) != 2:
        return (
            "sensitivity/specificity/PPV/NPV are macro averages of every class' one-vs-rest value "
            f"({len(class_names)} classes)"
        )
    name = class_names[positive_class_index(class_names, positive_class)]
    if positive_class is None:
        return (
            f"sensitivity/specificity are for class {name} (the default: the second class of "
            f"{', '.join(class_names)}; choose with --positive-class)"
        )
    return f"sensitivity/specificity are for class {name} (--positive-class {name})"


def small_group_warning(task: Task, participants_per_class: Mapping[str, int], n_participants: int) -> str | None:
    """Why a group is too small for its metrics to mean much (``SMALL_GROUP_RULE``), or None.

    Args:
        task: the task (classification counts participants per class).
        participants_per_class: classification: every class of the model → number of distinct participants with a
            labelled image of that class (0 for an absent class); ignored otherwise.
        n_participants: distinct participants of the group.
    """
    if task is Task.CLASSIFICATION:
        small = {name: n for name, n in participants_per_class.items() if n < MIN_PARTICIPANTS_PER_CLASS}
        if not small:
            return None
        counts = ", ".join(f"{name}: {n}" for name, n in participants_per_class.items())
        return f"small group: {n_participants} participant(s) ({counts}), confidence intervals too wide to mean much"
    if n_participants >= MIN_PARTICIPANTS:
        return None
    return f"small group: {n_participants} participant(s), confidence intervals too wide to mean much"


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def _labels(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {array.shape}")
    if array.size and not np.all(np.equal(np.mod(array, 1), 0)):
        raise ValueError(f"{name} must hold integer class indices, got {array[:5]}")
    return array.astype(np.int64)


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
        y_true: ``(n,)`` true class indices.
        y_pred: ``(n,)`` predicted class indices.
        n_classes: number of classes.

    Returns:
        ``(n_classes, n_classes)`` int64 array; row = true class, column = predicted class (scikit-learn order).
    """
    true = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.shape} vs {pred.shape}")
    for name, array in (("y_true", true), ("y_pred", pred)):
        if array.size and (array.min() < 0 or array.max() >= n_classes):
            raise ValueError(f"{name} has class indices outside 0..{n_classes - 1}: {np.unique(array)}")
    counts = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def _roc_auc_binary(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (equal to the trapezoidal ROC area)."""
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(score)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _roc_auc(true: np.ndarray, score: np.ndarray, n_classes: int) -> float:
    if n_classes == 2:
        positive_score = score[:, 1] if score.ndim == 2 else score
        return _roc_auc_binary(true == 1, positive_score)
    if score.ndim != 2 or score.shape[1] != n_classes:
        raise ValueError(f"multiclass y_score must have shape (n, {n_classes}), got {score.shape}")
    aucs = [_roc_auc_binary(true == k, score[:, k]) for k in range(n_classes)]
    return float(np.mean(aucs))  # nan if any class is absent


def _mcc(matrix: np.ndarray) -> float:
    """Gorodkin's R_K from a confusion matrix (the binary MCC when 2x2)."""
    total = float(matrix.sum())
    correct = float(np.trace(matrix))
    true_counts = matrix.sum(axis=1).astype(float)
    pred_counts = matrix.sum(axis=0).astype(float)
    numerator = correct * total - float(pred_counts @ true_counts)
    denominator = math.sqrt(
        (total**2 - float(pred_counts @ pred_counts)) * (total**2 - float(true_counts @ true_counts))
    )
    return _ratio(numerator, denominator)


def classification_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    y_score: ArrayLike | None = None,
    n_classes: int | None = None,
    positive_class: int = DEFAULT_POSITIVE_INDEX,
) -> dict[str, float]:
    """Classification metrics (see the module docstring for the binary/multiclass conventions).

    Args:
        y_true: ``(n,)`` true class indices.
        y_pred: ``(n,)`` predicted class indices.
        y_score: optional class probabilities, ``(n, n_classes)``; for two classes ``(n,)`` is read as the
            probability of class 1. Adds ``roc_auc`` when given.
        n_classes: number of classes; default: inferred from the labels and scores (at least 2).
        positive_class: binary only: the index of the class sensitivity, specificity, PPV, NPV and F1 are for.

    Returns:
        ``{balanced_accuracy, accuracy, sensitivity, specificity, ppv, npv, f1, mcc[, roc_auc]}``; ``nan``
        where a value is undefined (empty input, absent class, zero denominator).
    """
    true = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    score = None if y_score is None else np.asarray(y_score, dtype=np.float64)
    if n_classes is None:
        observed = [2, int(true.max(initial=0)) + 1, int(pred.max(initial=0)) + 1]
        if score is not None and score.ndim == 2:
            observed.append(score.shape[1])
        n_classes = max(observed)
    matrix = confusion_matrix(true, pred, n_classes)
    total = int(matrix.sum())
    tp = np.diag(matrix).astype(float)
    fn = matrix.sum(axis=1) - tp
    fp = matrix.sum(axis=0) - tp
    tn = total - tp - fn - fp
    per_class = {
        "sensitivity": [_ratio(tp[k], tp[k] + fn[k]) for k in range(n_classes)],
        "specificity": [_ratio(tn[k], tn[k] + fp[k]) for k in range(n_classes)],
        "ppv": [_ratio(tp[k], tp[k] + fp[k]) for k in range(n_classes)],
        "npv": [_ratio(tn[k], tn[k] + fn[k]) for k in range(n_classes)],
        "f1": [_ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]) for k in range(n_classes)],
    }
    if n_classes == 2:
        if positive_class not in (0, 1):
            raise ValueError(f"positive_class must be 0 or 1 for two classes, got {positive_class}")
        summary = {name: values[positive_class] for name, values in per_class.items()}
        balanced = (summary["sensitivity"] + summary["specificity"]) / 2
    else:
        summary = {name: float(np.mean(values)) for name, values in per_class.items()}
        balanced = summary["sensitivity"]
    result = {
        "balanced_accuracy": float(balanced),
        "accuracy": _ratio(float(tp.sum()), total),
        **summary,
        "mcc": _mcc(matrix),
    }
    if score is not None:
        if score.shape[0] != true.size:
            raise ValueError(f"y_score has {score.shape[0]} rows for {true.size} labels")
        result["roc_auc"] = _roc_auc(true, score, n_classes)
    return result


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Mean absolute error, root mean squared error and R² (coefficient of determination).

    Args:
        y_true, y_pred: ``(n,)`` or ``(n, n_outputs)`` values in the target's unit. For several outputs MAE and
            RMSE pool every value and R² is the mean of the per-output R² (scikit-learn's ``uniform_average``).

    Returns:
        ``{mae, rmse, r2}``; ``r2`` is ``nan`` when ``y_true`` is constant, every value ``nan`` when empty.
    """
    true = np.asarray(y_true, dtype=np.float64)
    pred = np.asarray(y_pred, dtype=np.float64)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {true.shape} vs {pred.shape}")
    if true.size == 0:
        return {"mae": math.nan, "rmse": math.nan, "r2": math.nan}
    error = pred - true
    columns_true = true.reshape(true.shape[0], -1)
    columns_error = error.reshape(error.shape[0], -1)
    residual = (columns_error**2).sum(axis=0)
    spread = ((columns_true - columns_true.mean(axis=0)) ** 2).sum(axis=0)
    r2 = [1.0 - r / s if s > 0 else math.nan for r, s in zip(residual, spread, strict=True)]
    return {
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "r2": float(np.mean(r2)),
    }


def ssim(x_true: ArrayLike, x_pred: ArrayLike, data_range: float | None = None) -> float:
    """Structural similarity of two 2-D or 3-D images (Wang et al. 2004), Gaussian window.

    Local means, variances and covariance are weighted by an isotropic Gaussian window (sigma 1.5 voxels,
    truncated at 3.5 sigma: 11 voxels per axis), with population (not sample) covariances and
    ``K1 = 0.01``, ``K2 = 0.03``. Border voxels where the window leaves the image (5 per side, fewer on tiny
    images so that at least one voxel remains) are excluded from the mean. This matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Args:
        x_true: reference image, ``(H, W)`` or ``(D, H, W)``.
        x_pred: image to compare, same shape.
        data_range: intensity range for the stabilising constants; default ``x_true.max() - x_true.min()``.

    Returns:
        Mean SSIM in [-1, 1]; 1 for identical images; ``nan`` when the data range is 0.
    """
    reference = np.asarray(x_true, dtype=np.float64)
    other = np.asarray(x_pred, dtype=np.float64)
    if reference.shape != other.shape or reference.ndim not in (2, 3):
        raise ValueError(f"ssim needs two 2-D or 3-D images of one shape, got {reference.shape} and {other.shape}")
    if data_range is None:
        data_range = float(reference.max() - reference.min())
    if data_range <= 0:
        return math.nan

    def local_mean(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x = local_mean(reference)
    mu_y = local_mean(other)
    var_x = local_mean(reference * reference) - mu_x * mu_x
    var_y = local_mean(other * other) - mu_y * mu_y
    cov_xy = local_mean(reference * other) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    crop = tuple(slice(min(radius, (n - 1) // 2), n - min(radius, (n - 1) // 2)) for n in ssim_map.shape)
    return float(ssim_map[crop].mean())


def psnr(x_true: ArrayLike, x_pred: ArrayLike, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``; range defaults to that of ``x_true``.

    Returns ``inf`` for identical images and ``nan`` when the range is 0.
    """
    reference = np.asarray(x_true, dtype=np.float64)
    other = np.asarray(x_pred, dtype=np.float64)
    if data_range is None:
        data_range = float(reference.max() - reference.min())
    if data_range <= 0:
        return math.nan
    mse = float(((reference - other) ** 2).mean())
    return math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def reconstruction_metrics_per_image(x_true: ArrayLike, x_pred: ArrayLike) -> dict[str, np.ndarray]:
    """MAE, RMSE, PSNR and SSIM of each image of a batch.

    Args:
        x_true: ``(n, C, H, W)`` or ``(n, C, D, H, W)`` reference images.
        x_pred: reconstructions, same shape.

    Returns:
        ``{mae, rmse, psnr, ssim}`` each ``(n,)``. PSNR uses each reference image's own range (all channels);
        SSIM is averaged over channels.
    """
    reference = np.asarray(x_true, dtype=np.float64)
    other = np.asarray(x_pred, dtype=np.float64)
    if reference.shape != other.shape or reference.ndim not in (4, 5):
        raise ValueError(
            f"reconstruction metrics need (n, C, [D,] H, W) batches of one shape, got {reference.shape} and "
            f"{other.shape}"
        )
    n_images = reference.shape[0]
    result = {name: np.empty(n_images) for name in RECONSTRUCTION_METRICS}
    for i in range(n_images):
        error = other[i] - reference[i]
        value_range = float(reference[i].max() - reference[i].min())
        result["mae"][i] = np.abs(error).mean()
        result["rmse"][i] = np.sqrt((error**2).mean())
        result["psnr"][i] = psnr(reference[i], other[i], value_range)
        result["ssim"][i] = np.mean(
            [ssim(reference[i, c], other[i, c], value_range) for c in range(reference.shape[1])]
        )
    return result


def mean_of_columns(**columns: np.ndarray) -> dict[str, float]:
    """Mean of each 1-D array, ``nan`` when empty (turns per-image metrics into a summary)."""
    return {name: float(np.mean(values)) if len(values) else math.nan for name, values in columns.items()}


def reconstruction_metrics(x_true: ArrayLike, x_pred: ArrayLike) -> dict[str, float]:
    """Image-averaged MAE, RMSE, PSNR (dB) and SSIM of a batch (see ``reconstruction_metrics_per_image``)."""
    return mean_of_columns(**reconstruction_metrics_per_image(x_true, x_pred))


def compute_metrics(
    task: Task,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    y_score: ArrayLike | None = None,
    positive_class: int = DEFAULT_POSITIVE_INDEX,
) -> dict[str, float]:
    """The metrics of ``task`` (the caller adds ``loss``).

    Args:
        task: which family of metrics.
        y_true: class indices ``(n,)``, targets ``(n,)``/``(n, k)`` or reference images ``(n, C, ...)``.
        y_pred: predicted class indices, values or reconstructions, same shape as ``y_true``.
        y_score: class probabilities ``(n, n_classes)`` (classification only; adds ``roc_auc``).
        positive_class: index of the class of sensitivity, specificity, PPV, NPV (binary classification).
    """
    if task is Task.CLASSIFICATION:
        n_rows = np.asarray(y_true).shape[0]
        n_classes = None if y_score is None else max(2, np.asarray(y_score).reshape(n_rows, -1).shape[1])
        return classification_metrics(y_true, y_pred, y_score, n_classes=n_classes, positive_class=positive_class)
    if task is Task.REGRESSION:
        return regression_metrics(y_true, y_pred)
    return reconstruction_metrics(y_true, y_pred)


def bootstrap_intervals(
    metric_fn: Callable[..., Mapping[str, float]],
    *arrays: ArrayLike | None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals, resampling rows (images) with replacement.

    Every array is indexed by the same resampled rows; ``None`` arguments are passed through unchanged.
    Resamples where a metric is undefined (``nan``, e.g. one class drawn only) are left out of that metric's
    percentiles; a metric undefined in every resample gets ``(nan, nan)``.

    Args:
        metric_fn: ``metric_fn(*arrays) -> {name: value}``, e.g. ``classification_metrics``.
        *arrays: arrays with the same first dimension ``n``.
        n_bootstrap: number of resamples.
        seed: seed of the ``numpy.random.Generator`` (same seed → same intervals).
        alpha: 1 - confidence level (0.05 → 95 % intervals).

    Returns:
        ``{name: (low, high)}`` for every key ``metric_fn`` returns.
    """
    present = [np.asarray(a) for a in arrays if a is not None]
    if not present:
        raise ValueError("bootstrap_intervals needs at least one array")
    n_rows = len(present[0])
    if any(len(a) != n_rows for a in present):
        raise ValueError(f"bootstrap arrays differ in length: {[len(a) for a in present]}")
    if n_rows == 0 or n_bootstrap <= 0:
        return {name: (math.nan, math.nan) for name in metric_fn(*arrays)}
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_rows, size=(n_bootstrap, n_rows))
    samples: dict[str, list[float]] = {}
    for draw in rows:
        values = metric_fn(*(None if a is None else np.asarray(a)[draw] for a in arrays))
        for name, value in values.items():
            samples.setdefault(name, []).append(float(value))
    intervals: dict[str, tuple[float, float]] = {}
    for name, values_list in samples.items():
        values_array = np.asarray(values_list)
        finite = values_array[~np.isnan(values_array)]
        if finite.size == 0:
            intervals[name] = (math.nan, math.nan)
            continue
        low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        intervals[name] = (float(low), float(high))
    return intervals
