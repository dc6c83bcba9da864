"""Inference on a group of images, soft voting, and the prediction/metric TSVs (after the ``leakage`` check).

Outputs of ``predict_group`` under ``<maps>/split-<k>/best-<metric>/<group>/``:

- ``<group>_image_level_prediction.tsv``: ``participant_id``, ``session_id``, ``true_label`` (``n/a`` when
  unlabelled), ``predicted_label`` (class name or predicted value) and ``proba_<class>`` per class
  (classification); reconstruction: ``mae``, ``rmse``, ``psnr``, ``ssim`` instead (means over the parts);
- ``<group>_<mode>_level_prediction.tsv`` (patch, slice, roi): the same per part, with ``part_id``;
- ``<group>_image_level_metrics.tsv`` (labelled groups): ``metric``, ``value``, ``ci_low``, ``ci_high``
  (95 % percentile bootstrap over images, seeded);
- ``<group>_confusion_matrix.tsv`` (labelled classification): rows true class, columns predicted class;
- ``leak_warning.json`` when a leak was allowed with ``allow_leak`` (written by ``leakage.enforce_no_leak``).

Soft-voting weights (``voting.py``) are computed once per split and selection metric from the validation
group's part predictions, saved as ``split-<k>/best-<metric>/voting_weights.tsv`` and re-used for every other
group, which must therefore be predicted after ``validation``.

Every file is written atomically; floats are written with a fixed format, so the same model and data give
byte-identical files.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bids_app.config import PredictConfig, RunConfig, Task
from bids_app.derivatives import atomic_write_text
from bids_app.errors import ConfigError, DataError, InputMissingError
from bids_app.labels import NA as MISSING
from bids_app.leakage import LeakFinding, check_identity_leaks, check_leaks, enforce_no_leak, training_checksums
from bids_app.maps import MapsLayout, MapsRecord, load_model, read_maps_json
from bids_app.metrics import RECONSTRUCTION_METRICS, reconstruction_metrics_per_image
from bids_app.prediction_files import format_tsv, write_group_outputs
from bids_app.tracking import Tracker
from bids_app.voting import (
    VOTING_WEIGHTS_FILE,
    compute_voting_weights,
    images_without_voting,
    is_single_part,
    proba_columns,
    read_voting_weights,
    soft_vote,
    vote_validation,
)

if TYPE_CHECKING:
    import torch

    from bids_app.data import TensorDataset

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
        channels_last: run in channels-last memory format (``epoch.batch_memory_format``): the model is
            converted in place and every batch on its device; the predictions agree within float tolerance.

    Returns:
        Part-level table (``voting`` module docstring); in reconstruction the columns ``mae``, ``rmse``,
        ``psnr``, ``ssim`` of each part replace the predictions.
    """
    import torch

    from bids_app.epoch import batch_memory_format, set_memory_format

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


def read_class_names(maps_dir: Path) -> list[str]:
    """Class names by index from the MAPS' label encoding (``maps.json``)."""
    encoding = read_maps_json(maps_dir).label_encoding or {}
    return sorted(encoding, key=encoding.__getitem__)


def predict_group(
    maps_dir: Path,
    group_name: str,
    table: pd.DataFrame,
    dataset: TensorDataset,
    cfg: PredictConfig,
    task: Task,
    split: int,
    selection_metric: str,
    *,
    model: torch.nn.Module | None = None,
    class_names: Sequence[str] | None = None,
    train_table: pd.DataFrame | None = None,
    identity_findings: Sequence[LeakFinding] = (),
    channels_last: bool = False,
) -> None:
    """Predict one group with the best model of a split and write its TSVs (module docstring).

    Groups other than ``train`` and ``validation`` are first checked for leaks against
    ``groups/train+validation.tsv``; ``validation`` must be predicted before any other group of a split
    when the mode has several parts per image (it saves the voting weights).

    Args:
        maps_dir: the model folder ``OUTPUT_DIR/models/<name>``.
        group_name: ``validation``, ``test`` or a user's group name (a folder name).
        table: one row per image: ``participant_id``, ``session_id``, ``source_sha256``,
            ``raw_source_sha256`` (``tensor_index.index_tensors`` columns, optionally ``label``).
        dataset: the samples of ``table`` (``data.TensorDataset``, built without augmentation).
        cfg: prediction options (``allow_leak``, ``voting_threshold``, ``n_bootstrap``, ``batch_size``).
        task: the MAPS task.
        split: split number ``k``.
        selection_metric: which best model (``best-<metric>``).
        model: the network, already on its device; default ``maps.load_model(maps_dir, split, selection_metric)``.
        class_names: class index → name; default the MAPS' label encoding (classification only).
        train_table: training/validation images with checksums (``leakage.training_checksums``); default
            ``groups/train+validation.tsv``.
        identity_findings: this group's ``leakage.check_identity_leaks`` pairs, refused or recorded with the rest.
        channels_last: run the model in channels-last memory format (``run_inference``).

    Raises:
        LeakError: the group shares participants or scans with training/validation and ``allow_leak`` is off.
        InputMissingError: the model, the training table or the validation voting weights are missing.
        DataError: some image of ``table`` got no prediction.
    """
    out_dir = MapsLayout(maps_dir).group_dir(split, selection_metric, group_name)
    if group_name not in TRAINING_GROUPS:
        findings = [*check_leaks(maps_dir, table, train_table), *identity_findings]
        enforce_no_leak(findings, group_name, cfg.allow_leak, out_dir)
    if model is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(maps_dir, split, selection_metric, device)
    parts = run_inference(model, dataset, task, cfg.batch_size, channels_last=channels_last)
    expected = set(zip(table["participant_id"].astype(str), table["session_id"].astype(str), strict=True))
    missing = sorted(expected - set(zip(parts["participant_id"], parts["session_id"], strict=True)))
    if missing:
        raise DataError(
            f"No prediction for {len(missing)} image(s) of group '{group_name}' (e.g. {missing[0]}): the dataset "
            "and the group table disagree. Rebuild the dataset from the group table."
        )
    n_classes = sum(c.startswith("proba_") for c in parts.columns)
    if class_names is None:
        class_names = read_class_names(maps_dir) if task is Task.CLASSIFICATION else []
    names = list(class_names)
    if task is Task.CLASSIFICATION and len(names) != n_classes:
        raise DataError(f"The model of {maps_dir} outputs {n_classes} classes but its label encoding has {names}.")
    weights_path = MapsLayout(maps_dir).best_dir(split, selection_metric) / VOTING_WEIGHTS_FILE
    if task is Task.RECONSTRUCTION or is_single_part(parts):
        image = images_without_voting(parts, task, n_classes)
    elif group_name == VALIDATION_GROUP:
        weights = compute_voting_weights(parts, task, n_classes, cfg.voting_threshold, cfg.inverse_mae_voting)
        atomic_write_text(weights_path, format_tsv(weights))
        kept = int(weights["weight"].gt(0).sum())
        log.info("Voting weights saved to %s (%d of %d parts kept)", weights_path, kept, len(weights))
        image = vote_validation(parts, task, n_classes, cfg.voting_threshold, cfg.inverse_mae_voting)
    else:
        image = soft_vote(parts, read_voting_weights(weights_path), task, n_classes)
    write_group_outputs(out_dir, group_name, dataset.mode.value, parts, image, task, names, cfg.n_bootstrap)
    log.info("Group '%s': %d image(s), %d part(s) predicted into %s", group_name, len(image), len(parts), out_dir)


def _raw_dataset(output_dir: Path) -> Path | None:
    """The raw BIDS dataset a participant-level output links to (``DatasetLinks.raw``), if readable."""
    try:
        description = json.loads((output_dir / "dataset_description.json").read_text(encoding="utf-8"))
        link = str(description["DatasetLinks"]["raw"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(urllib.parse.urlparse(link).path) if link.startswith("file:") else output_dir / link
    return path.resolve() if path.is_dir() else None


def external_table(predict_from: Path, record: MapsRecord) -> pd.DataFrame:
    """Images of another participant-level output, labelled when its raw dataset's tables have the label.

    Returns:
        ``tensor_index.index_tensors`` rows plus ``label`` (``n/a`` for every image when no label can be read).

    Raises:
        InputMissingError: ``predict_from`` has no complete tensor of the MAPS' mode.
    """
    from bids_app.labels import load_labels
    from bids_app.tensor_index import index_tensors

    tensors = index_tensors(predict_from, record.mode)
    if tensors.empty:
        raise InputMissingError(
            f"No complete {record.mode.value} tensors in {predict_from}. Run the participant level on that dataset "
            f"with --modes {record.mode.value}."
        )
    raw_dir = _raw_dataset(predict_from)
    if raw_dir is not None:
        try:
            labels = load_labels(raw_dir, record.config.labels, sessions=tensors[["participant_id", "session_id"]])
            return tensors.merge(labels[["participant_id", "session_id", "label"]], how="left").fillna(
                {"label": MISSING}
            )
        except (InputMissingError, DataError) as exc:
            log.warning("Predicting %s without labels: %s", predict_from, exc)
    return tensors.assign(label=MISSING)


def run_predict_stage(cfg: RunConfig, maps_dir: Path, table: pd.DataFrame, tracker: Tracker | None = None) -> None:
    """Predict with every trained split and selection metric: validation first, then test or another group.

    Without ``cfg.predict.predict_from`` the groups are the split's ``validation`` and ``test``; with it, the
    ``validation`` group (for the voting weights) and ``cfg.predict.group_name`` (the other output's images),
    whose anatomical fingerprints are first compared with the training pool's (``leakage.check_identity_leaks``).

    Args:
        cfg: the run configuration (``cfg.predict``; ``cfg.train``'s ``splits``, ``device``, ``channels_last``).
        maps_dir: the MAPS folder.
        table: labels joined with ``tensor_index.index_tensors`` of OUTPUT_DIR (as for training).
        tracker: where each group's metrics are mirrored (``tracking.open_tracker``); default none.

    Raises:
        ConfigError: ``predict_from`` without ``group_name``, or a reserved group name.
        InputMissingError: no trained split.
    """
    from bids_app.data import TensorDataset
    from bids_app.epoch import resolve_device
    from bids_app.split_files import read_splits
    from bids_app.tensor_index import rows_for

    layout = MapsLayout(maps_dir)
    tracker = tracker or Tracker()
    record = read_maps_json(maps_dir)
    trained = [k for k in layout.trained_splits() if not cfg.train.splits or k in cfg.train.splits]
    if not trained:
        raise InputMissingError(f"No trained split in {maps_dir}. Run the group level with --stages train first.")
    splits = read_splits(layout.groups_dir)
    folds = {fold.index: fold for fold in splits.folds}
    if cfg.predict.predict_from is None:
        other_name, other = "test", rows_for(splits.test, table, "test group")
    else:
        other_name = cfg.predict.group_name or ""
        if not other_name or other_name in (*TRAINING_GROUPS, "test") or not other_name.replace("-", "").isalnum():
            raise ConfigError(
                f"--predict-from needs a --group-name made of letters, digits and '-', other than train, validation "
                f"and test (got {other_name!r})."
            )
        other = external_table(cfg.predict.predict_from, record)
    class_names = sorted(record.label_encoding or {}, key=(record.label_encoding or {}).__getitem__)
    train_table = training_checksums(maps_dir, table)
    identity = [] if cfg.predict.predict_from is None else check_identity_leaks(maps_dir, other, table, other_name)
    device = resolve_device(cfg.train.device)
    for split in trained:
        validation = rows_for(folds[split].validation, table, "validation group")
        for metric in record.config.train.selection_metrics:
            model = load_model(maps_dir, split, metric, device)
            for name, rows in ((VALIDATION_GROUP, validation), (other_name, other)):
                dataset = TensorDataset(rows, record.mode, record.task, label_encoding=record.label_encoding)
                predict_group(
                    maps_dir, name, rows, dataset, cfg.predict, record.task, split, metric,
                    model=model, class_names=class_names, train_table=train_table,
                    identity_findings=identity if name == other_name else (),
                    channels_last=cfg.train.channels_last,
                )  # fmt: skip
                tracker.log_group(split, metric, name)
    tracker.log_prediction_means()
