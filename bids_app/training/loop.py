"""One epoch of training or validation: per-sample losses, accumulation, AMP, memory format, sample-level metrics.

Losses are reported as means over samples: the per-sample losses of every batch are summed and divided by
the number of samples, so a smaller last batch weighs exactly its share (a mean of batch means would not).
A batch with a non-finite (NaN, infinite) per-sample loss stops the epoch with a ``DataError`` naming its
images, before the optimizer steps: one NaN tensor would otherwise turn every weight into NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bids_app.config import Task
from bids_app.errors import ConfigError, DataError, TemporaryFailure
from bids_app.labels import NO_SESSION
from bids_app.training.learning import PREDICTED_CLASSES, PREDICTION_SD

LOSSES: dict[Task, tuple[str, ...]] = {  # the first is the task's default
    Task.CLASSIFICATION: ("cross_entropy",),
    Task.REGRESSION: ("mse", "l1", "huber"),
    Task.RECONSTRUCTION: ("mse", "l1"),
}

OPTIMIZERS = ("adam", "adamw", "sgd")
SGD_MOMENTUM = 0.9
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def explain_training_error(
    exc: RuntimeError | MemoryError, split: int, device: torch.device, batch_size: int
) -> TemporaryFailure | ConfigError | None:
    """The expected failure a training error stands for (out of memory, no deterministic kernel), else None."""
    message = str(exc).lower()
    out_of_memory = ("out of memory", "can't allocate memory", "cannot allocate memory")
    if isinstance(exc, MemoryError | torch.OutOfMemoryError) or any(text in message for text in out_of_memory):
        return TemporaryFailure(
            f"Out of memory training split {split} on {device} with batch size {batch_size}. Lower --batch-size "
            f"(e.g. to {max(1, batch_size // 2)}; train.accumulation_steps keeps the effective batch) and retry "
            "with --resume."
        )
    if "deterministic" in str(exc):
        return ConfigError(f"{str(exc).splitlines()[0]} Turn off --deterministic or train on CPU (--device cpu).")
    return None


def make_optimizer(
    name: str, parameters: list[nn.Parameter], learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum ``SGD_MOMENTUM``) over ``parameters``; ConfigError for another name."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, weight_decay=weight_decay, momentum=SGD_MOMENTUM)
    raise ConfigError(f"Unknown optimizer '{name}'. Available: {', '.join(OPTIMIZERS)}.")


def per_sample_loss(task: Task, name: str | None) -> LossFn:
    """``loss(output, target) -> (B,)``, one value per sample (reconstruction: the mean over voxels).

    Args:
        task: classification takes logits ``(B, K)`` and class indices ``(B,)``; regression outputs
            ``(B, 1)`` and targets ``(B,)``; reconstruction an output shaped like its target ``(B, C, ...)``.
        name: one of ``LOSSES[task]``; None is the task's default.
    """
    name = name or LOSSES[task][0]
    if task is Task.CLASSIFICATION:
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    if task is Task.REGRESSION:
        regressions: dict[str, Callable[..., torch.Tensor]] = {
            "mse": F.mse_loss,
            "l1": F.l1_loss,
            "huber": F.huber_loss,
        }
        regression = regressions[name]
        return lambda out, y: regression(out.reshape(len(y), -1)[:, 0], y, reduction="none")
    reconstructions: dict[str, Callable[..., torch.Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}
    reconstruction = reconstructions[name]
    return lambda out, y: reconstruction(out, y, reduction="none").flatten(1).mean(dim=1)


@dataclasses.dataclass
class Loop:
    """The torch objects one split's training works with.

    Attributes:
        positive_class: the class index that sensitivity, specificity, PPV and NPV of validation refer to
            (``labels.positive_class``), so a model selected on them is selected for that class.
        amp_dtype: autocast dtype (float16 on CUDA) or None without AMP.
        accumulation_steps: batches whose gradients are summed before one optimizer step.
        memory_format: the layout of input batches on the device, that of the model's weights
            (``batch_memory_format``); ``torch.preserve_format`` leaves batches as the loader gives them.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    scaler: torch.amp.GradScaler
    loss_fn: LossFn
    device: torch.device
    amp_dtype: torch.dtype | None
    accumulation_steps: int = 1
    memory_format: torch.memory_format = torch.preserve_format
    positive_class: int = 1  # binary classification: index of the class of sensitivity, specificity, PPV, NPV

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def _progress(loader: DataLoader[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, disable=None, unit="batch")


def train_epoch(loop: Loop, loader: DataLoader[Any], desc: str = "train") -> float:
    """One pass over ``loader`` updating the model; returns the mean per-sample training loss.

    The optimizer steps every ``accumulation_steps`` batches and after the last batch; each batch's loss
    is scaled by ``1 / accumulation_steps`` so an accumulated step matches one larger batch.

    In a process group ``loop.model`` is a ``DistributedDataParallel`` whose gradients are averaged over ranks
    at each optimizer step only (micro-batches in between run under ``no_sync``); the returned loss is the
    global per-sample mean (sums and counts all-reduced), the padding items of the sampler left out.

    Raises:
        DataError: a sample's loss is not finite (see ``stop_on_non_finite``); on every rank of a process group.
    """
    from bids_app.training import distributed

    loop.model.train()
    loop.optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    sharded = distributed.world_size() > 1
    n_samples = len(loader.dataset)  # type: ignore[arg-type]
    n_real = distributed.real_sample_count(n_samples, distributed.rank(), distributed.world_size())
    total, count, seen = 0.0, 0, 0
    for step, (x, y, index) in enumerate(_progress(loader, desc)):
        x = x.to(loop.device, non_blocking=True, memory_format=loop.memory_format)
        y = y.to(loop.device, non_blocking=True)
        stepping = (step + 1) % loop.accumulation_steps == 0 or step + 1 == n_batches
        with contextlib.nullcontext() if stepping or not sharded else loop.model.no_sync():  # type: ignore[operator]
            with loop.autocast():
                out = loop.model(x)
            losses = loop.loss_fn(out.float(), y)
            loop.scaler.scale(losses.mean() / loop.accumulation_steps).backward()
        if sharded:
            keep = max(0, min(len(x), n_real - seen))
            seen += len(x)
            total += float(losses.detach()[:keep].double().sum())
            count += keep
            finite = bool(torch.isfinite(losses.detach()).all())  # padding items too: every rank checks its batch
        else:
            batch_total = float(losses.detach().double().sum())
            total += batch_total
            count += len(x)
            finite = math.isfinite(batch_total)  # NaN or infinite iff a sample's loss is
        stop_on_non_finite(finite, losses, x, index, loader.dataset, "training", desc)
        if stepping:
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            loop.optimizer.zero_grad(set_to_none=True)
    if sharded:
        total, summed = distributed.all_reduce_sums([total, count])
        count = int(summed)
    return total / count if count else float("nan")


def validate(loop: Loop, loader: DataLoader[Any], task: Task, desc: str = "validation") -> dict[str, float]:
    """Mean per-sample loss and the task's metrics over every sample of ``loader`` (part level).

    In a process group each rank validates its shard; the per-sample outputs of all ranks are gathered, the
    sampler's padding duplicates dropped and the rows put back in sample order, so every rank returns the
    metrics of the whole validation set (what one process would compute with the same weights).

    Returns:
        ``{"loss": ..., <metric>: ...}`` with the names of ``metrics.metric_names(task)`` (``roc_auc`` in
        classification, computed from the softmax scores), and what ``training.learning`` reads to tell a
        collapsed model: ``n_predicted_classes`` (classes predicted for at least one sample; classification) or
        ``prediction_sd`` (standard deviation of the predictions; regression).

    Raises:
        DataError: a sample's loss is not finite (see ``stop_on_non_finite``); on every rank of a process group.
    """
    from bids_app.metrics import compute_metrics, mean_of_columns, reconstruction_metrics_per_image
    from bids_app.training import distributed

    sharded = distributed.world_size() > 1
    loop.model.eval()
    total, count = 0.0, 0
    truths: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    per_image: dict[str, list[np.ndarray]] = {}
    indices: list[np.ndarray] = []
    sample_losses: list[np.ndarray] = []
    with torch.inference_mode():
        for x, y, index in _progress(loader, desc):
            x = x.to(loop.device, non_blocking=True, memory_format=loop.memory_format)
            y = y.to(loop.device, non_blocking=True)
            with loop.autocast():
                out = loop.model(x)
            out = out.float()
            losses = loop.loss_fn(out, y)
            batch_total = float(losses.double().sum())
            total += batch_total
            count += len(x)
            finite = math.isfinite(batch_total) if not sharded else bool(torch.isfinite(losses).all())
            stop_on_non_finite(finite, losses, x, index, loader.dataset, "validation", desc)
            if sharded:
                indices.append(np.asarray(index, dtype=np.float64))
                sample_losses.append(losses.double().cpu().numpy())
            if task is Task.CLASSIFICATION:
                outputs.append(torch.softmax(out, dim=1).cpu().numpy().astype(np.float64))
                truths.append(y.cpu().numpy())
            elif task is Task.REGRESSION:
                outputs.append(out.reshape(len(x), -1)[:, 0].cpu().numpy().astype(np.float64))
                truths.append(y.cpu().numpy().astype(np.float64))
            else:
                for name, values in reconstruction_metrics_per_image(y.cpu().numpy(), out.cpu().numpy()).items():
                    per_image.setdefault(name, []).append(values)
    if sharded:
        columns = {"index": indices, "loss": sample_losses, "truth": truths, "output": outputs, **per_image}
        merged = _gather_samples({name: v for name, v in columns.items() if v})
        total, count = float(merged["loss"].sum()), len(merged["loss"])
        truths = [merged["truth"].astype(np.int64 if task is Task.CLASSIFICATION else np.float64)] if truths else []
        outputs = [merged["output"]] if outputs else []
        per_image = {name: [merged[name]] for name in per_image}
    result = {"loss": total / count if count else float("nan")}
    if task is Task.CLASSIFICATION:
        scores = np.concatenate(outputs)
        result.update(
            compute_metrics(
                task, np.concatenate(truths), scores.argmax(axis=1), y_score=scores, positive_class=loop.positive_class
            )
        )
        result[PREDICTED_CLASSES] = float(np.unique(scores.argmax(axis=1)).size)
    elif task is Task.REGRESSION:
        predictions = np.concatenate(outputs)
        result.update(compute_metrics(task, np.concatenate(truths), predictions))
        result[PREDICTION_SD] = float(predictions.std())
    else:
        result.update(mean_of_columns(**{name: np.concatenate(v) for name, v in per_image.items()}))
    return result


def stop_on_non_finite(
    finite: bool, losses: torch.Tensor, x: torch.Tensor, index: torch.Tensor, dataset: Any, phase: str, desc: str
) -> None:
    """Raise a ``DataError`` naming the images of the samples whose loss is not finite, on every rank.

    In a process group the ranks agree first (one all-reduced flag per batch), so a NaN on one rank stops them
    all at the same batch instead of leaving the others waiting in the next collective; the offending samples
    of every rank are gathered, so every rank raises the same message.

    Args:
        finite: whether every loss of this rank's batch is finite.
        losses: this rank's per-sample losses ``(B,)``.
        x: this rank's inputs ``(B, C, ...)``: an input holding NaN or Inf is named as the cause.
        index: sample numbers ``(B,)`` of ``dataset`` (a ``data.dataset.TensorDataset``).
        dataset: names the samples (``sample_table``, ``sample_tensor_path``).
        phase, desc: ``training`` or ``validation``, and where (the progress bar's ``epoch 3 train``).
    """
    from bids_app.training import distributed

    if distributed.world_size() > 1:
        finite = distributed.all_reduce_sums([0.0 if finite else 1.0])[0] == 0.0
    if finite:
        return
    with torch.no_grad():
        flat = x.detach().reshape(len(x), -1)
        columns = (
            torch.as_tensor(index).reshape(-1).double().cpu(),
            torch.isnan(flat).any(dim=1).double().cpu(),
            torch.isinf(flat).any(dim=1).double().cpu(),
            torch.isnan(losses.detach()).double().cpu(),
        )
        bad = ~torch.isfinite(losses.detach()).cpu()
        rows = torch.stack(columns, dim=1)[bad].numpy()
    raise non_finite_error(distributed.gather_rows(rows), dataset, f"{phase} loss", desc)


def non_finite_error(rows: np.ndarray, dataset: Any, what: str, desc: str) -> DataError:
    """The message for samples with a non-finite loss.

    Args:
        rows: ``(n, 4)``: sample number, input holds NaN, input holds Inf, loss is NaN (else infinite).
        dataset: ``sample_table`` (participant_id, session_id) and ``sample_tensor_path`` name the samples.
        what, desc: the loss (``training loss``) and where (``epoch 3 train``).
    """
    kind = "NaN" if rows[:, 3].any() else "infinite"
    causes = rows[(rows[:, 1] > 0) | (rows[:, 2] > 0)]
    images: dict[str, str] = {}
    labels: dict[str, None] = {}
    for number, nan, inf, _ in causes if len(causes) else rows:
        sample = dataset.sample_table.iloc[int(number)]
        session = "" if sample["session_id"] == NO_SESSION else f" {sample['session_id']}"
        name = f"{sample['participant_id']}{session} ({dataset.sample_tensor_path(int(number))})"
        images[name] = " and ".join(value for value, flag in (("NaN", nan), ("Inf", inf)) if flag)
        labels[str(sample["participant_id"]).removeprefix("sub-")] = None
    named = "; ".join(f"{name}: {held}" if held else name for name, held in list(images.items())[:5])
    more = f"; and {len(images) - 5} more" if len(images) > 5 else ""
    if len(causes):
        return DataError(
            f"Non-finite {what} ({kind}) at {desc}: the tensors of {len(images)} image(s) hold NaN or Inf values: "
            f"{named}{more}. Check those images (an empty or constant image gives NaN once normalised), then "
            f"extract them again with the participant level and --overwrite --participant-label "
            f"{' '.join(labels)}, or leave them out of the label table and re-split."
        )
    return DataError(
        f"Non-finite {what} ({kind}) at {desc} for {len(images)} image(s) whose tensors are finite: {named}{more}. "
        "Training diverged: lower --learning-rate, train without --amp, or check the labels."
    )


def _gather_samples(columns: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Every rank's per-sample columns, one row per distinct ``index`` in index order (padding dropped).

    Args:
        columns: name → per-batch arrays ``(B,)`` or ``(B, K)``; ``index`` holds the sample numbers.
    """
    from bids_app.training import distributed

    blocks = {name: np.concatenate(parts).reshape(sum(len(p) for p in parts), -1) for name, parts in columns.items()}
    widths = {name: block.shape[1] for name, block in blocks.items()}
    rows = distributed.gather_rows(np.concatenate([blocks[name].astype(np.float64) for name in blocks], axis=1))
    _, first = np.unique(rows[:, 0], return_index=True)  # sorted by sample index; duplicates are padding
    rows = rows[first]
    merged, start = {}, 0
    for name, width in widths.items():
        block = rows[:, start : start + width]
        merged[name] = block[:, 0] if width == 1 and columns[name][0].ndim == 1 else block
        start += width
    return merged
