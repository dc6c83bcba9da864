"""The linear models, their validation scores and the choice of their regularisation (scikit-learn).

- classification: L2-regularised logistic regression (``lbfgs``, multinomial with three classes or more,
  ``class_weight="balanced"`` so that a majority class is not a free win), grid of ``C`` (inverse strength);
- regression: ridge regression (``cholesky`` solver: exact, deterministic), grid of ``alpha`` (strength).

The hyper-parameter is chosen as the network's epoch is: on the split's validation group, per selection metric
(``loss`` is the validation log-loss in classification, the mean squared error in regression; any other metric
is ``metrics.compute_metrics``' value, larger or smaller is better as ``metrics.higher_is_better`` says). Each
value of the grid is fitted once on the training group; a tie goes to the stronger regularisation (grids are
ordered from strongest to weakest). The test group is never seen here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from bids_app.config import Task
from bids_app.metrics import compute_metrics, higher_is_better

# From the strongest regularisation to the weakest; the features are scaled so that one grid fits every mode
# (``features.Standardisation``).
C_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
ALPHA_GRID = (1e3, 1e2, 10.0, 1.0, 1e-1, 1e-2, 1e-3)
MAX_ITER = 2000  # lbfgs iterations; far above what standardised features need
PROBABILITY_FLOOR = 1e-15  # log-loss of a probability rounded to 0


@dataclasses.dataclass(frozen=True)
class LinearModel:
    """A fitted linear model on standardised features.

    Attributes:
        coef: ``(n_outputs, n_features)``; a binary classifier has one row (the logit of class 1).
        intercept: ``(n_outputs,)``.
        value: the hyper-parameter it was fitted with (``C`` or ``alpha``).
        converged: whether the solver converged within ``MAX_ITER`` (always True for ridge).
    """

    coef: np.ndarray
    intercept: np.ndarray
    value: float
    converged: bool


def model_kind(task: Task) -> tuple[str, str, tuple[float, ...]]:
    """``(model name, hyper-parameter name, grid)`` of the task's baseline."""
    if task is Task.CLASSIFICATION:
        return "logistic_regression", "C", C_GRID
    if task is Task.REGRESSION:
        return "ridge", "alpha", ALPHA_GRID
    raise ValueError(f"no linear baseline for {task.value}")


def fit_linear(task: Task, x: np.ndarray, y: np.ndarray, value: float, n_classes: int, seed: int) -> LinearModel:
    """Fit the task's model with hyper-parameter ``value`` on ``x`` ``(n, p)`` and targets ``y`` ``(n,)``.

    ``y`` holds class indices ``0 .. n_classes - 1`` (classification) or target values (regression).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    if task is Task.CLASSIFICATION:
        classifier = LogisticRegression(
            C=value, class_weight="balanced", solver="lbfgs", max_iter=MAX_ITER, random_state=seed
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(x, y.astype(np.int64))
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        coef, intercept = classifier.coef_, classifier.intercept_
        if list(classifier.classes_) != list(range(n_classes)):  # the stage checks every class is present first
            raise ValueError(f"the training group holds classes {list(classifier.classes_)}, not 0..{n_classes - 1}")
        return LinearModel(np.asarray(coef, np.float64), np.asarray(intercept, np.float64), value, converged)
    regressor = Ridge(alpha=value, solver="cholesky", random_state=seed).fit(x, y.astype(np.float64))
    coef = np.asarray(regressor.coef_, np.float64).reshape(1, -1)
    return LinearModel(coef, np.atleast_1d(np.asarray(regressor.intercept_, np.float64)), value, True)


def predict_linear(task: Task, model: LinearModel, x: np.ndarray) -> np.ndarray:
    """Class probabilities ``(n, n_classes)`` (classification) or predicted values ``(n,)`` (regression)."""
    scores = x @ model.coef.T + model.intercept
    if task is Task.REGRESSION:
        return scores[:, 0]
    if scores.shape[1] == 1:  # binary: the logit of class 1
        positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.stack([1.0 - positive, positive], axis=1)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def score(task: Task, metric: str, y: np.ndarray, output: np.ndarray, positive_class: int) -> float:
    """The validation score of predictions ``output`` (``predict_linear``) against ``y`` for ``metric``."""
    if task is Task.CLASSIFICATION:
        labels = y.astype(np.int64)
        if metric == "loss":
            picked = output[np.arange(len(labels)), labels]
            return float(-np.mean(np.log(np.clip(picked, PROBABILITY_FLOOR, 1.0))))
        return float(compute_metrics(task, labels, output.argmax(axis=1), output, positive_class)[metric])
    if metric == "loss":
        return float(np.mean((output - y) ** 2))
    return float(compute_metrics(task, y, output)[metric])


@dataclasses.dataclass(frozen=True)
class Selection:
    """The choice of one selection metric: every grid value's validation score and the value kept."""

    metric: str
    scores: tuple[float, ...]
    chosen: int  # index into the grid

    def best_score(self) -> float:
        return self.scores[self.chosen]


def choose(metric: str, scores: Sequence[float]) -> int:
    """Index of the best score (``higher_is_better``); the first on a tie, the first when every score is nan."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    best, chosen = -math.inf, 0
    for index, value in enumerate(scores):
        if not math.isnan(value) and sign * value > best:
            best, chosen = sign * value, index
    return chosen


def select_models(
    task: Task,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    metrics: Sequence[str],
    n_classes: int,
    positive_class: int,
    seed: int,
) -> tuple[list[LinearModel], list[Selection]]:
    """Fit every grid value on ``train`` (features, targets) and choose one per metric on ``validation``.

    Returns:
        The fitted models in grid order, and one ``Selection`` per metric of ``metrics``.
    """
    _, _, grid = model_kind(task)
    models = [fit_linear(task, *train, value, n_classes, seed) for value in grid]
    outputs = [predict_linear(task, model, validation[0]) for model in models]
    selections = []
    for metric in metrics:
        scores = tuple(score(task, metric, validation[1], output, positive_class) for output in outputs)
        selections.append(Selection(metric, scores, choose(metric, scores)))
    return models, selections
