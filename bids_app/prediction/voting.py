"""Image level: patch/slice/roi predictions → one per image (soft voting; metrics: ``maps.results``).

Part-level tables (one row per image part) have the columns ``participant_id``, ``session_id``,
``part_id`` and ``true_label`` (class index or target value as float; ``nan`` when unlabelled), plus
``proba_0 .. proba_<K-1>`` (classification: class probabilities) or ``predicted`` (regression).

Weights (one per part index) are computed on the **validation** set only and re-used for every other group:

- classification: weight of part p = balanced accuracy of part p's own predictions on validation; parts
  whose weight is below ``threshold`` get weight 0 (dropped). Image probability = weighted mean of its parts'
  probabilities; the predicted class is the arg-max.
- regression: by default every part has weight 1 (plain mean of the parts' predictions); with
  ``inverse_mae=True`` the weight of part p is ``1 / MAE_p`` on validation, so parts that predict better
  count more. The threshold does not apply (it is a balanced accuracy).

The validation set itself cannot be scored with weights learned on it (that flatters its metrics). It is
scored **leave-one-participant-out**: the weights used for a validation participant's images are computed
from the other validation participants' parts only (``vote_validation``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bids_app.config import Task
from bids_app.errors import ConfigError, InputMissingError
from bids_app.labels import image_keys, subject_ids
from bids_app.maps.results import proba_columns
from bids_app.metrics import classification_metrics

log = logging.getLogger(__name__)

VOTING_WEIGHTS_FILE = "voting_weights.tsv"  # in split-<k>/best-<metric>/, written when validation is predicted


def _classification_part_scores(parts: pd.DataFrame, n_classes: int) -> pd.Series:
    """Balanced accuracy of each part index, from its arg-max predictions (labelled rows only)."""
    labelled = parts[~parts["true_label"].isna()]
    predicted = labelled[proba_columns(n_classes)].to_numpy().argmax(axis=1)
    true = labelled["true_label"].to_numpy().astype(np.int64)
    part_ids = labelled["part_id"].to_numpy().astype(np.int64)
    scores = {}
    for part in np.unique(part_ids):
        rows = part_ids == part
        scores[int(part)] = classification_metrics(true[rows], predicted[rows], n_classes=n_classes)[
            "balanced_accuracy"
        ]
    return pd.Series(scores, dtype=float)


def _regression_part_scores(parts: pd.DataFrame) -> pd.Series:
    labelled = parts[~parts["true_label"].isna()]
    error = (labelled["predicted"] - labelled["true_label"]).abs()
    return error.groupby(labelled["part_id"]).mean().rename(index=int)


def compute_voting_weights(
    validation_parts: pd.DataFrame,
    task: Task,
    n_classes: int,
    threshold: float,
    inverse_mae: bool = False,
    strict: bool = True,
) -> pd.DataFrame:
    """Per-part voting weights from validation part-level predictions.

    Args:
        validation_parts: part-level table of the validation set (module docstring); must be labelled.
        task: classification or regression.
        n_classes: number of classes (classification).
        threshold: classification parts with a validation balanced accuracy below this get weight 0.
        inverse_mae: regression only: weight parts by ``1 / MAE`` instead of equally.
        strict: raise when the threshold drops every part; otherwise fall back to equal weights with a warning.

    Returns:
        Table with columns ``part_id``, ``validation_metric`` (``balanced_accuracy`` or ``mae``),
        ``validation_value`` and ``weight`` (>= 0), one row per part index, sorted by part index. When a value
        is undefined for every part (e.g. a class absent from validation), every part gets weight 1.

    Raises:
        ConfigError: ``strict`` and no part reaches ``threshold``.
    """
    if task is Task.CLASSIFICATION:
        metric = "balanced_accuracy"
        values = _classification_part_scores(validation_parts, n_classes)
        weights = values.where(values >= threshold, 0.0).fillna(0.0)
    elif task is Task.REGRESSION:
        metric = "mae"
        values = _regression_part_scores(validation_parts)
        weights = 1.0 / values.clip(lower=1e-12) if inverse_mae else values * 0.0 + 1.0
    else:
        raise ValueError(f"voting applies to classification and regression, not {task}")
    all_parts = np.unique(validation_parts["part_id"].to_numpy().astype(np.int64))
    values = values.reindex(all_parts)
    weights = weights.reindex(all_parts).fillna(0.0)
    if values.isna().all():
        log.warning(
            "Voting weights undefined on validation (%s is nan for every part); parts weighted equally.", metric
        )
        weights[:] = 1.0
    elif not (weights > 0).any():
        best = float(values.max())
        message = (
            f"voting_threshold {threshold} drops every part (best validation balanced accuracy {best:.3f}). "
            "Lower --voting-threshold."
        )
        if strict:
            raise ConfigError(message)
        log.warning("%s Falling back to equal weights.", message)
        weights[:] = 1.0
    return pd.DataFrame(
        {
            "part_id": all_parts,
            "validation_metric": metric,
            "validation_value": values.to_numpy(),
            "weight": weights.to_numpy(),
        }
    )


def soft_vote(parts: pd.DataFrame, weights: pd.DataFrame, task: Task, n_classes: int) -> pd.DataFrame:
    """Combine part predictions into image predictions with fixed per-part weights.

    Args:
        parts: part-level table (module docstring).
        weights: output of ``compute_voting_weights`` (parts missing from it get weight 0).
        task: classification or regression.
        n_classes: number of classes (classification).

    Returns:
        One row per image, in order of first appearance in ``parts``: ``participant_id``, ``session_id``,
        ``true_label``, then ``proba_*`` and ``predicted_label`` (classification, class index) or
        ``predicted`` (regression).

    Raises:
        ConfigError: an image has no part with a positive weight (its parts were all dropped).
    """
    weight_of = dict(zip(weights["part_id"].astype(int), weights["weight"].astype(float), strict=True))
    part_weight = parts["part_id"].map(lambda p: weight_of.get(int(p), 0.0)).to_numpy(dtype=float)
    value_columns = proba_columns(n_classes) if task is Task.CLASSIFICATION else ["predicted"]
    values = parts[value_columns].to_numpy(dtype=float)
    id_columns = image_keys(parts)  # (cohort,) participant_id, session_id
    image_codes, images = pd.factorize(pd.MultiIndex.from_frame(parts[id_columns]), sort=False)
    n_images = len(images)
    weight_sum = np.bincount(image_codes, weights=part_weight, minlength=n_images)
    if (weight_sum <= 0).any():
        first = images[int(np.argmax(weight_sum <= 0))]
        raise ConfigError(
            f"Every part of image {' '.join(str(v) for v in first)} has voting weight 0, so it cannot be predicted. "
            "Lower --voting-threshold."
        )
    voted = (
        np.stack(
            [
                np.bincount(image_codes, weights=part_weight * values[:, j], minlength=n_images)
                for j in range(values.shape[1])
            ],
            axis=1,
        )
        / weight_sum[:, None]
    )
    first_rows = pd.Series(np.arange(len(parts))).groupby(image_codes).first().to_numpy()
    image = pd.DataFrame(
        {
            **{column: parts[column].to_numpy()[first_rows] for column in id_columns},
            "true_label": parts["true_label"].to_numpy(dtype=float)[first_rows],
        }
    )
    for j, column in enumerate(value_columns):
        image[column] = voted[:, j]
    if task is Task.CLASSIFICATION:
        image["predicted_label"] = voted.argmax(axis=1)
    return image


def vote_validation(
    validation_parts: pd.DataFrame, task: Task, n_classes: int, threshold: float, inverse_mae: bool = False
) -> pd.DataFrame:
    """Score the validation set with leave-one-participant-out weights (never its own predictions).

    For each validation participant the weights are computed from every other validation participant's
    parts, then applied to that participant's images; with a single participant, parts are weighted equally.

    Returns:
        The image table of ``soft_vote``, images in order of first appearance.
    """
    who = subject_ids(validation_parts)  # a participant is (cohort, participant_id) in a multi-cohort run
    images = []
    for participant in pd.unique(who):
        own = who == participant
        others = validation_parts[~own]
        if others.empty or others["true_label"].isna().all():
            weights = pd.DataFrame({"part_id": np.unique(validation_parts["part_id"]), "weight": 1.0})
        else:
            weights = compute_voting_weights(others, task, n_classes, threshold, inverse_mae, strict=False)
        images.append(soft_vote(validation_parts[own], weights, task, n_classes))
    return pd.concat(images, ignore_index=True)


def is_single_part(parts: pd.DataFrame) -> bool:
    """True when every image has exactly one part (image mode: no voting needed)."""
    counts = parts.groupby(image_keys(parts), sort=False).size()
    return bool(len(counts) == 0 or (counts == 1).all())


def images_without_voting(parts: pd.DataFrame, task: Task, n_classes: int) -> pd.DataFrame:
    """Image table when no voting applies: one part per image, or reconstruction (mean of part metrics).

    Returns:
        The ``soft_vote`` image table (classification adds the arg-max ``predicted_label``); reconstruction
        keeps ``mae``, ``rmse``, ``psnr``, ``ssim`` averaged over each image's parts.
    """
    if task is Task.RECONSTRUCTION:
        id_columns = image_keys(parts)
        metric_columns = [c for c in parts.columns if c not in (*id_columns, "part_id", "true_label")]
        image = parts.groupby(id_columns, sort=False)[metric_columns].mean().reset_index()
        image.insert(len(id_columns), "true_label", np.nan)
        return image
    image = parts.drop(columns="part_id").reset_index(drop=True)
    if task is Task.CLASSIFICATION:
        image["predicted_label"] = image[proba_columns(n_classes)].to_numpy().argmax(axis=1)
    return image


def read_voting_weights(path: Path) -> pd.DataFrame:
    """Read the validation weights saved when the validation group was predicted.

    Raises:
        InputMissingError: the file does not exist (the validation group was not predicted yet).
    """
    if not path.is_file():
        raise InputMissingError(
            f"Voting weights {path} do not exist. Predict the 'validation' group of this split and selection "
            "metric first: voting weights come from validation only."
        )
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])
