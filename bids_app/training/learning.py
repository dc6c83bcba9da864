"""Did the network learn? A verdict per split from its training curve and its validation predictions.

A network that never leaves chance level looks, in the metric files, like a model that learned something
weak: a balanced accuracy of 0.50 with a narrow interval. This module says which it is, right after a split's
training (``training.stage.train_split``), from two things the training already records:

1. **The training loss against its chance level** (``chance_loss``): the mean training loss of the best
   constant prediction, the one a network reaches by learning nothing about the images:

   - classification (cross-entropy): the entropy of the class frequencies the sampler draws, i.e. of the
     training samples' classes, or ``ln(n_classes)`` with ``--class-weighted-sampling`` (classes drawn
     equally often). With balanced classes both are ``ln(n_classes)`` (0.693 for two);
   - regression: the loss of predicting the best constant: the variance of the training targets (``mse``),
     their mean absolute deviation from the median (``l1``), the minimum over constants (``huber``); a
     relative drop below it is the training R² (``mse``).

   The verdict reads the largest relative drop ``(chance - loss) / chance`` of the running mean of
   ``SMOOTHING_EPOCHS`` epochs of training loss (``train_loss_drop``). The network *did not fit* when that
   drop stays below ``MIN_TRAIN_DROP`` (10 %): its training loss never fell clearly below chance and stayed
   within a few % of it (or above it) to the end.

2. **The selected models' validation predictions** (the ``validation_n_predicted_classes`` and
   ``validation_prediction_sd`` columns of ``training.tsv``, at the epoch each ``best-<metric>`` model was
   kept): a classifier that predicts one class for every validation sample although the validation set holds
   several (*collapse*), or a regressor whose predictions vary by less than ``MIN_PREDICTION_SD`` (5 %) of
   the training targets' standard deviation, did not learn either, whatever its training loss.

Either finding gives ``did-not-learn``, with the reason (the figures) and the advice (likely causes, what to
try); otherwise ``learned``. Reconstruction (autoencoders) gets no verdict.

Where the thresholds come from (``benchmarks/bench_learning_alarm.py``: the tiny generated cohort, 16
participants, two splits of 8 training and 8 validation images, ``conv5_fc3``, batch 4, 20 epochs; the same
images with random labels; see docs/reliability.md for the table): networks that did not fit (learning rate
0.003, real or random labels) have single-epoch training losses up to 6 % below ln 2, their 3-epoch running
mean less than 3 % below; networks that fit (learning rate 1e-4) reach 23-42 % below. 10 % separates the
two with room on both sides. Random labels at 1e-4 are fitted on training (memorised: 23-34 % below) but the
selected models predict one class on validation: the collapse check is what catches them. The collapse check
is done here, once, on the validation samples of the epoch each model was selected at, rather than at
prediction time, so that ``summary.json``, the log and every group's ``training_status`` say the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bids_app.config import Task
from bids_app.maps.folder import LearningStatus, LearningVerdict

SMOOTHING_EPOCHS = 3  # running mean of the training loss: one lucky epoch of a tiny training set is not learning
MIN_TRAIN_DROP = 0.10  # relative drop below the chance-level loss that counts as having fitted the training set
MIN_PREDICTION_SD = 0.05  # regression: validation predictions' sd below this share of the targets' sd = constant

PREDICTED_CLASSES = "n_predicted_classes"  # validate()'s name; training.tsv: validation_n_predicted_classes
PREDICTION_SD = "prediction_sd"

ADVICE_NOT_FITTED = (
    "Likely causes: a learning rate too high (a noisy or rising training loss: lower --learning-rate, e.g. 1e-4 "
    "or ten times lower) or too low for the number of epochs (a flat loss: raise it or train more --epochs); "
    "batch norm with tiny batches (use a --batch-size of 8 or more); intensities that hardly vary inside the "
    "inputs (check the participant level's normalisation); labels that do not match the images (check the label "
    "column). Compare with the linear baseline on the same splits: if it is at chance too, the tensors may not "
    "hold the signal."
)
ADVICE_COLLAPSED = (
    "Likely causes: unbalanced classes (try --class-weighted-sampling), a learning rate too high (lower "
    "--learning-rate) or too few --epochs for the network to leave the majority class, batch norm with tiny "
    "batches (--batch-size 8 or more), labels that do not match the images (check the label column). Compare "
    "with the linear baseline on the same splits: if it is at chance too, the tensors may not hold the signal."
)
ADVICE_CONSTANT = (
    "Likely causes: targets on a large scale with a learning rate too low or too few --epochs (the network "
    "first has to learn their mean), a learning rate too high, batch norm with tiny batches (--batch-size 8 or "
    "more), or targets that do not depend on the images (check the label column). Compare with the linear "
    "baseline on the same splits."
)


def chance_loss(task: Task, loss: str | None, targets: np.ndarray, *, class_weighted: bool = False) -> float | None:
    """The mean training loss of the best constant prediction: what a network that learned nothing reaches.

    Args:
        task: classification or regression (reconstruction: None).
        loss: the loss name (``training.loop.LOSSES``; None is the task's default: cross-entropy or ``mse``).
        targets: one per training sample: class indices ``(n,)`` or target values ``(n,)``.
        class_weighted: classes are drawn equally often (``--class-weighted-sampling``).

    Returns:
        In nats for cross-entropy, in squared target units for ``mse``, target units for ``l1`` and ``huber``;
        None for reconstruction or without targets.
    """
    values = np.asarray(targets)
    if task is Task.RECONSTRUCTION or values.size == 0:
        return None
    if task is Task.CLASSIFICATION:
        counts = np.bincount(values.astype(np.int64))
        counts = counts[counts > 0]
        if class_weighted:
            return math.log(len(counts))
        frequencies = counts / counts.sum()
        return float(-(frequencies * np.log(frequencies)).sum())
    y = values.astype(np.float64)
    if loss in (None, "mse"):
        return float(y.var())
    if loss == "l1":
        return float(np.abs(y - np.median(y)).mean())
    return float(min(_huber(y, c) for c in np.linspace(y.min(), y.max(), 513)))


def _huber(y: np.ndarray, constant: float, delta: float = 1.0) -> float:
    """Mean Huber loss (torch's ``huber_loss``, ``delta`` 1) of predicting ``constant`` for every ``y``."""
    error = np.abs(y - constant)
    return float(np.where(error < delta, 0.5 * error**2, delta * (error - 0.5 * delta)).mean())


def train_loss_drop(train_losses: Sequence[float], chance: float) -> float:
    """The largest relative drop ``(chance - loss) / chance`` of the running mean of the training loss.

    The running mean covers ``SMOOTHING_EPOCHS`` epochs (fewer when fewer ran); negative when the loss stayed
    above chance. ``nan`` without a finite loss or with a chance level of 0.
    """
    losses = np.asarray(train_losses, dtype=np.float64)
    if losses.size == 0 or not np.isfinite(losses).all() or chance <= 0:
        return math.nan
    width = min(SMOOTHING_EPOCHS, losses.size)
    smoothed = np.convolve(losses, np.ones(width) / width, mode="valid")
    return float(((chance - smoothed) / chance).max())


def diagnose_learning(
    task: Task,
    history: Sequence[Mapping[str, Any]],
    chance: float | None,
    selected_epochs: Mapping[str, int],
    *,
    n_validation_classes: int = 2,
    target_sd: float = math.nan,
) -> LearningVerdict | None:
    """Whether one split's network learned (module docstring for the rules and thresholds).

    Args:
        task: the model's task; reconstruction gets no verdict.
        history: the rows of ``training.tsv`` (``epoch``, ``train_loss``, and ``validation_n_predicted_classes``
            in classification or ``validation_prediction_sd`` in regression when recorded).
        chance: ``chance_loss`` of the training set.
        selected_epochs: selection metric → epoch of its ``best-<metric>`` model.
        n_validation_classes: classes present among the validation samples; a one-class prediction of a
            one-class validation set is no collapse.
        target_sd: standard deviation of the training targets (regression).

    Returns:
        The verdict, or None for reconstruction, without history or without a chance level.
    """
    if task is Task.RECONSTRUCTION or not history or chance is None:
        return None
    losses = [float(row["train_loss"]) for row in history]
    drop = train_loss_drop(losses, chance)
    chance_name = {
        Task.CLASSIFICATION: "the loss of always predicting the training class frequencies",
        Task.REGRESSION: "the loss of always predicting the best constant (training R² near 0)",
    }[task]
    figures = (
        f"chance level {chance:.4g} ({chance_name}), training loss {losses[0]:.4g} at the first epoch and "
        f"{losses[-1]:.4g} at the last of {len(losses)}"
    )
    if not drop >= MIN_TRAIN_DROP:  # nan included
        shown = "never" if math.isnan(drop) else f"at most {100 * drop:.1f} % below it, never"
        return LearningVerdict(
            LearningStatus.DID_NOT_LEARN,
            f"the training loss stayed at chance level: its {SMOOTHING_EPOCHS}-epoch running mean fell {shown} "
            f"{100 * MIN_TRAIN_DROP:.0f} % or more below the {figures}.",
            ADVICE_NOT_FITTED,
            chance,
            drop,
        )
    by_epoch = {int(row["epoch"]): row for row in history}
    collapsed = []
    for metric, epoch in selected_epochs.items():
        row = by_epoch.get(int(epoch), {})
        if task is Task.CLASSIFICATION:
            n_predicted = _finite(row.get(f"validation_{PREDICTED_CLASSES}"))
            if n_predicted is not None and n_predicted <= 1 < n_validation_classes:
                collapsed.append(f"best-{metric} (epoch {epoch})")
        else:
            sd = _finite(row.get(f"validation_{PREDICTION_SD}"))
            if sd is not None and target_sd > 0 and sd < MIN_PREDICTION_SD * target_sd:
                collapsed.append(f"best-{metric} (epoch {epoch}: sd {sd:.3g})")
    if collapsed:
        if task is Task.CLASSIFICATION:
            what = (
                f"predicts one class for every validation sample although the validation set holds "
                f"{n_validation_classes} classes"
            )
            advice = ADVICE_COLLAPSED
        else:
            what = (
                f"predicts a near-constant value on validation (sd below {100 * MIN_PREDICTION_SD:.0f} % of the "
                f"training targets' sd {target_sd:.4g})"
            )
            advice = ADVICE_CONSTANT
        return LearningVerdict(
            LearningStatus.DID_NOT_LEARN,
            f"the selected model {', '.join(collapsed)} {what}; the training loss fell {100 * drop:.1f} % below "
            f"the {figures}.",
            advice,
            chance,
            drop,
        )
    return LearningVerdict(
        LearningStatus.LEARNED,
        f"the training loss fell {100 * drop:.1f} % below the {figures}, and the selected models' validation "
        "predictions vary.",
        "",
        chance,
        drop,
    )


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
