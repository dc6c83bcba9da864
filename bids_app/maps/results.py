"""The result TSVs of a model folder (predictions, metrics, across-splits summaries), written with a fixed format.

Two stages write these files for the same groups: prediction (the network, ``prediction.stage``) and the linear
baseline (``baseline.stage``), so the format lives here, once, and both are byte-for-byte comparable.

Floats have 6 decimals, missing values are ``n/a`` and ``-0.000000`` never appears, so the same model and data
give byte-identical files; classes appear by name (``true_label``, ``predicted_label``, ``proba_<class>``).

Image tables (one row per image) have the columns ``participant_id``, ``session_id``, ``true_label`` (class
index or target value as float; ``nan`` when unlabelled), then ``proba_0 .. proba_<K-1>`` and
``predicted_label`` (class index; classification) or ``predicted`` (regression); reconstruction has ``mae``,
``rmse``, ``psnr`` and ``ssim`` instead.

A network's metric TSV carries the baseline's value and interval of the same metric on the same group
(``BASELINE_COLUMNS``, right after ``ci_high``) when the baseline predicted exactly the same images.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_app.config import Task
from bids_app.derivatives import atomic_write_text
from bids_app.labels import COHORT, image_keys, subject_ids
from bids_app.labels import NA as MISSING
from bids_app.metrics import (
    DEFAULT_POSITIVE_INDEX,
    RECONSTRUCTION_METRICS,
    bootstrap_intervals,
    classification_metrics,
    confusion_matrix,
    positive_class_index,
    regression_metrics,
    small_group_warning,
)

log = logging.getLogger(__name__)

BOOTSTRAP_SEED = 0
# The baseline's value and 95 % interval of a metric, beside the network's in the network's metric TSV.
BASELINE_COLUMNS = ("baseline_value", "baseline_ci_low", "baseline_ci_high")


def proba_columns(n_classes: int) -> list[str]:
    """Internal probability columns of part/image tables: ``proba_0 .. proba_<K-1>``."""
    return [f"proba_{k}" for k in range(n_classes)]


def format_value(value: Any) -> str:
    """Fixed text for a TSV cell: floats with 6 decimals, ``n/a`` for missing, no ``-0.000000``."""
    if value is None:
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = f"{float(value):.6f}"
        return "0.000000" if text == "-0.000000" else text
    text = str(value)
    return text if text else MISSING


def format_tsv(table: pd.DataFrame) -> str:
    """Tab-separated text of ``table`` (header + rows, ``\\n`` line ends) with ``format_value`` cells."""
    lines = ["\t".join(str(c) for c in table.columns)]
    lines += ["\t".join(format_value(v) for v in row) for row in table.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def read_tsv(path: Path) -> pd.DataFrame:
    """A result TSV read back with ``n/a`` as missing (numbers as numbers)."""
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[MISSING])


def _label_column(values: pd.Series, task: Task, class_names: Sequence[str]) -> list[Any]:
    if task is not Task.CLASSIFICATION:
        return list(values)
    return [MISSING if pd.isna(v) else class_names[int(v)] for v in values]


def output_table(frame: pd.DataFrame, task: Task, class_names: Sequence[str]) -> pd.DataFrame:
    """Public column names and order: class names instead of indices in labels and ``proba_<class>``."""
    out = frame.copy()
    if task is Task.RECONSTRUCTION:
        return out.drop(columns="true_label")
    out["true_label"] = _label_column(out["true_label"], task, class_names)
    if task is Task.REGRESSION:
        return out.rename(columns={"predicted": "predicted_label"})
    if task is Task.CLASSIFICATION:
        out["predicted_label"] = _label_column(out["predicted_label"], task, class_names)
        out = out.rename(columns={f"proba_{k}": f"proba_{name}" for k, name in enumerate(class_names)})
        probas = [f"proba_{name}" for name in class_names]
        lead = [c for c in (COHORT, "participant_id", "session_id", "part_id") if c in out.columns]
        return out[[*lead, "true_label", "predicted_label", *probas]]
    return out


def image_metrics(
    image: pd.DataFrame, task: Task, n_classes: int, n_bootstrap: int, positive_class: int = DEFAULT_POSITIVE_INDEX
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Metrics of labelled images with 95 % bootstrap intervals (images resampled), and the confusion matrix.

    ``positive_class`` is the index of the class a binary task's sensitivity, specificity, PPV, NPV and F1 are for.

    Returns:
        (``metric, value, ci_low, ci_high`` table, ``(K, K)`` confusion matrix or None).
    """
    metric_fn: Callable[..., Mapping[str, float]]
    matrix = None
    if task is Task.CLASSIFICATION:
        true = image["true_label"].to_numpy().astype(np.int64)
        pred = image["predicted_label"].to_numpy().astype(np.int64)
        arrays = [true, pred, image[proba_columns(n_classes)].to_numpy(dtype=float)]
        metric_fn = functools.partial(classification_metrics, n_classes=n_classes, positive_class=positive_class)
        matrix = confusion_matrix(true, pred, n_classes)
    elif task is Task.REGRESSION:
        arrays = [image["true_label"].to_numpy(dtype=float), image["predicted"].to_numpy(dtype=float)]
        metric_fn = regression_metrics
    else:
        arrays = [image[name].to_numpy(dtype=float) for name in RECONSTRUCTION_METRICS]

        def metric_fn(*columns: np.ndarray) -> dict[str, float]:
            return {name: float(np.mean(c)) for name, c in zip(RECONSTRUCTION_METRICS, columns, strict=True)}

    point = metric_fn(*arrays)
    intervals = bootstrap_intervals(metric_fn, *arrays, n_bootstrap=n_bootstrap, seed=BOOTSTRAP_SEED)
    no_interval = (math.nan, math.nan)
    table = pd.DataFrame(
        {
            "metric": list(point),
            "value": list(point.values()),
            "ci_low": [intervals.get(name, no_interval)[0] for name in point],
            "ci_high": [intervals.get(name, no_interval)[1] for name in point],
        }
    )
    return table, matrix


def group_size_warning(labelled: pd.DataFrame, task: Task, class_names: Sequence[str]) -> str | None:
    """``metrics.small_group_warning`` for the labelled images of a group (participants counted per class)."""
    participants = subject_ids(labelled)  # (cohort, participant_id) in a multi-cohort group
    per_class: dict[str, int] = {}
    if task is Task.CLASSIFICATION:
        codes = labelled["true_label"].to_numpy(dtype=float)
        per_class = {name: int(participants[codes == k].nunique()) for k, name in enumerate(class_names)}
    return small_group_warning(task, per_class, int(participants.nunique()))


def metric_table(
    labelled: pd.DataFrame,
    task: Task,
    class_names: Sequence[str],
    n_bootstrap: int,
    positive_class: str | None,
    warning: str | None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The metric TSV's table and the confusion matrix (``image_metrics``) of a group's labelled images.

    Columns: ``metric``, ``value``, ``ci_low``, ``ci_high``, ``n_images``, ``n_participants``, then for
    classification ``positive_class`` (the class a binary task's one-vs-rest metrics are for; ``n/a`` for the
    macro averages of a multi-class task), and ``warning`` (``n/a`` unless the group is small).
    """
    binary = task is Task.CLASSIFICATION and len(class_names) == 2
    index = positive_class_index(class_names, positive_class) if binary else DEFAULT_POSITIVE_INDEX
    metrics, matrix = image_metrics(labelled, task, len(class_names), n_bootstrap, index)
    metrics["n_images"] = len(labelled)
    metrics["n_participants"] = int(subject_ids(labelled).nunique())
    if task is Task.CLASSIFICATION:
        metrics["positive_class"] = class_names[index] if binary else MISSING
    metrics["warning"] = warning or MISSING
    return metrics, matrix


def add_baseline_columns(metrics: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with ``BASELINE_COLUMNS`` right after ``ci_high``: the baseline's row of the same metric.

    Args:
        metrics: a metric table (``metric_table``) of the network on one group.
        baseline: the baseline's metric table on the same images (``metric``, ``value``, ``ci_low``,
            ``ci_high``); a metric it lacks gets ``nan``.
    """
    by_metric = baseline.set_index(baseline["metric"].astype(str))
    out = metrics.drop(columns=[c for c in BASELINE_COLUMNS if c in metrics.columns])
    position = list(out.columns).index("ci_high") + 1
    for offset, (column, source) in enumerate(zip(BASELINE_COLUMNS, ("value", "ci_low", "ci_high"), strict=True)):
        values = [float(by_metric[source].get(m, math.nan)) for m in out["metric"].astype(str)]
        out.insert(position + offset, column, values)
    return out


def read_baseline_metrics(prediction_tsv: Path, metrics_tsv: Path, image: pd.DataFrame) -> pd.DataFrame | None:
    """The baseline's metric table of a group, when its predictions cover exactly the images of ``image``.

    A baseline file of another set of images (an earlier ``--predict-from`` group of the same name) is not
    merged: its numbers would sit beside the network's without being comparable. Images are compared by
    ``labels.image_keys`` (cohort first when present) as sorted lists, so the same ids in other cohorts, or
    another number of copies of an image, are another set. Returns None when the files do
    not exist or list other images (logged).
    """
    if not (prediction_tsv.is_file() and metrics_tsv.is_file()):
        return None
    predicted = pd.read_csv(prediction_tsv, sep="\t", dtype=str, keep_default_na=False)
    ours, theirs = _image_key_list(image), _image_key_list(predicted)
    if ours != theirs:
        log.warning("The baseline's predictions %s cover other images than the network's (%d vs %d image(s)); its "
                    "metrics are left out of the network's metric TSV. Run the baseline stage again (--stages "
                    "baseline predict).", prediction_tsv, len(theirs), len(ours))  # fmt: skip
        return None
    return read_tsv(metrics_tsv)


def _image_key_list(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """Every image of ``table`` as its ``labels.image_keys`` (cohort first when present), sorted, repeats kept."""
    columns = [table[key].astype(str) for key in image_keys(table)]
    return sorted(zip(*columns, strict=True))


def describe_beside_baseline(metrics_tsv: Path, task: Task) -> str:
    """One phrase for the log: the network's headline metric and the baseline's, with their intervals and n.

    The headline is balanced accuracy in classification, MAE in regression (``metrics_tsv`` carries
    ``BASELINE_COLUMNS``, ``add_baseline_columns``).
    """
    headline = "balanced_accuracy" if task is Task.CLASSIFICATION else "mae"
    table = read_tsv(metrics_tsv)
    rows = table[table["metric"].astype(str) == headline]
    if rows.empty or not set(BASELINE_COLUMNS) <= set(table.columns):
        return f"no {headline} beside the baseline's in {metrics_tsv}"
    row = rows.iloc[0]

    def shown(*values: float) -> str:
        text = [f"{float(v):.3f}" if math.isfinite(float(v)) else MISSING for v in values]
        return f"{text[0]} [{text[1]}, {text[2]}]"

    network = shown(row["value"], row["ci_low"], row["ci_high"])
    baseline = shown(row["baseline_value"], row["baseline_ci_low"], row["baseline_ci_high"])
    return f"{headline} {network} (network) vs {baseline} (linear baseline), n = {int(row['n_images'])} images"


def write_image_outputs(
    out_dir: Path,
    group_name: str,
    image: pd.DataFrame,
    task: Task,
    class_names: Sequence[str],
    n_bootstrap: int,
    positive_class: str | None = None,
    baseline: pd.DataFrame | None = None,
    training_status: str | None = None,
) -> tuple[str | None, pd.DataFrame | None]:
    """Write ``<group>_image_level_prediction.tsv``, and the metric and confusion-matrix TSVs when labelled.

    Args:
        out_dir: the group's folder.
        group_name: names the files.
        image: the image table (module docstring).
        task, class_names: how labels and probabilities are named.
        n_bootstrap: resamples of the 95 % intervals.
        positive_class: the model's ``labels.positive_class`` (None: the class of index 1).
        baseline: the baseline's metric table of the same images, merged as ``BASELINE_COLUMNS``.
        training_status: the ``training_status`` column, last: whether the network learned
            (``Maps.learning_status``: ``learned``, ``did-not-learn``, ``n/a``); None leaves it out.

    Returns:
        The small-group warning written in the metric TSV (``group_size_warning``; None when there is none or no
        image is labelled) and the metric table written (None when no image is labelled).
    """
    atomic_write_text(
        out_dir / f"{group_name}_image_level_prediction.tsv", format_tsv(output_table(image, task, class_names))
    )
    labelled = image if task is Task.RECONSTRUCTION else image[~image["true_label"].isna()]
    if labelled.empty:
        for stale in ("image_level_metrics", "confusion_matrix"):  # from an earlier, labelled run
            (out_dir / f"{group_name}_{stale}.tsv").unlink(missing_ok=True)
        log.info("Group '%s' has no labels: predictions written, no metrics.", group_name)
        return None, None
    if len(labelled) < len(image):
        log.warning("Group '%s': metrics on the %d labelled image(s) of %d.", group_name, len(labelled), len(image))
    warning = group_size_warning(labelled, task, class_names)
    metrics, matrix = metric_table(labelled, task, class_names, n_bootstrap, positive_class, warning)
    if baseline is not None:
        metrics = add_baseline_columns(metrics, baseline)
    if training_status is not None:
        metrics["training_status"] = training_status
    atomic_write_text(out_dir / f"{group_name}_image_level_metrics.tsv", format_tsv(metrics))
    if matrix is not None:
        frame = pd.DataFrame(matrix, columns=list(class_names))
        frame.insert(0, "true_label", list(class_names))
        atomic_write_text(out_dir / f"{group_name}_confusion_matrix.tsv", format_tsv(frame))
    return warning, metrics


def split_summary_table(tables: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """One metric per row, summarised over splits from each split's metric table (``metric``, ``value``).

    Columns: ``metric``, ``n_splits`` (splits where the value is defined), ``mean``, ``sd`` (sample standard
    deviation, ``n/a`` with fewer than two values), then ``split-<k>`` (that split's value), splits ascending.
    Metrics keep the order of the first split's table.
    """
    metrics: list[str] = []
    for table in tables.values():
        metrics += [m for m in table["metric"].astype(str) if m not in metrics]
    rows = []
    for metric in metrics:
        values = {}
        for split, table in sorted(tables.items()):
            found = table.loc[table["metric"].astype(str) == metric, "value"]
            values[f"split-{split}"] = float(found.iloc[0]) if len(found) else math.nan
        defined = np.array([v for v in values.values() if not math.isnan(v)])
        mean = float(defined.mean()) if defined.size else math.nan
        sd = float(defined.std(ddof=1)) if defined.size > 1 else math.nan
        rows.append({"metric": metric, "n_splits": int(defined.size), "mean": mean, "sd": sd, **values})
    return pd.DataFrame(rows)


def write_split_summary(path: Path, metric_paths: Mapping[int, Path]) -> pd.DataFrame | None:
    """Write ``split_summary_table`` of the metric TSVs ``{split: path}`` that exist; None with fewer than two."""
    existing = {split: p for split, p in metric_paths.items() if p.is_file()}
    if len(existing) < 2:
        return None
    summary = split_summary_table({split: read_tsv(p) for split, p in existing.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, format_tsv(summary))
    return summary


def cohort_metrics_tsv(out_dir: Path, group_name: str, cohort: str) -> Path:
    """``<group>_cohort-<name>_image_level_metrics.tsv``: one cohort's metrics beside the pooled ones."""
    return out_dir / f"{group_name}_cohort-{cohort}_image_level_metrics.tsv"


def write_cohort_metrics(
    out_dir: Path,
    group_name: str,
    image: pd.DataFrame,
    task: Task,
    class_names: Sequence[str],
    n_bootstrap: int,
    positive_class: str | None = None,
    training_status: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Per-cohort metric TSVs of a multi-cohort group (``cohort_metrics_tsv``), in the pooled TSV's format.

    Each cohort's labelled images get their own ``metric_table`` (values, 95 % bootstrap intervals, n and the
    small-group warning), so a model that does well pooled but poorly on one cohort shows it. A table without
    the ``cohort`` column writes nothing; files of cohorts no longer in the group are removed. A
    ``training_status`` adds that column, as in ``write_image_outputs``.

    Returns:
        The metric table written per cohort name.
    """
    written: dict[str, pd.DataFrame] = {}
    if COHORT in image.columns:
        labelled = image if task is Task.RECONSTRUCTION else image[~image["true_label"].isna()]
        for cohort in sorted(set(labelled[COHORT].astype(str))):
            rows = labelled[labelled[COHORT].astype(str) == cohort]
            warning = group_size_warning(rows, task, class_names)
            metrics, _ = metric_table(rows, task, class_names, n_bootstrap, positive_class, warning)
            if training_status is not None:
                metrics["training_status"] = training_status
            atomic_write_text(cohort_metrics_tsv(out_dir, group_name, cohort), format_tsv(metrics))
            written[cohort] = metrics
    keep = {cohort_metrics_tsv(out_dir, group_name, cohort).name for cohort in written}
    for stale in out_dir.glob(f"{group_name}_cohort-*_image_level_metrics.tsv"):
        if stale.name not in keep:
            stale.unlink()
    return written
