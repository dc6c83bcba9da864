"""Did the network learn? A verdict per split from its training curve and its validation predictions.

A network that never leaves chance level looks, in the metric files, like a model that learned something
weak: a balanced accuracy of 0.50 with a narrow interval. This module says which it is, right after a split's
training (``training.stage.train_split``), from what the training already records. Three checks, in order; the
first that fails gives ``did-not-learn`` with its reason (the figures) and advice (likely causes, what to try):

1. **It fitted the training set.** The training loss is compared with its chance level (``chance_loss``), the
   mean loss of the best constant prediction, which a network reaches by learning nothing about the images:
   in classification (cross-entropy) the entropy of the class frequencies the sampler draws (``ln(n_classes)``
   with ``--class-weighted-sampling`` or balanced classes: 0.693 for two); in regression the variance of the
   training targets (``mse``; the relative drop below it is the training R²), their mean absolute deviation
   from the median (``l1``), the minimum over constants (``huber``). The check reads the largest relative drop
   ``(chance - loss) / chance`` of the running mean of ``SMOOTHING_EPOCHS`` epochs of training loss
   (``train_loss_drop``); below ``MIN_TRAIN_DROP`` (10 %) the loss never fell clearly below chance and stayed
   within a few % of it, or above it, to the end.
2. **Its selected models do not collapse.** At the epoch each ``best-<metric>`` model was kept, the validation
   predictions (``validation_n_predicted_classes`` / ``validation_prediction_sd`` in ``training.tsv``) cover
   more than one class when the validation set holds several (classification), or vary by at least
   ``MIN_PREDICTION_SD`` (5 %) of the training targets' standard deviation (regression).
3. **It generalised.** The lowest validation loss is at least ``MIN_VALIDATION_DROP`` (3 %) below the loss of
   the validation set's own best constant (its class entropy, its variance; ``validation_loss_drop``): a
   network that memorised labels unrelated to the images fits its training set but never beats a constant on
   images it did not see.

Otherwise ``learned``. Reconstruction (autoencoders) gets no verdict. The collapse and generalisation checks
are done here, once, on the validation samples seen during training, rather than at prediction time, so that
``summary.json``, the log, the report and every group's ``training_status`` say the same.

Where the thresholds come from (``benchmarks/bench_learning_alarm.py``, table in docs/reliability.md: the tiny
generated cohort, 16 participants, atrophy 0.8, two splits of 8 training and 8 validation images, ``conv5_fc3``,
batch 4, 20 epochs, and the same images with random labels): networks that did not fit (learning rate 0.003 or
0.03) have single-epoch training losses up to 10 % below ln 2 but running means at most 5.7 % below; networks
that fit reach 19-99 % below, so 10 % separates them. Random labels are often fitted (memorised: up to 99 %
below) and then caught by checks 2 and 3 (16 of 16 splits, seeds 5-8): their lowest validation loss was at most
2.3 % below chance, while the real-label splits that learned (validation balanced accuracy 0.75-1.00, falling
validation loss) were 3.8-41 % below; 3 % sits in that narrow gap (8 validation images per split).
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
MIN_VALIDATION_DROP = 0.03  # relative drop of the best validation loss below the chance prediction's = generalised

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
ADVICE_NOT_GENERALISED = (
    "Likely causes: labels that do not depend on the images (check the label column; with random labels a "
    "network memorises its training set), too few training images for the network's size (a smaller "
    "--architecture, more --dropout, --augmentations), or a validation set too small to show an effect. Compare "
    "with the linear baseline on the same splits: if it is at chance too, the tensors may not hold the signal."
)
ADVICE_CONSTANT = (
    "Likely causes: targets on a large scale with a learning rate too low or too few --epochs (the network "
    "first has to learn their mean), a learning rate too high, batch norm with tiny batches (--batch-size 8 or "
    "more), or targets that do not depend on the images (check the label column). Compare with the linear "
    "baseline on the same splits."
)


def chance_prediction(
    task: Task, loss: str | None, targets: np.ndarray, *, class_weighted: bool = False
) -> np.ndarray | float | None:
    """The best constant prediction for the training targets: what a network that learned nothing outputs.

    Args:
        task: classification or regression (reconstruction: None).
        loss: the loss name (``training.loop.LOSSES``; None is the task's default: cross-entropy or ``mse``).
        targets: one per training sample: class indices ``(n,)`` or target values ``(n,)``.
        class_weighted: classes are drawn equally often (``--class-weighted-sampling``).

    Returns:
        Class probabilities ``(n_classes,)`` (the frequencies the sampler draws), the constant that minimises
        the regression loss (the mean for ``mse``, the median for ``l1``), or None for reconstruction or
        without targets.
    """
    values = np.asarray(targets)
    if task is Task.RECONSTRUCTION or values.size == 0:
        return None
    if task is Task.CLASSIFICATION:
        counts = np.bincount(values.astype(np.int64)).astype(np.float64)
        if class_weighted:
            counts = (counts > 0).astype(np.float64)
        return counts / counts.sum()
    y = values.astype(np.float64)
    if loss in (None, "mse"):
        return float(y.mean())
    if loss == "l1":
        return float(np.median(y))
    candidates = np.linspace(y.min(), y.max(), 513)
    return float(candidates[np.argmin([_huber(y, c) for c in candidates])])


def constant_loss(task: Task, loss: str | None, prediction: np.ndarray | float, targets: np.ndarray) -> float:
    """The mean loss of predicting ``prediction`` (``chance_prediction``) for every sample of ``targets``.

    Cross-entropy in nats in classification (a class the prediction never gives counts as impossible: inf);
    squared target units for ``mse``, target units for ``l1`` and ``huber``.
    """
    if task is Task.CLASSIFICATION:
        probabilities = np.asarray(prediction, dtype=np.float64)
        classes = np.asarray(targets).astype(np.int64)
        with np.errstate(divide="ignore"):
            log_p = np.log(np.concatenate([probabilities, np.zeros(max(0, classes.max() + 1 - len(probabilities)))]))
        return float(-log_p[classes].mean())
    y = np.asarray(targets, dtype=np.float64)
    constant = float(np.asarray(prediction))
    if loss in (None, "mse"):
        return float(((y - constant) ** 2).mean())
    if loss == "l1":
        return float(np.abs(y - constant).mean())
    return _huber(y, constant)


def chance_loss(task: Task, loss: str | None, targets: np.ndarray, *, class_weighted: bool = False) -> float | None:
    """The training loss of the best constant prediction (``chance_prediction``) on the training targets.

    With balanced classes ``ln(n_classes)``; the entropy of the class frequencies otherwise (``ln(n_classes)``
    again with class-weighted sampling); the variance of the targets for ``mse``. None for reconstruction.
    """
    prediction = chance_prediction(task, loss, targets, class_weighted=class_weighted)
    if prediction is None:
        return None
    if task is Task.CLASSIFICATION:
        p = np.asarray(prediction)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())
    return constant_loss(task, loss, prediction, targets)


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


def validation_loss_drop(validation_losses: Sequence[float], validation_chance: float | None) -> float:
    """The relative drop ``(chance - loss) / chance`` of the lowest validation loss below the validation chance.

    ``validation_chance`` is the validation loss of the training set's ``chance_prediction``; ``nan`` when it is
    unknown, infinite (a validation class absent from training) or 0, or without a finite validation loss.
    """
    losses = np.asarray(validation_losses, dtype=np.float64)
    losses = losses[np.isfinite(losses)]
    if validation_chance is None or not math.isfinite(validation_chance) or validation_chance <= 0 or not losses.size:
        return math.nan
    return float((validation_chance - losses.min()) / validation_chance)


def diagnose_learning(
    task: Task,
    history: Sequence[Mapping[str, Any]],
    chance: float | None,
    selected_epochs: Mapping[str, int],
    *,
    validation_chance: float | None = None,
    n_validation_classes: int = 2,
    target_sd: float = math.nan,
) -> LearningVerdict | None:
    """Whether one split's network learned (module docstring for the rules and thresholds).

    Args:
        task: the model's task; reconstruction gets no verdict.
        history: the rows of ``training.tsv`` (``epoch``, ``train_loss``, ``validation_loss``, and
            ``validation_n_predicted_classes`` in classification or ``validation_prediction_sd`` in regression
            when recorded).
        chance: ``chance_loss`` of the training set.
        selected_epochs: selection metric → epoch of its ``best-<metric>`` model.
        validation_chance: the validation loss of the training set's chance prediction (``constant_loss``);
            None skips the generalisation check.
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
    validation_drop = validation_loss_drop([float(row.get("validation_loss", math.nan)) for row in history],
                                           validation_chance)  # fmt: skip
    chance_name = {
        Task.CLASSIFICATION: "the loss of always predicting the training class frequencies",
        Task.REGRESSION: "the loss of always predicting the best constant (training R² near 0)",
    }[task]
    figures = (
        f"chance level {chance:.4g} ({chance_name}), training loss {losses[0]:.4g} at the first epoch and "
        f"{losses[-1]:.4g} at the last of {len(losses)}"
    )

    def verdict(status: LearningStatus, reason: str, advice: str) -> LearningVerdict:
        return LearningVerdict(status, reason, advice, chance, drop, validation_drop)

    if not drop >= MIN_TRAIN_DROP:  # nan included
        if math.isnan(drop):
            shown = "never"
        elif drop > 0:
            shown = f"at most {100 * drop:.1f} % below it, never"
        else:  # above chance all along: say so rather than "-2.0 % below"
            shown = f"no lower than {100 * -drop:.1f} % above it, never"
        return verdict(
            LearningStatus.DID_NOT_LEARN,
            f"the training loss stayed at chance level: its {SMOOTHING_EPOCHS}-epoch running mean fell {shown} "
            f"{100 * MIN_TRAIN_DROP:.0f} % or more below the {figures}.",
            ADVICE_NOT_FITTED,
        )
    fitted = f"the training loss fell {100 * drop:.1f} % below the {figures}"
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
        several = len(collapsed) > 1
        models = f"the selected model{'s' if several else ''} {' and '.join(collapsed)} predict{'' if several else 's'}"
        if task is Task.CLASSIFICATION:
            what = f"one class for every validation sample although the validation set holds {n_validation_classes}"
            what += " classes"
            advice = ADVICE_COLLAPSED
        else:
            what = (
                f"a near-constant value on validation (sd below {100 * MIN_PREDICTION_SD:.0f} % of the training "
                f"targets' sd {target_sd:.4g})"
            )
            advice = ADVICE_CONSTANT
        return verdict(LearningStatus.DID_NOT_LEARN, f"{models} {what}; {fitted}.", advice)
    if validation_drop < MIN_VALIDATION_DROP and validation_chance is not None:  # nan: no check
        return verdict(
            LearningStatus.DID_NOT_LEARN,
            f"the network fitted its training set but did not generalise: its lowest validation loss "
            f"{validation_chance * (1 - validation_drop):.4g} is {100 * validation_drop:.1f} % below the validation "
            f"loss {validation_chance:.4g} of the chance prediction, less than {100 * MIN_VALIDATION_DROP:.0f} %; "
            f"{fitted}.",
            ADVICE_NOT_GENERALISED,
        )
    return verdict(
        LearningStatus.LEARNED,
        f"{fitted}; the selected models' validation predictions vary and the lowest validation loss is "
        f"{100 * validation_drop:.1f} % below that of the chance prediction.",
        "",
    )


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
