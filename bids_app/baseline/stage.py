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

import json
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
from bids_app.data.tables import UNLABELLED, GroupTable, channel_paths, external_table, rows_for
from bids_app.derivatives import atomic_write_json
from bids_app.errors import DataError
from bids_app.labels import COHORT
from bids_app.maps import Maps
from bids_app.maps.results import proba_columns, write_image_outputs, write_split_summary
from bids_app.maps.weights import load_arrays, save_arrays
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
        for index, paths in enumerate(channel_paths(rows)):
            key = "\n".join(paths)
            vector = self._vectors.get(key)
            if vector is None:
                vector = self._vectors[key] = image_features([Path(p) for p in paths], self.mode, self.pooling)
            out[index] = vector
        return out


def encode_targets(rows: GroupTable, task: Task, encoding: Mapping[str, int] | None) -> np.ndarray:
    """Float targets of ``rows``: class index or value; ``nan`` where the image is unlabelled.

    Raises:
        DataError: a class the model does not know, or a regression label that is not a number (naming the
            image's tensor, its participant and session, the value and the fix).
    """
    labels = rows["label"].astype(str) if "label" in rows.columns else pd.Series([UNLABELLED] * len(rows))
    values = np.full(len(rows), np.nan)
    known = dict(encoding or {})
    for index, label in enumerate(labels):
        if label in (UNLABELLED, ""):
            continue
        if task is Task.CLASSIFICATION:
            if label not in known:
                raise DataError(
                    f"{_image_name(rows, index)} has label {label!r}, which is not a class of the model "
                    f"({', '.join(sorted(known))}). Check the label column, or drop the image "
                    "(--participant-label, --session-label)."
                )
            values[index] = float(known[label])
            continue
        try:
            values[index] = float(label)
        except ValueError:
            raise DataError(
                f"{_image_name(rows, index)} has label {label!r}, but a regression label must be a number. Fix "
                "the label column (n/a for an unknown value)."
            ) from None
    return values


def _image_name(rows: GroupTable, index: int) -> str:
    """The tensor, participant and session of ``rows``' ``index``-th image, for an error message."""
    row = rows.iloc[index]
    who = f"{row['participant_id']} {row['session_id']}"
    if COHORT in rows.columns:
        who = f"{row[COHORT]}/{who}"
    return f"{row['tensor_path']} ({who})" if "tensor_path" in rows.columns else who


def image_table(rows: GroupTable, targets: np.ndarray, output: np.ndarray, task: Task) -> pd.DataFrame:
    """The image table of ``maps.results`` for ``rows`` and the model's ``output`` (``linear.predict_linear``).

    A multi-cohort table keeps its ``cohort`` column first, as the network's prediction TSVs do: a participant id
    names a person only within its cohort.
    """
    image = pd.DataFrame(
        {
            **({COHORT: rows[COHORT].astype(str).to_numpy()} if COHORT in rows.columns else {}),
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


class BaselineWriter:
    """What every split and group of one baseline run shares: the model folder, the features, the bootstrap.

    Attributes:
        maps: the model folder (task, classes, positive class, selection metrics, seed).
        cache: the features of every image read so far.
        n_bootstrap: resamples of the metrics' 95 % intervals (``--n-bootstrap``, as the network's).
        tracker: where each group's metrics are mirrored.
    """

    def __init__(self, maps: Maps, cache: FeatureCache, n_bootstrap: int, tracker: Tracker) -> None:
        self.maps, self.cache, self.n_bootstrap, self.tracker = maps, cache, n_bootstrap, tracker
        self.task = maps.record.task
        names = maps.class_names
        self.positive_name = maps.record.config.labels.positive_class
        binary = self.task is Task.CLASSIFICATION and len(names) == 2
        self.positive = positive_class_index(names, self.positive_name) if binary else 1

    def targets(self, rows: GroupTable) -> np.ndarray:
        return encode_targets(rows, self.task, self.maps.record.label_encoding)

    def predict_group(
        self, split: int, metric: str, fitted: tuple[LinearModel, Standardisation], group_name: str, rows: GroupTable
    ) -> float | None:
        """Predict ``rows`` with a baseline, write the group's TSVs; returns its headline metric (None: unlabelled)."""
        model, standardisation = fitted
        output = predict_linear(self.task, model, standardisation.apply(self.cache.matrix(rows)))
        _, metrics = write_image_outputs(
            self.maps.layout.baseline_group_dir(split, metric, group_name),
            group_name,
            image_table(rows, self.targets(rows), output, self.task),
            self.task,
            self.maps.class_names,
            self.n_bootstrap,
            self.positive_name,
        )
        self.tracker.log_baseline_group(split, metric, group_name)
        if metrics is None:
            return None
        found = metrics.loc[metrics["metric"] == HEADLINE[self.task], "value"]
        return float(found.iloc[0]) if len(found) else math.nan

    def fit_split(
        self, split: int, train_rows: GroupTable, validation_rows: GroupTable, other: tuple[str, GroupTable]
    ) -> None:
        """Fit, select, save and predict the baselines of one split (one per selection metric)."""
        layout, record, task = self.maps.layout, self.maps.record, self.task
        class_names = self.maps.class_names
        y_train = self.targets(train_rows)
        if task is Task.CLASSIFICATION:
            absent = [class_names[k] for k in range(len(class_names)) if not (y_train == k).any()]
            if absent:
                log.warning("Split %d: no linear baseline, its training group has no image of class(es) %s.",
                            split, ", ".join(absent))  # fmt: skip
                return
        standardisation = Standardisation.fit(self.cache.matrix(train_rows))
        models, selections = select_models(
            task,
            (standardisation.apply(self.cache.matrix(train_rows)), y_train),
            (standardisation.apply(self.cache.matrix(validation_rows)), self.targets(validation_rows)),
            record.config.train.selection_metrics,
            len(class_names),
            self.positive,
            record.config.seed,
        )
        _, parameter, _ = model_kind(task)
        counts = {"train": len(train_rows), "validation": len(validation_rows)}
        for selection in selections:
            metric, model = selection.metric, models[selection.chosen]
            atomic_write_json(
                layout.baseline_selection_json(split, metric),
                selection_record(split, task, selection, models, self.cache.pooling, counts, record.config.seed),
            )
            save_arrays(
                layout.baseline_model_path(split, metric),
                {"coef": model.coef, "intercept": model.intercept, "feature_mean": standardisation.mean,
                 "feature_scale": standardisation.scale},
            )  # fmt: skip
            headline = {}
            for group_name, rows in ((VALIDATION_GROUP, validation_rows), other):
                if not rows.empty:
                    headline[group_name] = self.predict_group(split, metric, (model, standardisation), group_name, rows)
            shown = "".join(f"; {group} {HEADLINE[task]} {value:.3f}" for group, value in headline.items()
                            if value is not None)  # fmt: skip
            scored = SCORE_NAMES[task] if metric == "loss" else metric
            log.info("Split %d linear baseline (best-%s): %s = %g chosen on validation (%s %.4g; %d values tried)%s.",
                     split, metric, parameter, model.value, scored, selection.best_score(), len(models),
                     shown)  # fmt: skip
            if not model.converged:
                log.warning("Split %d linear baseline (best-%s): the solver did not converge with %s = %g; its "
                            "predictions are those of the last iteration.", split, metric, parameter,
                            model.value)  # fmt: skip


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
    record = maps.record
    if record.task is Task.RECONSTRUCTION:
        log.info("No linear baseline for the reconstruction model %s: a baseline predicts labels.", maps.name)
        return
    trained = maps.trained_splits(cfg.train.splits)
    folds = {fold.index: fold for fold in maps.splits.folds}
    if cfg.predict.predict_from is None:
        other = ("test", rows_for(maps.splits.test, table, "test group"))
    else:
        other = (
            str(cfg.predict.group_name),
            external_table(cfg.predict.predict_from, record.mode, record.config.labels, record.kinds),
        )
    pooling = tensor_pooling(Path(str(table["tensor_path"].iloc[0])), record.mode, n_channels=len(record.kinds))
    writer = BaselineWriter(maps, FeatureCache(record.mode, pooling), cfg.predict.n_bootstrap, tracker or Tracker())
    name, parameter, _ = model_kind(record.task)
    resolution = "full resolution" if pooling.factor == 1 else f"means of {pooling.factor}-voxel-wide blocks"
    log.info("Linear baseline (%s) of model %s: %d feature(s) per image (%d channel(s) of %d part(s), %s), "
             "hyper-parameter %s chosen on each split's validation group.", name.replace("_", " "), maps.name,
             pooling.n_features, pooling.n_channels, pooling.n_parts, resolution, parameter)  # fmt: skip
    for split in trained:
        train_rows = rows_for(folds[split].train, table, "training set")
        validation_rows = rows_for(folds[split].validation, table, "validation set")
        writer.fit_split(split, train_rows, validation_rows, other)
    write_baseline_summaries(maps, (VALIDATION_GROUP, other[0]))


def read_saved_selection(maps: Maps, split: int, metric: str) -> tuple[Pooling, float]:
    """The pooling and the chosen hyper-parameter of a saved baseline (its ``selection.json``).

    Raises:
        DataError: the file is missing or lacks a key although the baseline's ``model.safetensors`` exists.
    """
    path = maps.layout.baseline_selection_json(split, metric)
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
        features = selection["features"]
        pooling = Pooling(int(features["n_parts"]), tuple(int(side) for side in features["part_shape"]),
                          int(features["block_voxels_per_side"]), int(features.get("n_channels", 1)))  # fmt: skip
        return pooling, float(selection["chosen_value"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is missing or malformed ({exc!r}) although {maps.layout.baseline_model_path(split, metric)} "
            "exists. Fit the baseline again (--stages baseline predict) or pass --no-baseline."
        ) from exc


def predict_with_saved_baselines(
    cfg: RunConfig, maps: Maps, group_name: str, rows: GroupTable, tracker: Tracker | None = None
) -> None:
    """Predict a group's images with the baselines the model folder holds (no fit, no selection).

    A run ``--stages predict --predict-from`` (or ``--model``) does not fit the baseline again: each split's saved
    ``model.safetensors`` (coefficients and the training group's standardisation) and the pooling recorded in its
    ``selection.json`` predict ``rows``, so the network's metric TSV of that group carries the baseline's beside
    its own. A model folder without baselines (``--no-baseline``, reconstruction) is left so.

    Args:
        cfg: the run configuration (``train.splits``, ``predict.n_bootstrap``).
        maps: the model folder.
        group_name: the predicted group's name (``--group-name``).
        rows: the very images the network predicts, once checked (its leak guard's and settings' table, narrowed
            by ``--participant-label``, ``--session-label`` and the filter): never read again from their folder.
        tracker: where each group's baseline metrics are mirrored; default none.
    """
    record, layout = maps.record, maps.layout
    if record.task is Task.RECONSTRUCTION:
        return
    saved = [(split, metric) for split in maps.trained_splits(cfg.train.splits)
             for metric in record.config.train.selection_metrics
             if layout.baseline_model_path(split, metric).is_file()]  # fmt: skip
    if not saved:
        log.info("Model %s holds no linear baseline: group '%s' is predicted by the network only (run --stages "
                 "baseline predict to fit one).", maps.name, group_name)  # fmt: skip
        return
    records = [(split, metric, *read_saved_selection(maps, split, metric)) for split, metric in saved]
    writer: BaselineWriter | None = None
    for split, metric, pooling, chosen in records:
        if writer is None or writer.cache.pooling != pooling:
            cache = FeatureCache(record.mode, pooling)
            writer = BaselineWriter(maps, cache, cfg.predict.n_bootstrap, tracker or Tracker())
        arrays = load_arrays(layout.baseline_model_path(split, metric))
        model = LinearModel(arrays["coef"], arrays["intercept"], chosen, True)
        standardisation = Standardisation(arrays["feature_mean"], arrays["feature_scale"])
        value = writer.predict_group(split, metric, (model, standardisation), group_name, rows)
        shown = "" if value is None else f": {HEADLINE[record.task]} {value:.3f}"
        log.info("Split %d linear baseline (best-%s, saved) predicted group '%s'%s.", split, metric, group_name, shown)
    write_baseline_summaries(maps, (group_name,))


def remove_baseline_group(maps: Maps, group_name: str) -> None:
    """Remove the baseline's files of a group the prediction stage refused (a leak): no result of it remains.

    The baseline predicts a ``--predict-from`` group before the network's prediction checks it for leaks
    (``levels`` calls this when that check refuses it).
    """
    import shutil

    layout = maps.layout
    removed = [path for path in sorted(layout.root.glob(f"split-*/baseline/best-*/{group_name}")) if path.is_dir()]
    for path in removed:
        shutil.rmtree(path)
    for metric in maps.record.config.train.selection_metrics:
        layout.baseline_summary_tsv(group_name, metric).unlink(missing_ok=True)
    if removed:
        log.info("The linear baseline's predictions of the refused group '%s' were removed (%d folder(s)).",
                 group_name, len(removed))  # fmt: skip


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
