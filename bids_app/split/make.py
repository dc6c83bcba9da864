"""Seeded subject-level splits: held-out test, k-fold or train/validation, leak checks.

Every decision is made per participant: all sessions of a participant land on the same side. The draw is
reproducible (sorted input, ``numpy.random.default_rng(seed)``), stratified on the label (quantile bins for
regression) and, for classification, balanced: within each class, the age (Welch t-test) and the sex
(chi-square on the 2 x n_sexes *counts* table) of the two sides of every split must have p-values above
``balance_p_threshold``. A draw failing a test is redrawn, at most ``max_attempts`` times per stage; then
the best-balanced draw (highest minimum p-value) is kept with a warning. The tests and the redraw loop:
``balance``. The records (``Fold``, ``Splits``) and their verified reading: ``maps.splits``; writing:
``split.files``. See docs/splits.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import numpy as np
import pandas as pd

from bids_app.config import SplitConfig, Task
from bids_app.errors import ConfigError, DataError
from bids_app.labels import (
    COHORT,
    MISSING_VALUES,
    NO_SESSION,
    TABLE_COLUMNS,
    image_keys,
    mark_baseline,
    natural_key,
    sort_table,
    subject_ids,
)
from bids_app.maps.splits import Fold, Splits, check_splits
from bids_app.split.balance import balanced_draw, class_p_values

log = logging.getLogger(__name__)

TEST, REST = 0, 1  # bins of the test stage; a single split uses VALIDATION, TRAIN
VALIDATION, TRAIN = 0, 1
_MAX_REGRESSION_BINS = 10


@dataclasses.dataclass(frozen=True)
class _Subjects:
    """One entry per participant, in natural order; values from the first session (label: mean if numeric).

    A participant is ``labels.subject_ids``: ``<cohort>/<participant_id>`` in a multi-cohort table.
    """

    ids: list[str]
    label: np.ndarray
    age: np.ndarray  # years, NaN unknown
    sex: np.ndarray  # int codes, -1 unknown
    n_sexes: int
    classes: np.ndarray  # int codes (classification), else zeros
    class_names: list[str]
    cohorts: np.ndarray  # int codes of the cohort (sorted names), zeros without a cohort column
    n_cohorts: int


def _subjects(table: pd.DataFrame, task: Task) -> _Subjects:
    who = subject_ids(table)
    first = table[~who.duplicated()]
    sex_names = sorted({s for s in first["sex"] if s not in MISSING_VALUES})
    sex_code = {s: i for i, s in enumerate(sex_names)}
    if task is Task.REGRESSION:
        numeric = pd.to_numeric(table["label"], errors="coerce")
        if numeric.isna().any():
            raise DataError(f"Regression labels must be numbers; got {table['label'][numeric.isna()].iloc[0]!r}.")
        label = numeric.groupby(who, sort=False).mean().to_numpy(float)
    else:
        label = first["label"].astype(str).to_numpy()
    names = sorted(set(label), key=natural_key) if task is Task.CLASSIFICATION else ["all"]
    code = {n: i for i, n in enumerate(names)}
    classes = np.array([code[v] for v in label]) if task is Task.CLASSIFICATION else np.zeros(len(first), int)
    cohort_names = sorted(set(first[COHORT].astype(str))) if COHORT in first.columns else [""]
    cohort_code = {name: i for i, name in enumerate(cohort_names)}
    cohorts = [cohort_code[c] for c in first[COHORT].astype(str)] if COHORT in first.columns else [0] * len(first)
    return _Subjects(
        ids=list(who[first.index]),
        label=label,
        age=first["age"].to_numpy(float),
        sex=np.array([sex_code.get(s, -1) for s in first["sex"]], dtype=int),
        n_sexes=len(sex_names),
        classes=classes,
        class_names=names,
        cohorts=np.array(cohorts, dtype=int),
        n_cohorts=len(cohort_names),
    )


def _strata(subjects: _Subjects, index: np.ndarray, task: Task, n_small: int) -> np.ndarray:
    """Stratum per participant of ``index``: the class, or a label quantile bin (regression), else 0; crossed
    with the cohort in a multi-cohort table (stratum = bin * n_cohorts + cohort, so the class of a
    classification stratum is ``stratum // n_cohorts``)."""
    if task is not Task.REGRESSION:
        return subjects.classes[index] * subjects.n_cohorts + subjects.cohorts[index]
    n_bins = max(1, min(_MAX_REGRESSION_BINS, n_small))
    ranks = np.argsort(np.argsort(subjects.label[index], kind="stable"), kind="stable")
    return ranks * n_bins // max(len(index), 1) * subjects.n_cohorts + subjects.cohorts[index]


def _holdout_targets(counts: np.ndarray, n_small: int, rng: np.random.Generator) -> np.ndarray:
    """Per-stratum sizes of (small side, large side): largest remainder, so each is within ±1 of exact."""
    exact = counts * n_small / counts.sum()
    small = np.floor(exact).astype(int)
    order = np.lexsort((rng.random(len(counts)), -(exact - small)))
    small[order[: n_small - small.sum()]] += 1
    return np.stack([small, counts - small], axis=1)


def _kfold_targets(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per-stratum fold sizes: floor(n/k) each, remainders dealt cyclically so fold totals differ by ≤ 1."""
    targets = np.repeat((counts // k)[:, None], k, axis=1)
    pointer = int(rng.integers(k))
    for stratum, extra in enumerate(counts % k):
        targets[stratum, (pointer + np.arange(extra)) % k] += 1
        pointer = (pointer + int(extra)) % k
    return targets


def _draw(strata: np.ndarray, targets: np.ndarray, forced: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bin of each participant: forced ones keep theirs, free ones fill each stratum's open slots at random."""
    assign = forced.copy()
    for stratum in range(targets.shape[0]):
        members = np.flatnonzero(strata == stratum)
        free = members[assign[members] < 0]
        if free.size == 0:
            continue
        taken = np.bincount(assign[members][assign[members] >= 0], minlength=targets.shape[1])
        slots = np.repeat(np.arange(targets.shape[1]), np.maximum(targets[stratum] - taken, 0))
        assign[free] = rng.permutation(slots)[: free.size]
    return assign


def _p_values(
    subjects: _Subjects, index: np.ndarray, assign: np.ndarray, sides: list[tuple[str, int]]
) -> Iterator[tuple[str, float]]:
    """Balance p-values of a draw of the participants ``index`` (see ``balance.class_p_values``)."""
    return class_p_values(
        subjects.age[index],
        subjects.sex[index],
        subjects.n_sexes,
        subjects.classes[index],
        subjects.class_names,
        assign,
        sides,
    )


def _resolve_size(size: float, n: int, name: str) -> int:
    if size < 0 or (size >= 1 and size != int(size)):
        raise ConfigError(f"split.{name} = {size} must be a fraction in [0, 1) or a whole count >= 1.")
    return math.floor(size * n + 0.5) if size < 1 else int(size)


def _check_config(cfg: SplitConfig) -> None:
    if cfg.n_splits < 1:
        raise ConfigError(f"split.n_splits = {cfg.n_splits}: use >= 2 for k-fold or 1 for one train/validation split.")
    if cfg.max_attempts < 1 or not 0 <= cfg.balance_p_threshold < 1:
        raise ConfigError(
            f"split.max_attempts = {cfg.max_attempts} must be >= 1 and split.balance_p_threshold = "
            f"{cfg.balance_p_threshold} in [0, 1)."
        )
    if cfg.n_splits == 1 and cfg.validation_size <= 0:
        raise ConfigError(f"split.validation_size = {cfg.validation_size} must be > 0 when n_splits is 1.")


def prepare_table(table: pd.DataFrame) -> pd.DataFrame:
    """The label table in canonical order, age/sex/is_baseline added if absent; DataError if incomplete."""
    missing = [c for c in ("participant_id", "session_id", "label") if c not in table.columns]
    if missing or table.empty:
        raise DataError(f"The label table to split is empty or lacks column(s) {', '.join(missing)}. Check the labels.")
    table = sort_table(table.assign(**{c: v for c, v in (("age", np.nan), ("sex", NO_SESSION)) if c not in table}))
    duplicated = table[table.duplicated(image_keys(table))]
    if len(duplicated):
        pair = " ".join(str(v) for v in duplicated[image_keys(table)].iloc[0])
        raise DataError(f"The label table lists {pair} twice. Keep one row per image.")
    if "is_baseline" not in table.columns:
        table["is_baseline"] = mark_baseline(table)
    lead = [*([COHORT] if COHORT in table.columns else []), *TABLE_COLUMNS]
    return table[[*lead, *(c for c in table.columns if c not in lead)]]  # canonical order


def _check_rest(subjects: _Subjects, rest_counts: np.ndarray, n_test: int, cfg: SplitConfig, task: Task) -> None:
    """Enough participants (and per class, for classification) outside the test set for the folds."""
    need = max(cfg.n_splits, 2)
    what = f"{cfg.n_splits} folds (n_splits)" if cfg.n_splits > 1 else "a train and a validation side"
    fix = "Lower --n-splits or --test-size, or add participants."
    n_rest = int(rest_counts.sum())
    if n_rest < need:
        raise DataError(
            f"Only {n_rest} participant(s) remain after holding out {n_test} for test, fewer than {what}. {fix}"
        )
    if task is Task.CLASSIFICATION:
        for name, count in zip(subjects.class_names, rest_counts, strict=True):
            if count < need:
                raise DataError(
                    f"Class '{name}' has {count} participant(s) outside the test set ({n_test} held out), fewer "
                    f"than {what}. {fix}"
                )


def _forced(ids: list[str], constraints: Splits | None, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins imposed by an earlier split: (test stage bins, fold stage bins), -1 where free."""
    test_bin, fold_bin = np.full(len(ids), -1), np.full(len(ids), -1)
    if constraints is None:
        return test_bin, fold_bin
    if len(constraints.folds) != n_splits:
        raise DataError(
            f"The constraining split has {len(constraints.folds)} fold(s) but split.n_splits is {n_splits}; "
            "nested splits need the same number of folds."
        )
    check_splits(constraints, "the constraining split")
    position = {pid: i for i, pid in enumerate(ids)}
    for pid in set(subject_ids(constraints.test)) & set(position):
        test_bin[position[pid]] = TEST
    for fold in constraints.folds:
        for side, frame in ((VALIDATION, fold.validation), (TRAIN, fold.train)):
            for pid in set(subject_ids(frame)) & set(position):
                test_bin[position[pid]] = REST
                if n_splits == 1 or side == VALIDATION:
                    fold_bin[position[pid]] = fold.index if n_splits > 1 else side
    return test_bin, fold_bin


def make_splits(
    table: pd.DataFrame, cfg: SplitConfig, task: Task, seed: int, *, constraints: Splits | None = None
) -> Splits:
    """Split participants into a test set and folds (see the module docstring).

    Args:
        table: Label table (``labels.load_labels``), one row per image; its row order is irrelevant.
        cfg: Sizes, number of folds, balance threshold and attempts.
        task: Stratify on classes (classification), label quantile bins (regression) or nothing.
        seed: The run's seed; same table + cfg + seed → identical split.
        constraints: An earlier split whose participants keep their side (test, fold-k validation, train).

    Raises:
        ConfigError: invalid sizes or counts. DataError: too few participants for the folds.
    """
    _check_config(cfg)
    table = prepare_table(table)
    subjects = _subjects(table, task)
    everyone = np.arange(len(subjects.ids))
    rng = np.random.default_rng(seed)
    forced_test, forced_fold = _forced(subjects.ids, constraints, cfg.n_splits)
    balance = task is Task.CLASSIFICATION
    n_classes = len(subjects.class_names)

    n_test = _resolve_size(cfg.test_size, len(everyone), "test_size")
    strata = _strata(subjects, everyone, task, n_test)
    counts = np.bincount(strata)
    targets = _holdout_targets(counts, n_test, rng)
    rest_counts = counts - targets[:, TEST]
    if task is Task.CLASSIFICATION:  # strata are (class, cohort) pairs: count per class
        rest_counts = np.bincount(np.arange(len(counts)) // subjects.n_cohorts, rest_counts, n_classes).astype(int)
    _check_rest(subjects, rest_counts, n_test, cfg, task)
    test_bin, p_test, tries_test = balanced_draw(
        lambda: _draw(strata, targets, forced_test, rng),
        lambda assign: _p_values(subjects, everyone, assign, [("test", TEST)]) if balance and n_test else iter(()),
        cfg,
        "test",
    )
    rest = np.flatnonzero(test_bin == REST)
    _check_rest(
        subjects, np.bincount(subjects.classes[rest], minlength=n_classes), len(everyone) - len(rest), cfg, task
    )

    if cfg.n_splits > 1:
        strata = _strata(subjects, rest, task, len(rest) // cfg.n_splits)
        targets = _kfold_targets(np.bincount(strata), cfg.n_splits, rng)
        sides = [(f"split-{k}", k) for k in range(cfg.n_splits)]
    else:
        n_validation = _resolve_size(cfg.validation_size, len(rest), "validation_size")
        if not 1 <= n_validation < len(rest):
            raise DataError(
                f"split.validation_size = {cfg.validation_size} gives {n_validation} of {len(rest)} participants "
                "for validation; both sides need at least one. Change --validation-size."
            )
        strata = _strata(subjects, rest, task, n_validation)
        targets = _holdout_targets(np.bincount(strata), n_validation, rng)
        sides = [("split-0", VALIDATION)]
    fold_bin, p_folds, tries_folds = balanced_draw(
        lambda: _draw(strata, targets, forced_fold[rest], rng),
        lambda assign: _p_values(subjects, rest, assign, sides) if balance else iter(()),
        cfg,
        "fold",
    )

    ids = np.array(subjects.ids, dtype=object)
    who = subject_ids(table)
    test = table[who.isin(ids[test_bin == TEST])]
    if cfg.test_baseline_only:
        test = test[test["is_baseline"]]
    folds = []
    for k, (_, side) in enumerate(sides):
        inside = who.isin(ids[rest[fold_bin == side]])
        outside = who.isin(ids[rest[fold_bin != side]])
        folds.append(Fold(k, table[outside].reset_index(drop=True), table[inside].reset_index(drop=True)))
    splits = Splits(test.reset_index(drop=True), tuple(folds), seed, tries_test + tries_folds, {**p_test, **p_folds})
    check_splits(splits, "the drawn split")
    log.info(
        "Split %d participant(s): %d test, %d fold(s) on %d, seed %d, %d attempt(s)",
        len(everyone),
        len(everyone) - len(rest),
        len(folds),
        len(rest),
        seed,
        splits.attempts,
    )
    return splits


def make_leave_cohort_out_splits(table: pd.DataFrame, cfg: SplitConfig, task: Task, seed: int, cohort: str) -> Splits:
    """Every image of ``cohort`` is the test set; the folds are drawn on the other cohorts (``make_splits``).

    The held-out cohort keeps only its baseline sessions when ``cfg.test_baseline_only`` (as a drawn test set
    would); ``cfg.test_size`` is not used: the whole cohort is the test set.

    Raises:
        DataError: the table has no such cohort, or no other cohort to train on.
    """
    table = prepare_table(table)
    names = sorted(set(table[COHORT].astype(str))) if COHORT in table.columns else []
    held_out = table[COHORT].astype(str) == cohort if names else pd.Series(False, index=table.index)
    if not held_out.any() or held_out.all():
        raise DataError(
            f"--leave-cohort-out {cohort}: the labelled images come from cohort(s) {', '.join(names) or 'none'}; "
            "it must name one of them and leave at least one other to train on. Check --cohort and the labels."
        )
    inner = make_splits(table[~held_out], dataclasses.replace(cfg, test_size=0), task, seed)
    test = table[held_out]
    if cfg.test_baseline_only:
        test = test[test["is_baseline"]]
    splits = Splits(test.reset_index(drop=True), inner.folds, seed, inner.attempts, inner.p_values)
    check_splits(splits, "the leave-cohort-out split")
    log.info("Leave-cohort-out: the %d image(s) of %d participant(s) of cohort %s are the test set (split.test_size "
             "is not used)", len(test), subject_ids(test).nunique(), cohort)  # fmt: skip
    return splits


def make_nested_splits(
    subset_table: pd.DataFrame,
    parent_table: pd.DataFrame,
    cfg: SplitConfig,
    task: Task,
    seed: int,
    parent_task: Task | None = None,
) -> tuple[Splits, Splits]:
    """Split the subset task first, then the parent task with the subset's participants on the same sides.

    A participant of the subset's test set is in the parent's test set; one in the subset's fold-k
    validation is in the parent's fold-k validation; so a model pre-trained on parent fold k and fine-tuned
    on subset fold k never saw that fold's evaluation participants (transfer learning without leakage).
    """
    subset = make_splits(subset_table, cfg, task, seed)
    parent = make_splits(parent_table, cfg, parent_task or task, seed, constraints=subset)
    return subset, parent
