"""The baseline stage: per trained split, a linear model on the network's tensors, split and selection rule.

For each trained split ``k`` and selection metric ``m`` of the model folder, under
``split-<k>/baseline/best-<m>/`` (``MapsLayout.baseline_*``):

- ``selection.json``: the model and its hyper-parameter, the grid with each value's validation score and whether
  the solver converged, the chosen value, the features (``features.Pooling.describe``), image counts, seed;
- ``model.safetensors``: ``coef`` ``(n_outputs, n_features)``, ``intercept`` ``(n_outputs,)``, and the training
  group's standardisation ``feature_mean``, ``feature_scale`` ``(n_features,)`` (never a pickle);
- ``<group>/<group>_image_level_prediction.tsv``, ``<group>_image_level_metrics.tsv`` and (classification)
  ``<group>_confusion_matrix.tsv`` for ``validation`` and ``test`` (or the ``--predict-from`` group), in the
  network's format (``maps.results``), with the same bootstrap;
- ``summary/<group>_best-<m>_baseline_metrics_across_splits.tsv`` with several trained splits.

The model is fitted on the training group only, its hyper-parameter chosen on the validation group only
(``linear.select_models``); the test group is predicted once, with the chosen model. The prediction stage,
which runs next, copies the baseline's value and interval of each metric beside the network's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_app.baseline.features import Pooling, Standardisation, image_features, tensor_pooling
from bids_app.baseline.linear import LinearModel, Selection, model_kind, predict_linear, select_models
from bids_app.config import ExtractionMode, RunConfig, Task
from bids_app.data.tables import UNLABELLED, GroupTable, external_table, rows_for
from bids_app.derivatives import atomic_write_json
from bids_app.maps import Maps
from bids_app.maps.results import proba_columns, write_image_outputs, write_split_summary
from bids_app.maps.weights import save_arrays
from bids_app.metrics import positive_class_index
from bids_app.tracking.mlflow import Tracker

log = logging.getLogger(__name__)

VALIDATION_GROUP = "validation"
# The metric the log shows beside the chosen hyper-parameter.
HEADLINE = {Task.CLASSIFICATION: "balanced_accuracy", Task.REGRESSION: "mae"}
SCORE_NAMES = {Task.CLASSIFICATION: "log-loss", Task.REGRESSION: "mean squared error"}  # selection metric "loss"


class FeatureCache:
    """Each image's feature vector, read from its tensor once for every split and group of the run."""

    def __init__(self, mode: ExtractionMode, pooling: Pooling) -> None:
        self.mode = mode
        self.pooling = pooling
        self._vectors: dict[str, np.ndarray] = {}

    def matrix(self, rows: GroupTable) -> np.ndarray:
        """``(len(rows), n_features)`` float32 features of ``rows``' tensors, in row order."""
        out = np.empty((len(rows), self.pooling.n_features), dtype=np.float32)
        for index, path in enumerate(rows["tensor_path"].astype(str)):
            vector = self._vectors.get(path)
            if vector is None:
                vector = self._vectors[path] = image_features(Path(path), self.mode, self.pooling)
            out[index] = vector
        return out


def encode_targets(rows: GroupTable, task: Task, encoding: Mapping[str, int] | None) -> np.ndarray:
    """Float targets of ``rows``: class index or value; ``nan`` where the image is unlabelled."""
    labels = rows["label"].astype(str) if "label" in rows.columns else pd.Series([UNLABELLED] * len(rows))
    values = np.full(len(rows), np.nan)
    for index, label in enumerate(labels):
        if label in (UNLABELLED, ""):
            continue
        values[index] = float((encoding or {})[label]) if task is Task.CLASSIFICATION else float(label)
    return values


def image_table(rows: GroupTable, targets: np.ndarray, output: np.ndarray, task: Task) -> pd.DataFrame:
    """The image table of ``maps.results`` for ``rows`` and the model's ``output`` (``linear.predict_linear``)."""
    image = pd.DataFrame(
        {
            "participant_id": rows["participant_id"].astype(str).to_numpy(),
            "session_id": rows["session_id"].astype(str).to_numpy(),
            "true_label": targets,
        }
    )
    if task is Task.CLASSIFICATION:
        for column, values in zip(proba_columns(output.shape[1]), output.T, strict=True):
            image[column] = values
        image["predicted_label"] = output.argmax(axis=1)
    else:
        image["predicted"] = output
    return image


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def selection_record(
    split: int,
    task: Task,
    selection: Selection,
    models: list[LinearModel],
    pooling: Pooling,
    counts: Mapping[str, int],
    seed: int,
) -> dict[str, Any]:
    """The content of ``selection.json`` (module docstring)."""
    name, parameter, grid = model_kind(task)
    chosen = models[selection.chosen]
    record: dict[str, Any] = {
        "split": split,
        "metric": selection.metric,
        "model": name,
        "hyperparameter": parameter,
        "grid": list(grid),
        "validation_scores": [_json_number(value) for value in selection.scores],
        "converged": [model.converged for model in models],
        "chosen_value": chosen.value,
        "chosen_validation_score": _json_number(selection.best_score()),
        "chosen_on": "validation",
        "features": pooling.describe(),
        "standardisation": "training group mean and standard deviation, then divided by sqrt(n_features)",
        **{f"n_{group}_images": n for group, n in counts.items()},
        "random_state": seed,
    }
    if task is Task.CLASSIFICATION:
        record["class_weight"] = "balanced"
    return record


def run_baseline_stage(cfg: RunConfig, maps: Maps, table: GroupTable, tracker: Tracker | None = None) -> None:
    """Fit, select and predict the linear baseline of every trained split (module docstring).

    Args:
        cfg: the run configuration (``cfg.train.splits``, ``cfg.predict`` for the predicted group and the
            bootstrap).
        maps: the model folder; its record decides task, mode, classes, selection metrics and seed.
        table: labels joined with the tensors of the model's mode (``data.tables.index_tensors``).
        tracker: where each group's baseline metrics are mirrored; default none.

    Raises:
        DataError: a tensor's shape differs from the others', or a split's group lacks its tensors.
    """
    tracker = tracker or Tracker()
    record, layout = maps.record, maps.layout
    task = record.task
    if task is Task.RECONSTRUCTION:
        log.info("No linear baseline for the reconstruction model %s: a baseline predicts labels.", maps.name)
        return
    trained = maps.trained_splits(cfg.train.splits)
    folds = {fold.index: fold for fold in maps.splits.folds}
    if cfg.predict.predict_from is None:
        other_name, other = "test", rows_for(maps.splits.test, table, "test group")
    else:
        other_name = str(cfg.predict.group_name)
        other = external_table(cfg.predict.predict_from, record.mode, record.config.labels)
    pooling = tensor_pooling(Path(str(table["tensor_path"].iloc[0])), record.mode)
    cache = FeatureCache(record.mode, pooling)
    class_names = maps.class_names
    binary = task is Task.CLASSIFICATION and len(class_names) == 2
    positive_name = record.config.labels.positive_class
    positive = positive_class_index(class_names, positive_name) if binary else 1
    name, parameter, _ = model_kind(task)
    resolution = "full resolution" if pooling.factor == 1 else f"means of {pooling.factor}-voxel-wide blocks"
    log.info("Linear baseline (%s) of model %s: %d feature(s) per image (%d part(s), %s), hyper-parameter %s "
             "chosen on each split's validation group.", name.replace("_", " "), maps.name, pooling.n_features,
             pooling.n_parts, resolution, parameter)  # fmt: skip
    for split in trained:
        fold = folds[split]
        train_rows = rows_for(fold.train, table, "training set")
        validation_rows = rows_for(fold.validation, table, "validation set")
        y_train = encode_targets(train_rows, task, record.label_encoding)
        y_validation = encode_targets(validation_rows, task, record.label_encoding)
        if task is Task.CLASSIFICATION:
            absent = [class_names[k] for k in range(len(class_names)) if not (y_train == k).any()]
            if absent:
                log.warning("Split %d: no linear baseline, its training group has no image of class(es) %s.",
                            split, ", ".join(absent))  # fmt: skip
                continue
        standardisation = Standardisation.fit(cache.matrix(train_rows))
        models, selections = select_models(
            task,
            (standardisation.apply(cache.matrix(train_rows)), y_train),
            (standardisation.apply(cache.matrix(validation_rows)), y_validation),
            record.config.train.selection_metrics,
            len(class_names),
            positive,
            record.config.seed,
        )
        counts = {"train": len(train_rows), "validation": len(validation_rows)}
        for selection in selections:
            metric, model = selection.metric, models[selection.chosen]
            atomic_write_json(
                layout.baseline_selection_json(split, metric),
                selection_record(split, task, selection, models, pooling, counts, record.config.seed),
            )
            save_arrays(
                layout.baseline_model_path(split, metric),
                {"coef": model.coef, "intercept": model.intercept, "feature_mean": standardisation.mean,
                 "feature_scale": standardisation.scale},
            )  # fmt: skip
            headline: dict[str, float] = {}
            for group_name, rows in ((VALIDATION_GROUP, validation_rows), (other_name, other)):
                if rows.empty:
                    continue
                output = predict_linear(task, model, standardisation.apply(cache.matrix(rows)))
                targets = encode_targets(rows, task, record.label_encoding)
                _, metrics = write_image_outputs(
                    layout.baseline_group_dir(split, metric, group_name),
                    group_name,
                    image_table(rows, targets, output, task),
                    task,
                    class_names,
                    cfg.predict.n_bootstrap,
                    positive_name,
                )
                if metrics is not None:
                    found = metrics.loc[metrics["metric"] == HEADLINE[task], "value"]
                    headline[group_name] = float(found.iloc[0]) if len(found) else math.nan
                tracker.log_baseline_group(split, metric, group_name)
            shown = ", ".join(f"{group} {HEADLINE[task]} {value:.3f}" for group, value in headline.items())
            scored = SCORE_NAMES[task] if metric == "loss" else metric
            log.info("Split %d linear baseline (best-%s): %s = %g chosen on validation (%s %.4g; %d values tried)%s.",
                     split, metric, parameter, model.value, scored, selection.best_score(), len(models),
                     f"; {shown}" if shown else "")  # fmt: skip
            if not model.converged:
                log.warning("Split %d linear baseline (best-%s): the solver did not converge with %s = %g; its "
                            "predictions are those of the last iteration.", split, metric, parameter,
                            model.value)  # fmt: skip
    write_baseline_summaries(maps, (VALIDATION_GROUP, other_name))


def write_baseline_summaries(maps: Maps, groups: tuple[str, ...]) -> None:
    """With several splits, each group's baseline metrics summarised across splits (``baseline_summary_tsv``)."""
    layout, splits = maps.layout, maps.trained_splits()
    for group in groups:
        for metric in maps.record.config.train.selection_metrics:
            path = layout.baseline_summary_tsv(group, metric)
            paths = {split: layout.baseline_metrics_tsv(split, metric, group) for split in splits}
            if write_split_summary(path, paths) is not None:
                log.info("Group '%s', linear baseline best-%s: metrics across %d splits in %s", group, metric,
                         len(splits), path)  # fmt: skip
