"""Inference on a group of images, soft voting, and the prediction/metric TSVs (after the ``leakage`` check).

Outputs of ``predict_group`` under ``<maps>/split-<k>/best-<metric>/<group>/``:

- ``<group>_image_level_prediction.tsv``: ``participant_id``, ``session_id``, ``true_label`` (``n/a`` when
  unlabelled), ``predicted_label`` (class name or predicted value) and ``proba_<class>`` per class
  (classification); reconstruction: ``mae``, ``rmse``, ``psnr``, ``ssim`` instead (means over the parts);
- ``<group>_<mode>_level_prediction.tsv`` (patch, slice, roi): the same per part, with ``part_id``;
- ``<group>_image_level_metrics.tsv`` (labelled groups): ``metric``, ``value``, ``ci_low``, ``ci_high``
  (95 % percentile bootstrap over images, seeded), ``n_images``, ``n_participants``, ``positive_class``
  (classification) and ``warning`` (``maps.results.metric_table``; the small-group rule is
  ``metrics.SMALL_GROUP_RULE``), and last ``training_status``: ``learned`` or ``did-not-learn`` as the split's
  ``summary.json`` says (``training.learning``), ``n/a`` for a model trained before that verdict existed or a
  reconstruction model; a split whose network did not learn is also named in a warning before it predicts;
- ``<group>_confusion_matrix.tsv`` (labelled classification): rows true class, columns predicted class;
- ``<maps>/summary/<group>_best-<metric>_metrics_across_splits.tsv`` with several trained splits: each
  metric's mean and sd over splits and its value per split (``maps.results.split_summary_table``);
- ``leak_warning.json`` when a leak was allowed with ``allow_leak`` (written by ``leakage.enforce_no_leak``).

Soft-voting weights (``voting.py``) are computed once per split and selection metric from the validation
group's part predictions, saved as ``split-<k>/best-<metric>/voting_weights.tsv`` and re-used for every other
group, which must therefore be predicted after ``validation``.

Every file is written atomically; floats are written with a fixed format, so the same model and data give
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bids_app.config import PredictConfig, RunConfig, RuntimeConfig, Task
from bids_app.derivatives import atomic_write_text
from bids_app.errors import ConfigError, DataError
from bids_app.labels import COHORT
from bids_app.maps import Maps
from bids_app.maps.folder import LearningStatus
from bids_app.maps.results import (
    cohort_metrics_tsv,
    describe_beside_baseline,
    format_tsv,
    proba_columns,
    read_baseline_metrics,
    write_split_summary,
)
from bids_app.metrics import (
    RECONSTRUCTION_METRICS,
    SMALL_GROUP_RULE,
    describe_positive_class,
    reconstruction_metrics_per_image,
)
from bids_app.prediction.files import write_group_outputs
from bids_app.prediction.leakage import (
    LabelCoincidence,
    LeakFinding,
    check_identity_leaks,
    check_leaks,
    enforce_no_leak,
    find_label_coincidences,
    training_checksums,
    write_leak_report,
)
from bids_app.prediction.voting import (
    VOTING_WEIGHTS_FILE,
    compute_voting_weights,
    images_without_voting,
    is_single_part,
    read_voting_weights,
    soft_vote,
    vote_validation,
)
from bids_app.tracking.mlflow import Tracker

if TYPE_CHECKING:
    import torch

    from bids_app.data.dataset import TensorDataset
    from bids_app.data.tables import GroupTable

log = logging.getLogger(__name__)

VALIDATION_GROUP = "validation"
TRAINING_GROUPS = frozenset({"train", VALIDATION_GROUP})  # parts of the training set: no leak check


# -- inference ------------------------------------------------------------------------------------------


def run_inference(
    model: torch.nn.Module, dataset: TensorDataset, task: Task, batch_size: int, *, channels_last: bool = False
) -> pd.DataFrame:
    """Predict every sample of ``dataset`` in order and return the part-level table.

    Args:
        model: a network on its device; classification outputs logits ``(B, K)``, regression ``(B,)`` or
            ``(B, 1)``, reconstruction an image shaped like its input ``(B, 1, *spatial)``.
        dataset: ``data.TensorDataset`` (items ``(x, y, index)``; ``sample_table`` maps ``index`` to
            ``participant_id``, ``session_id``, ``part_id``). A class index below 0 or a ``nan`` target marks
            an unlabelled image.
        task: how outputs are read.
        batch_size: samples per forward pass.
        channels_last: run in channels-last memory format (``runtime.batch_memory_format``): the model is
            converted in place and every batch on its device; the predictions agree within float tolerance.

    Returns:
        Part-level table (``voting`` module docstring); in reconstruction the columns ``mae``, ``rmse``,
        ``psnr``, ``ssim`` of each part replace the predictions.
    """
    import torch

    from bids_app.runtime import batch_memory_format, set_memory_format

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    memory_format = torch.preserve_format
    if channels_last and len(dataset):
        memory_format = batch_memory_format(len(dataset.sample_shape_of(0)) + 1, channels_last)
        set_memory_format(model, memory_format)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    indices: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y, index in loader:
                result = model(x.to(device=device, dtype=torch.float32, memory_format=memory_format)).float().cpu()
                if task is Task.CLASSIFICATION:
                    outputs.append(torch.softmax(result, dim=1).numpy().astype(np.float64))
                    labels.append(np.where(y.numpy() < 0, np.nan, y.numpy().astype(np.float64)))
                elif task is Task.REGRESSION:
                    outputs.append(result.reshape(len(x), -1)[:, :1].numpy().astype(np.float64))
                    labels.append(y.numpy().astype(np.float64).reshape(len(x)))
                else:
                    per_part = reconstruction_metrics_per_image(x.numpy(), result.numpy())
                    outputs.append(np.stack([per_part[name] for name in RECONSTRUCTION_METRICS], axis=1))
                    labels.append(np.full(len(x), np.nan))
                indices.append(np.asarray(index, dtype=np.int64))
    finally:
        model.train(was_training)
    order = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    samples = dataset.sample_table.iloc[order]
    table = pd.DataFrame(
        {
            **({COHORT: samples[COHORT].astype(str).to_numpy()} if COHORT in samples.columns else {}),
            "participant_id": samples["participant_id"].astype(str).to_numpy(),
            "session_id": samples["session_id"].astype(str).to_numpy(),
            "part_id": samples["part_id"].to_numpy(dtype=np.int64),
            "true_label": np.concatenate(labels) if labels else np.zeros(0),
        }
    )
    if task is Task.CLASSIFICATION:
        columns = proba_columns(outputs[0].shape[1] if outputs else 2)
    else:
        columns = ["predicted"] if task is Task.REGRESSION else list(RECONSTRUCTION_METRICS)
    stacked = np.concatenate(outputs) if outputs else np.zeros((0, len(columns)))
    for j, column in enumerate(columns):
        table[column] = stacked[:, j]
    if task is Task.CLASSIFICATION:
        table["predicted_label"] = stacked.argmax(axis=1)
    return table


# -- the stage ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Predictor:
    """What every group predicted in one run shares: the model folder, the options and the runtime.

    Attributes:
        maps: the opened model folder (its record gives task, mode and class order).
        options: prediction options (``allow_leak``, ``voting_threshold``, ``n_bootstrap``, ...).
        runtime: device, memory layout and inference batch size.
        train_table: the training pool with its checksums (``leakage.training_checksums``), for the leak checks.
        linear_baseline: merge the linear baseline's metrics of each group, when it predicted the same images, beside
            the network's (``maps.results.read_baseline_metrics``).
    """

    maps: Maps
    options: PredictConfig
    runtime: RuntimeConfig
    train_table: pd.DataFrame
    linear_baseline: bool = False

    def predict_group(
        self,
        model: torch.nn.Module,
        split: int,
        metric: str,
        group_name: str,
        table: GroupTable,
        dataset: TensorDataset,
        identity_findings: Sequence[LeakFinding] = (),
        coincidences: Sequence[LabelCoincidence] | None = None,
    ) -> None:
        """Predict one group with the model ``split-<k>/best-<metric>`` and write its TSVs (module docstring).

        Groups other than ``train`` and ``validation`` are first checked for leaks against the training pool;
        ``validation`` must be predicted before any other group of a split when the mode has several parts per
        image (it saves the voting weights).

        Args:
            model: the network of that split and metric, already on its device.
            split: split number ``k``.
            metric: which best model (``best-<metric>``).
            group_name: ``validation``, ``test`` or a user's group name (a folder name).
            table: one row per image: ``participant_id``, ``session_id``, ``source_sha256``,
                ``raw_source_sha256`` (``data.tables.index_tensors`` columns, optionally ``label``).
            dataset: the samples of ``table`` (``data.TensorDataset``, built without augmentation).
            identity_findings: this group's ``leakage.check_identity_leaks`` pairs, refused or recorded with the
                rest.
            coincidences: for a group from another output, its same-label pairs with training images of other
                datasets (``leakage.find_label_coincidences``): information written with every check made to
                ``leak_report.json`` (``leakage.write_leak_report``); None: no report (the split's own test).

        Raises:
            LeakError: the group shares participants or scans with training/validation and ``allow_leak`` is off.
            InputMissingError: the validation voting weights are missing.
            DataError: some image of ``table`` got no prediction.
        """
        layout, record, options = self.maps.layout, self.maps.record, self.options
        out_dir = layout.group_dir(split, metric, group_name)
        if group_name not in TRAINING_GROUPS:
            findings = [*check_leaks(self.maps, table, self.train_table), *identity_findings]
            if coincidences is not None:
                refused = bool(findings) and not options.allow_leak
                write_leak_report(
                    out_dir, group_name, findings, list(coincidences), table, self.train_table, refused=refused
                )
            enforce_no_leak(findings, group_name, options.allow_leak, out_dir)
        parts = run_inference(
            model, dataset, record.task, self.runtime.inference_batch_size, channels_last=self.runtime.channels_last
        )
        expected = set(zip(table["participant_id"].astype(str), table["session_id"].astype(str), strict=True))
        missing = sorted(expected - set(zip(parts["participant_id"], parts["session_id"], strict=True)))
        if missing:
            raise DataError(
                f"No prediction for {len(missing)} image(s) of group '{group_name}' (e.g. {missing[0]}): the "
                "dataset and the group table disagree. Rebuild the dataset from the group table."
            )
        task = record.task
        n_classes = sum(c.startswith("proba_") for c in parts.columns)
        names = self.maps.class_names
        if task is Task.CLASSIFICATION and len(names) != n_classes:
            raise DataError(
                f"The model of {layout.root} outputs {n_classes} classes but its label encoding has {names}."
            )
        weights_path = layout.best_dir(split, metric) / VOTING_WEIGHTS_FILE
        threshold, inverse_mae = options.voting_threshold, options.inverse_mae_voting
        if task is Task.RECONSTRUCTION or is_single_part(parts):
            image = images_without_voting(parts, task, n_classes)
        elif group_name == VALIDATION_GROUP:
            weights = compute_voting_weights(parts, task, n_classes, threshold, inverse_mae)
            atomic_write_text(weights_path, format_tsv(weights))
            kept = int(weights["weight"].gt(0).sum())
            log.info("Voting weights saved to %s (%d of %d parts kept)", weights_path, kept, len(weights))
            image = vote_validation(parts, task, n_classes, threshold, inverse_mae)
        else:
            image = soft_vote(parts, read_voting_weights(weights_path), task, n_classes)
        positive = record.config.labels.positive_class
        baseline = None
        if self.linear_baseline:
            baseline = read_baseline_metrics(layout.baseline_prediction_tsv(split, metric, group_name),
                                             layout.baseline_metrics_tsv(split, metric, group_name), image)  # fmt: skip
        warning = write_group_outputs(
            out_dir,
            group_name,
            dataset.mode.value,
            parts,
            image,
            task,
            names,
            options.n_bootstrap,
            positive,
            baseline,
            training_status=self.maps.learning_status(split),
        )
        if baseline is not None:
            beside = describe_beside_baseline(layout.metrics_tsv(split, metric, group_name), task)
            log.info("Group '%s' of split %d (best-%s): %s.", group_name, split, metric, beside)
        if warning is not None:
            log.warning("Group '%s' of split %d (best-%s): %s (rule: %s).", group_name, split, metric, warning,
                        SMALL_GROUP_RULE)  # fmt: skip
            if group_name == VALIDATION_GROUP:
                log.warning("Split %d: the epoch of best-%s was selected on this small validation group, so the "
                            "model selection itself is unreliable.", split, metric)  # fmt: skip
        log.info("Group '%s': %d image(s), %d part(s) predicted into %s", group_name, len(image), len(parts), out_dir)


def check_group_name(predict: PredictConfig) -> str:
    """The name of the group ``--predict-from`` predicts, checked to be usable as a folder name.

    Raises:
        ConfigError: no name, a reserved name (train, validation, test), or other characters than letters,
            digits and '-'.
    """
    name = predict.group_name or ""
    if not name or name in (*TRAINING_GROUPS, "test") or not name.replace("-", "").isalnum():
        raise ConfigError(
            f"--predict-from needs a --group-name made of letters, digits and '-', other than train, validation "
            f"and test (got {name!r})."
        )
    return name


def run_predict_stage(cfg: RunConfig, maps: Maps, table: GroupTable, tracker: Tracker | None = None) -> None:
    """Predict with every trained split and selection metric: validation first, then test or another group.

    Without ``cfg.predict.predict_from`` the groups are the split's ``validation`` and ``test``; with it, the
    ``validation`` group (for the voting weights) and ``cfg.predict.group_name`` (the other output's images),
    whose anatomical fingerprints are first compared with the training pool's (``leakage.check_identity_leaks``).

    Args:
        cfg: the run configuration (``cfg.predict``, ``cfg.runtime``, ``cfg.train.splits``).
        maps: the opened model folder; its record decides mode, task, labels and class order.
        table: labels joined with ``data.tables.index_tensors`` of OUTPUT_DIR for the model's mode.
        tracker: where each group's metrics are mirrored (``tracking.open_tracker``); default none.

    Raises:
        ConfigError: ``predict_from`` without ``group_name``, or a reserved group name.
        InputMissingError: no trained split.
    """
    from bids_app.data.dataset import TensorDataset
    from bids_app.data.tables import external_table, rows_for
    from bids_app.runtime import resolve_device

    tracker = tracker or Tracker()
    record = maps.record
    positive = record.config.labels.positive_class
    if cfg.labels.positive_class not in (None, positive):
        log.warning("--positive-class %s ignored: the model %s was trained with positive class %s, and its record "
                    "decides.", cfg.labels.positive_class, maps.name, positive or "(default)")  # fmt: skip
    if record.task is Task.CLASSIFICATION:
        log.info("Model %s: %s.", maps.name, describe_positive_class(maps.class_names, positive))
    trained = maps.trained_splits(cfg.train.splits)
    folds = {fold.index: fold for fold in maps.splits.folds}
    if cfg.predict.predict_from is None:
        other_name, other = "test", rows_for(maps.splits.test, table, "test group")
        if other.empty:
            log.warning("Model %s has no test set (--test-size 0): only its validation groups are predicted, and "
                        "their metrics are optimistic (the models were selected on them).", maps.name)  # fmt: skip
    else:
        other_name = check_group_name(cfg.predict)
        other = external_table(cfg.predict.predict_from, record.mode, record.config.labels, record.kinds)
    predictor = Predictor(
        maps, cfg.predict, cfg.runtime, training_checksums(maps, table), linear_baseline=cfg.train.linear_baseline
    )
    identity = [] if cfg.predict.predict_from is None else check_identity_leaks(maps, other, table, other_name)
    coincidences = None
    if cfg.predict.predict_from is not None:
        coincidences = find_label_coincidences(other, predictor.train_table)
        if coincidences:
            shown = ", ".join(dict.fromkeys(c.participant_id for c in coincidences[:50]))
            log.info("Group '%s': %d image(s) carry a participant label of the training pool from another dataset "
                     "(%s). A label names a person only inside its dataset, so these are not leaks; the checksum "
                     "and fingerprint checks cover the same scan or person. Listed in leak_report.json.",
                     other_name, len({(c.participant_id, c.session_id) for c in coincidences}),
                     shown)  # fmt: skip
    device = resolve_device(cfg.runtime.device)
    for split in trained:
        verdict = maps.learning(split)
        if verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN:
            log.warning("Split %d: predicting with a network that did not learn (training_status did-not-learn in "
                        "the metric TSVs): %s %s", split, verdict.reason, verdict.advice)  # fmt: skip
        validation = rows_for(folds[split].validation, table, "validation group")
        for metric in record.config.train.selection_metrics:
            model = maps.load_model(split, metric, device)
            for name, rows in ((VALIDATION_GROUP, validation), (other_name, other)):
                if rows.empty:
                    continue
                dataset = TensorDataset(rows, record.mode, record.task, label_encoding=record.label_encoding)
                findings = identity if name == other_name else ()
                notes = coincidences if name == other_name else None
                predictor.predict_group(model, split, metric, name, rows, dataset, findings, notes)
                tracker.log_group(split, metric, name)
    write_split_summaries(maps, (VALIDATION_GROUP, other_name))
    tracker.log_prediction_means()


def write_split_summaries(maps: Maps, groups: Sequence[str]) -> None:
    """With several trained splits, each group's and selection metric's metrics summarised across splits.

    Written to ``MapsLayout.split_summary_tsv`` (``maps.results.split_summary_table`` for the columns) from the
    metric TSVs of every trained split that has one.
    """
    layout, splits = maps.layout, maps.trained_splits()
    cohorts = [str(entry["name"]) for entry in maps.record.extra.get("cohorts") or []]
    for group in groups:
        for metric in maps.record.config.train.selection_metrics:
            path = layout.split_summary_tsv(group, metric)
            paths = {split: layout.metrics_tsv(split, metric, group) for split in splits}
            if write_split_summary(path, paths) is not None:
                log.info("Group '%s', best-%s: metrics across %d splits in %s", group, metric, len(splits), path)
            for cohort in cohorts:  # summary/<group>_cohort-<name>_best-<metric>_metrics_across_splits.tsv
                paths = {s: cohort_metrics_tsv(layout.group_dir(s, metric, group), group, cohort) for s in splits}
                write_split_summary(layout.split_summary_tsv(f"{group}_cohort-{cohort}", metric), paths)
