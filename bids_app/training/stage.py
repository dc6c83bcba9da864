"""The fit loop of one split: losses, optimisation, selection of best models, logs, checkpoints, resume.

Per epoch the training and validation losses are means over samples (the sum of per-sample losses divided by
the number of samples, never a mean of batch means), and the validation metrics are computed at the sample
level: per part (patch, slice, region) in part modes. Image-level soft voting belongs to prediction.

Everything random follows from ``RunConfig.seed`` and the split number: the initial weights, the sampling
order, the augmentation of every sample and the dropout masks. A run interrupted after an epoch and resumed
(``train.resume``) gives bitwise the same weights and ``training.tsv`` as an uninterrupted run on CPU.

Under torchrun every rank trains its shard with DDP and holds the same state; rank 0 alone writes (see
``bids_app.training.distributed``). With one process nothing differs from a run without torch.distributed.
"""

from __future__ import annotations

import logging
import math
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_app.config import ExtractionMode, RunConfig, Task
from bids_app.derivatives import atomic_write_json
from bids_app.errors import ConfigError, DataError
from bids_app.labels import image_names
from bids_app.maps import Maps, MapsLayout
from bids_app.maps.folder import LearningStatus, LearningVerdict
from bids_app.tracking.mlflow import Tracker

if TYPE_CHECKING:
    import pandas as pd

    from bids_app.data.dataset import TensorDataset
    from bids_app.data.tables import GroupTable
    from bids_app.maps.splits import Splits
    from bids_app.provenance import RunContext
    from bids_app.training.checkpoint import TrainingState
    from bids_app.training.loop import Loop

log = logging.getLogger(__name__)


def check_train_config(cfg: RunConfig) -> None:
    """Reject invalid training options before anything is written (ConfigError naming the option)."""
    from bids_app.data.augment import build_augmentation
    from bids_app.metrics import metric_names, positive_class_index
    from bids_app.runtime import autocast_dtype, resolve_device
    from bids_app.training.loop import LOSSES, OPTIMIZERS

    tc, task = cfg.train, cfg.labels.task
    if tc.optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer '{tc.optimizer}' in train.optimizer. Available: {', '.join(OPTIMIZERS)}.")
    if tc.loss is not None and tc.loss not in LOSSES[task]:
        raise ConfigError(
            f"Loss '{tc.loss}' does not apply to {task.value}. Available for {task.value}: {', '.join(LOSSES[task])}."
        )
    valid = metric_names(task)
    unknown = [m for m in tc.selection_metrics if m not in valid]
    if unknown or not tc.selection_metrics:
        raise ConfigError(
            f"Selection metric(s) {unknown or '(none)'} are not {task.value} metrics. Choose from: {', '.join(valid)}."
        )
    for name, value, low in (
        ("epochs", tc.epochs, 1),
        ("batch_size", tc.batch_size, 1),
        ("accumulation_steps", tc.accumulation_steps, 1),
        ("runtime.num_workers", cfg.runtime.num_workers, 0),
        ("runtime.inference_batch_size", cfg.runtime.inference_batch_size, 1),
    ):
        if value < low:
            raise ConfigError(f"{name if '.' in name else 'train.' + name} is {value}; use an integer >= {low}.")
    if task is Task.CLASSIFICATION and cfg.labels.classes and cfg.labels.positive_class is not None:
        positive_class_index(cfg.labels.classes, cfg.labels.positive_class)  # the classes are known without data
    autocast_dtype(resolve_device(cfg.runtime.device), cfg.runtime.amp)  # CUDA asked for but absent, or AMP on a CPU
    build_augmentation(tc.augmentations, tc.mode, cfg.extraction.slice_direction)
    if tc.transfer_from is not None and Maps.exists(tc.transfer_from):  # a missing source: levels' check says so
        from bids_app.training.transfer import check_source_channels

        check_source_channels(tc.transfer_from, tuple(tc.channels))


def prepare_maps(
    cfg: RunConfig,
    layout: MapsLayout,
    table: GroupTable,
    run: RunContext | None = None,
    excluded: pd.DataFrame | None = None,
) -> Maps:
    """Check the options against the data and create the model folder's record (kept on resume).

    ``excluded``: the sessions left out for lacking one of several channels (``data.tables.index_channels``);
    the new record lists them (``Maps.create``).

    Raises:
        ConfigError: an option is invalid, or a resume uses another model or class set than the MAPS.
        DataError: tensors of different shapes, or fewer than two classes in classification.
    """
    from bids_app.data.cohorts import describe_cohorts
    from bids_app.data.origin import read_settings
    from bids_app.data.tables import encode_labels, sample_shape
    from bids_app.models import check_compatibility
    from bids_app.training import transfer as transfer_source

    check_train_config(cfg)
    tc, task = cfg.train, cfg.labels.task
    input_shape = sample_shape(table, tc.mode)
    check_compatibility(tc.architecture, task, tc.mode, input_shape)
    encoding = (
        encode_labels(table["label"].astype(str).tolist(), cfg.labels.classes) if task is Task.CLASSIFICATION else None
    )
    if encoding is not None and len(encoding) < 2:
        raise DataError(f"Classification needs at least two classes; the labels hold {list(encoding)}.")
    if encoding is not None and cfg.labels.positive_class is not None:
        from bids_app.metrics import positive_class_index

        positive_class_index(list(encoding), cfg.labels.positive_class)  # ConfigError naming the classes
    extra: dict[str, Any] = {
        "input_shape": list(input_shape),
        "channels": list(tc.channels),  # the image kind of each input channel, in order
        # per dataset, what the participant level really did (template, crop, mode parameters, normalisation...)
        "participant_settings": read_settings(table),
        "n_outputs": len(encoding) if encoding else 1,
        "label_encoding": encoding,
        "selection_level": "image" if tc.mode is ExtractionMode.IMAGE else tc.mode.value,
        # What the models were trained and selected on: a later run notices when these tensors changed.
        "tensor_sha256": {
            name: sha for name, sha in zip(image_names(table), table["tensor_sha256"], strict=True) if sha
        },
    }
    cohorts = describe_cohorts(cfg, table, layout.home or layout.root)
    if cohorts:  # a multi-cohort model names what it was trained on; a single-cohort record is unchanged
        extra["cohorts"] = cohorts
    if tc.transfer_from is not None:
        extra["transfer_source"] = transfer_source.describe_source(tc.transfer_from, tc.n_unfrozen_layers, tc.channels)
    if tc.resume and Maps.exists(layout.root):
        maps = Maps.open(layout.root)
        record = maps.record
        stored = (record.architecture, record.input_shape, record.label_encoding, record.task)
        if stored != (tc.architecture, input_shape, encoding, task):
            raise ConfigError(
                f"Cannot resume {layout.root}: it holds {stored[0]} for {stored[3].value} on inputs {stored[1]} "
                f"with classes {stored[2]}, not {tc.architecture} on {input_shape} with {encoding}. Resume with the "
                "original options or train into a new --model-name."
            )
        if tuple(record.config.train.channels) != tuple(tc.channels):
            raise ConfigError(
                f"Cannot resume {layout.root}: its models read channels {' '.join(record.config.train.channels)}, "
                f"not {' '.join(tc.channels)}. Resume with --channels {' '.join(record.config.train.channels)} or "
                "train into a new --model-name."
            )
        return maps
    # the run that made the model (its id and command line), for the report and the card: in environment.json,
    # beside the machine and the versions, so that the model record stays the same bytes for the same seed and config
    training_run = {"run_id": run.run_id, "command": run.command} if run is not None else None
    several = len(tc.channels) > 1
    return Maps.create(layout.root, cfg, extra, training_run=training_run, excluded=excluded if several else None)


def run_train_stage(
    cfg: RunConfig,
    layout: MapsLayout,
    splits: Splits,
    table: GroupTable,
    tracker: Tracker | None = None,
    run: RunContext | None = None,
    excluded: pd.DataFrame | None = None,
) -> Maps:
    """Train every selected split of ``splits`` into the model folder (finished splits are skipped on resume).

    Args:
        cfg: the run configuration (``cfg.train`` above all).
        layout: the model folder ``OUTPUT_DIR/models/<name>``, its split written.
        splits: the subject-level splits (``maps.splits.read_splits``).
        table: labels joined with ``tensor_index.index_tensors`` (``participant_id``, ``session_id``, ``label``,
            ``tensor_path``, ``n_parts``, ...).
        tracker: where epochs and summaries are mirrored (``tracking.open_tracker``); default none.
        run: this invocation; its id and command line go into a new model's record (``training_run``).
        excluded: the sessions left out for lacking a channel, listed in a new model's folder.
    """
    from bids_app.data.tables import rows_for
    from bids_app.training import distributed

    prepared = distributed.on_main(prepare_maps, cfg, layout, table, run, excluded)
    maps = prepared or Maps.open(layout.root)  # the other ranks read the record once rank 0 wrote it
    folds = {fold.index: fold for fold in splits.folds}
    for split in cfg.train.splits or tuple(sorted(folds)):
        if split not in folds:
            raise ConfigError(
                f"Split {split} does not exist; {layout.groups_dir} holds splits {sorted(folds)}. Fix train.splits."
            )
        finished = layout.summary_json(split).is_file() and not layout.tmp_dir(split).exists()
        if cfg.train.resume and distributed.broadcast_flag(finished):
            log.info("Split %d already trained in %s; skipped (resume).", split, layout.split_dir(split))
            continue
        fold = folds[split]
        train_rows = rows_for(fold.train, table, "training set")
        validation_rows = rows_for(fold.validation, table, "validation set")
        train_split(maps, split, train_rows, validation_rows, cfg, tracker)
    return maps


def train_split(
    maps: Maps,
    split: int,
    train_table: GroupTable,
    val_table: GroupTable,
    cfg: RunConfig,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train split ``k`` and keep one best model per selection metric.

    Args:
        maps: the model folder, its record written (``prepare_maps``).
        split: split number ``k``.
        train_table, val_table: one row per image: ``participant_id``, ``session_id``, ``label``,
            ``tensor_path``, ``n_parts``.
        cfg: the run configuration.
        tracker: where epochs and the summary are mirrored; default none.

    Returns:
        The summary also written to ``split-<k>/training_logs/summary.json``: epochs run, early stop,
        best value and epoch per metric, sample counts, device, the SHA-256 of the final weights and, in
        classification and regression, whether the network learned (``learning``: ``diagnose_split``; a
        network that did not is also logged as a warning).

    Raises:
        TemporaryFailure: out of memory (lower ``--batch-size``).
        ConfigError, DataError: invalid options or data; a checkpoint of another configuration.
    """
    import torch

    from bids_app.data.augment import build_augmentation
    from bids_app.data.dataset import TensorDataset
    from bids_app.data.sampling import make_loader, mix_seed
    from bids_app.metrics import positive_class_index
    from bids_app.provenance import seed_everything
    from bids_app.runtime import autocast_dtype, batch_memory_format, resolve_device, set_memory_format
    from bids_app.training import distributed
    from bids_app.training import transfer as transfer_source
    from bids_app.training.checkpoint import (
        TrainingState,
        load_checkpoint,
        restore_checkpoint,
        state_sha256,
        training_config_hash,
    )
    from bids_app.training.loop import Loop, explain_training_error, make_optimizer, per_sample_loss

    tc, rt, task = cfg.train, cfg.runtime, cfg.labels.task
    tracker = tracker or Tracker()
    check_train_config(cfg)
    record, layout = maps.record, maps.layout
    for name, t in (("training", train_table), ("validation", val_table)):
        if t.empty:
            raise DataError(f"Split {split} has an empty {name} set. Check the split files in {layout.groups_dir}.")
    device = distributed.rank_device(resolve_device(rt.device))
    augment = build_augmentation(tc.augmentations, tc.mode, cfg.extraction.slice_direction)
    encoding = record.label_encoding
    train_ds = TensorDataset(
        train_table, tc.mode, task, label_encoding=encoding, augment=augment, cache=rt.cache_samples
    )
    val_ds = TensorDataset(val_table, tc.mode, task, label_encoding=encoding, cache=rt.cache_samples)
    for name, ds in (("training", train_ds), ("validation", val_ds)):
        targets = ds.sample_targets
        if targets is not None and (np.isnan(targets).any() if task is Task.REGRESSION else (targets < 0).any()):
            raise DataError(f"Split {split}: the {name} set has unlabelled images. Fix the label table.")
    config_hash = training_config_hash(cfg, split, train_table, val_table)
    checkpoint_path = layout.checkpoint_path(split)
    resuming = tc.resume and distributed.broadcast_flag(checkpoint_path.is_file())
    if not resuming and distributed.is_main():
        if tc.resume:
            log.warning("No checkpoint %s; split %d is trained from the start.", checkpoint_path, split)
        for stale in (layout.tmp_dir(split), layout.training_logs_dir(split), *layout.split_dir(split).glob("best-*")):
            shutil.rmtree(stale, ignore_errors=True)
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    try:  # torch.cuda.OutOfMemoryError is a RuntimeError
        seed_everything(mix_seed(cfg.seed, split, 0), deterministic=rt.deterministic)
        model = maps.build_model()
        if tc.transfer_from is not None:
            transfer_source.load_source_weights(model, tc.transfer_from, split, tc.n_unfrozen_layers)
        memory_format = batch_memory_format(len(record.input_shape) + 1, rt.channels_last)
        model = distributed.prepare_model(set_memory_format(model.to(device), memory_format), device)
        sampler_seed = mix_seed(cfg.seed, split, 1)
        rank, world_size = distributed.rank(), distributed.world_size()
        batch_size = distributed.per_rank_batch_size(tc.batch_size)
        train_loader = make_loader(
            train_ds,
            batch_size=batch_size,
            seed=sampler_seed,
            shuffle=True,
            class_weighted=tc.class_weighted_sampling,
            num_workers=rt.num_workers,
            device=device,
            rank=rank,
            world_size=world_size,
        )
        val_loader = make_loader(
            val_ds,
            batch_size=batch_size,
            seed=sampler_seed,
            num_workers=rt.num_workers,
            device=device,
            rank=rank,
            world_size=world_size,
        )
        loop = Loop(
            model=distributed.wrap_model(model, device),
            optimizer=make_optimizer(
                tc.optimizer, [p for p in model.parameters() if p.requires_grad], tc.learning_rate, tc.weight_decay
            ),
            scheduler=None,
            scaler=torch.amp.GradScaler(device.type, enabled=rt.amp and device.type == "cuda"),
            loss_fn=per_sample_loss(task, tc.loss),
            device=device,
            amp_dtype=autocast_dtype(device, rt.amp),
            accumulation_steps=tc.accumulation_steps,
            memory_format=memory_format,
            positive_class=positive_class_index(maps.class_names, cfg.labels.positive_class)
            if len(maps.class_names) == 2
            else 1,
        )
        if tc.lr_plateau_patience > 0:
            loop.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(loop.optimizer, patience=tc.lr_plateau_patience)
        state = TrainingState()
        if resuming:
            content = load_checkpoint(checkpoint_path, config_hash)
            state = restore_checkpoint(
                content,
                model=model,
                optimizer=loop.optimizer,
                scheduler=loop.scheduler,
                scaler=loop.scaler,
                loader_generator=train_loader.generator,
            )
            log.info("Split %d resumed after epoch %d from %s", split, state.epoch, checkpoint_path)
        tracker.start_split(split, {"n_train_images": train_ds.n_images, "n_validation_images": val_ds.n_images})
        _fit(layout, split, cfg, loop, (train_loader, val_loader), state, config_hash, tracker)
    except (RuntimeError, MemoryError) as exc:
        explained = explain_training_error(exc, split, device, tc.batch_size)
        if explained is None:
            raise
        raise explained from exc
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
    summary = {
        "split": split,
        "epochs_completed": state.epoch + 1,
        "stopped_early": state.stopped,
        "best": {metric: {"value": value, "epoch": epoch} for metric, (value, epoch) in state.best.items()},
        "n_train_images": train_ds.n_images,
        "n_train_samples": len(train_ds),
        "n_validation_images": val_ds.n_images,
        "n_validation_samples": len(val_ds),
        "device": str(device),
        "final_weights_sha256": state_sha256(model),
    }
    if world_size > 1:
        summary.update(n_processes=world_size, batch_size_per_process=batch_size)
    verdict = diagnose_split(task, cfg, state, train_ds, val_ds)
    if verdict is not None:
        summary["learning"] = verdict.to_json()
    if distributed.is_main():
        if verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN:
            log.warning("Split %d: the network did not learn: %s %s", split, verdict.reason, verdict.advice)
        atomic_write_json(layout.summary_json(split), summary)
        shutil.rmtree(layout.tmp_dir(split), ignore_errors=True)
        tracker.end_split(split, summary)
    log.info("Split %d trained: best %s", split, {m: v for m, (v, _) in state.best.items()})
    return summary


def diagnose_split(
    task: Task, cfg: RunConfig, state: TrainingState, train_ds: TensorDataset, val_ds: TensorDataset
) -> LearningVerdict | None:
    """Whether the split's network learned (``training.learning``), from its epochs and its datasets' targets.

    The training chance level is that of the training samples the sampler draws (``--class-weighted-sampling``
    balances the classes); the validation one is the loss of the best constant for the validation targets
    themselves (their class frequencies, their mean), a reference no network can beat without information from
    the images. The selected models are those kept in ``state.best``. None for reconstruction.
    """
    from bids_app.training.learning import chance_loss, diagnose_learning

    train_targets, val_targets = train_ds.sample_targets, val_ds.sample_targets
    if task is Task.RECONSTRUCTION or train_targets is None or val_targets is None:
        return None
    loss = cfg.train.loss
    return diagnose_learning(
        task,
        state.history,
        chance_loss(task, loss, train_targets, class_weighted=cfg.train.class_weighted_sampling),
        {metric: epoch for metric, (_, epoch) in state.best.items()},
        validation_chance=chance_loss(task, loss, val_targets),
        n_validation_classes=len(np.unique(val_targets)),
        target_sd=float(np.std(train_targets)) if task is Task.REGRESSION else float("nan"),
    )


def _fit(
    layout: MapsLayout,
    split: int,
    cfg: RunConfig,
    loop: Loop,
    loaders: tuple[Any, Any],
    state: TrainingState,
    config_hash: str,
    tracker: Tracker,
) -> None:
    """Epochs ``state.epoch + 1 .. epochs - 1``: train, validate, log, keep best models, early-stop, checkpoint."""
    from tqdm import tqdm

    from bids_app.data.sampling import mix_seed
    from bids_app.maps import weights
    from bids_app.training import checkpoint, distributed
    from bids_app.training.history import EpochLog
    from bids_app.training.loop import train_epoch, validate

    tc = cfg.train
    train_loader, val_loader = loaders
    start = state.epoch + 1
    main, net = distributed.is_main(), distributed.unwrap(loop.model)
    epoch_log = EpochLog(layout, split, start, tracker, main=main)
    epochs = tqdm(range(start, tc.epochs), desc=f"split {split}", initial=start, total=tc.epochs, disable=None)
    try:
        for epoch in epochs:
            if state.stopped:
                break
            train_loader.sampler.set_epoch(epoch)
            if distributed.world_size() > 1:  # per rank and epoch: a resume needs no other rank's random state
                distributed.reseed_rank(mix_seed(cfg.seed, split, 3, epoch, distributed.rank()))
            learning_rate = float(loop.optimizer.param_groups[0]["lr"])
            train_loss = train_epoch(loop, train_loader, f"epoch {epoch} train")
            distributed.broadcast_buffers(loop.model)
            scores = validate(loop, val_loader, cfg.labels.task, f"epoch {epoch} validation")
            if loop.scheduler is not None and math.isfinite(scores["loss"]):
                loop.scheduler.step(scores["loss"])
            row = {
                "epoch": epoch,
                "learning_rate": learning_rate,
                "train_loss": train_loss,
                **{f"validation_{name}": value for name, value in scores.items()},
            }
            state.history.append(row)
            epoch_log.add(state.history)  # rank 0 records; every rank keeps the same state
            for metric in tc.selection_metrics:
                value = scores[metric]
                if state.improves(metric, value):
                    if main:
                        weights.save_model(layout.model_path(split, metric), net)
                        atomic_write_json(
                            layout.selection_json(split, metric),
                            {"metric": metric, "value": value, "epoch": epoch, "split": split},
                        )
                    state.best[metric] = (value, epoch)
            if tc.early_stopping_patience > 0:
                state.update_early_stopping(scores["loss"], tc.early_stopping_patience, tc.early_stopping_tolerance)
            state.epoch = epoch
            if main:
                checkpoint.save_checkpoint(
                    layout.checkpoint_path(split),
                    model=net,
                    optimizer=loop.optimizer,
                    scheduler=loop.scheduler,
                    scaler=loop.scaler,
                    loader_generator=train_loader.generator,
                    state=state,
                    config_hash=config_hash,
                )
            log.info(
                "Split %d epoch %d: train loss %.5g, validation loss %.5g", split, epoch, train_loss, scores["loss"]
            )
            if state.stopped:
                log.info(
                    "Split %d: early stopping after epoch %d (no improvement for %d epochs).",
                    split,
                    epoch,
                    tc.early_stopping_patience,
                )
    finally:
        epochs.close()
        epoch_log.close()
