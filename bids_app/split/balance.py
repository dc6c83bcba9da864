"""Balance of a drawn split: age and sex tests between its sides, and the redraw loop that keeps a balanced draw.

Within each class, the age (Welch t-test) and the sex (chi-square on the 2 x n_sexes *counts* table) of one side
of a split and of the rest must have p-values above ``SplitConfig.balance_p_threshold``. ``balanced_draw``
redraws until every p-value passes, at most ``max_attempts`` times; then it keeps the best-balanced draw
(highest minimum p-value) with a warning. Used by ``split`` (drawing) and ``split_files`` (users' own splits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import stats

from bids_app.config import SplitConfig
from bids_app.labels import MISSING_VALUES

log = logging.getLogger(__name__)


def age_p_value(age_a: np.ndarray, age_b: np.ndarray) -> float:
    """Welch two-sample t-test p-value of two age samples (years, NaN ignored); 1.0 when untestable."""
    a, b = age_a[~np.isnan(age_a)], age_b[~np.isnan(age_b)]
    if a.size < 2 or b.size < 2:
        return 1.0
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # t undefined; equal constants are balanced
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _counts_p_value(counts: np.ndarray) -> float:
    """Chi-square p-value of a (2, n_categories) table of counts; 1.0 when one side or category is empty."""
    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2 or (counts.sum(axis=1) == 0).any():
        return 1.0
    return float(stats.chi2_contingency(counts).pvalue)


def sex_p_value(sex_a: Sequence[str], sex_b: Sequence[str]) -> float:
    """Chi-square p-value of the side x sex table of participant *counts* (``n/a`` ignored).

    Proportions would shrink the table to a total of 2 and hide real imbalances: counts are required.
    """
    categories = sorted({s for s in [*sex_a, *sex_b] if s not in MISSING_VALUES})
    counts = np.array([[list(side).count(c) for c in categories] for side in (sex_a, sex_b)]).reshape(2, -1)
    return _counts_p_value(counts)


def class_p_values(
    age: np.ndarray,
    sex: np.ndarray,
    n_sexes: int,
    classes: np.ndarray,
    class_names: Sequence[str],
    assign: np.ndarray,
    sides: Sequence[tuple[str, int]],
) -> Iterator[tuple[str, float]]:
    """Age and sex p-values, per class, between bin ``b`` and the other bins, for each (name, b) side.

    Args:
        age: (n,) years per participant, NaN unknown.
        sex: (n,) int sex codes in ``[0, n_sexes)``, -1 unknown.
        n_sexes: Number of sex codes.
        classes: (n,) int class codes, indices into ``class_names``.
        class_names: Class names, used in the keys.
        assign: (n,) bin of each participant.
        sides: (name, bin) pairs; keys look like ``{name}/age[{class}]`` and ``{name}/sex[{class}]``.

    Yields:
        (key, p-value) pairs, lazily, so a caller may stop at the first failing test.
    """
    for name, side in sides:
        inside = assign == side
        for code, cls in enumerate(class_names):
            a, b = inside & (classes == code), ~inside & (classes == code)
            yield f"{name}/age[{cls}]", age_p_value(age[a], age[b])
            counts = [np.bincount(sex[m][sex[m] >= 0], minlength=n_sexes) for m in (a, b)]
            yield f"{name}/sex[{cls}]", _counts_p_value(np.array(counts).reshape(2, -1))


def balanced_draw(
    draw: Callable[[], np.ndarray],
    p_values: Callable[[np.ndarray], Iterator[tuple[str, float]]],
    cfg: SplitConfig,
    stage: str,
) -> tuple[np.ndarray, dict[str, float], int]:
    """Draw until every p-value exceeds the threshold, at most ``max_attempts`` times; else the best draw.

    Args:
        draw: Returns a new assignment (bin per participant) each call.
        p_values: The (key, p-value) pairs of an assignment, e.g. from :func:`class_p_values`.
        cfg: ``balance_p_threshold`` and ``max_attempts``.
        stage: Name of the split stage in log messages ("test", "fold").

    Returns:
        (assignment, p-values by key, number of attempts made).
    """
    best: tuple[np.ndarray, dict[str, float]] | None = None
    best_min = -1.0
    for attempt in range(1, cfg.max_attempts + 1):
        assign, found, worst = draw(), {}, math.inf
        for key, p in p_values(assign):
            found[key], worst = p, min(worst, p)
            if worst <= best_min:  # cannot beat the best draw, hence below the threshold too
                break
        else:
            best, best_min = (assign, found), worst
            if worst > cfg.balance_p_threshold:
                log.info("%s split balanced after %d attempt(s) (lowest p = %.3g)", stage, attempt, worst)
                return assign, found, attempt
    assert best is not None
    shown = ", ".join(f"{k}={v:.3g}" for k, v in best[1].items())
    log.warning(
        "No %s split had every balance p-value above %g in %d attempts; keeping the best-balanced draw "
        "(lowest p = %.3g): %s",
        stage,
        cfg.balance_p_threshold,
        cfg.max_attempts,
        best_min,
        shown,
    )
    return best[0], best[1], cfg.max_attempts
