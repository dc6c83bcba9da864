"""The prediction and metric TSVs of a predicted group, written with a fixed text format.

Floats have 6 decimals, missing values are ``n/a`` and ``-0.000000`` never appears, so the same model and data
give byte-identical files; classes appear by name (``true_label``, ``predicted_label``, ``proba_<class>``).
See ``prediction.stage`` for the files' names and columns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_app.config import Task
from bids_app.derivatives import atomic_write_text
from bids_app.labels import NA as MISSING
from bids_app.metrics import DEFAULT_POSITIVE_INDEX, positive_class_index, small_group_warning
from bids_app.prediction.voting import image_metrics, is_single_part

log = logging.getLogger(__name__)


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
        lead = [c for c in ("participant_id", "session_id", "part_id") if c in out.columns]
        return out[[*lead, "true_label", "predicted_label", *probas]]
    return out


def group_size_warning(labelled: pd.DataFrame, task: Task, class_names: Sequence[str]) -> str | None:
    """``metrics.small_group_warning`` for the labelled images of a group (participants counted per class)."""
    participants = labelled["participant_id"].astype(str)
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
    """The metric TSV's table and the confusion matrix (``voting.image_metrics``) of a group's labelled images.

    Columns: ``metric``, ``value``, ``ci_low``, ``ci_high``, ``n_images``, ``n_participants``, then for
    classification ``positive_class`` (the class a binary task's one-vs-rest metrics are for; ``n/a`` for the
    macro averages of a multi-class task), and ``warning`` (``n/a`` unless the group is small).
    """
    binary = task is Task.CLASSIFICATION and len(class_names) == 2
    index = positive_class_index(class_names, positive_class) if binary else DEFAULT_POSITIVE_INDEX
    metrics, matrix = image_metrics(labelled, task, len(class_names), n_bootstrap, index)
    metrics["n_images"] = len(labelled)
    metrics["n_participants"] = int(labelled["participant_id"].astype(str).nunique())
    if task is Task.CLASSIFICATION:
        metrics["positive_class"] = class_names[index] if binary else MISSING
    metrics["warning"] = warning or MISSING
    return metrics, matrix


def write_group_outputs(
    out_dir: Path,
    group_name: str,
    mode: str,
    parts: pd.DataFrame,
    image: pd.DataFrame,
    task: Task,
    class_names: Sequence[str],
    n_bootstrap: int,
    positive_class: str | None = None,
) -> str | None:
    """Write the prediction TSVs, and the metric and confusion-matrix TSVs when images are labelled.

    Args:
        positive_class: the model's ``labels.positive_class`` (None: the class of index 1).

    Returns:
        The small-group warning written in the metric TSV (``group_size_warning``), None when there is none or
        no image is labelled.
    """
    if not is_single_part(parts):
        part_path = out_dir / f"{group_name}_{mode}_level_prediction.tsv"
        atomic_write_text(part_path, format_tsv(output_table(parts, task, class_names)))
    atomic_write_text(
        out_dir / f"{group_name}_image_level_prediction.tsv", format_tsv(output_table(image, task, class_names))
    )
    labelled = image if task is Task.RECONSTRUCTION else image[~image["true_label"].isna()]
    if labelled.empty:
        for stale in ("image_level_metrics", "confusion_matrix"):  # from an earlier, labelled run
            (out_dir / f"{group_name}_{stale}.tsv").unlink(missing_ok=True)
        log.info("Group '%s' has no labels: predictions written, no metrics.", group_name)
        return None
    if len(labelled) < len(image):
        log.warning("Group '%s': metrics on the %d labelled image(s) of %d.", group_name, len(labelled), len(image))
    warning = group_size_warning(labelled, task, class_names)
    metrics, matrix = metric_table(labelled, task, class_names, n_bootstrap, positive_class, warning)
    atomic_write_text(out_dir / f"{group_name}_image_level_metrics.tsv", format_tsv(metrics))
    if matrix is not None:
        frame = pd.DataFrame(matrix, columns=list(class_names))
        frame.insert(0, "true_label", list(class_names))
        atomic_write_text(out_dir / f"{group_name}_confusion_matrix.tsv", format_tsv(frame))
    return warning


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
    tables = {
        split: pd.read_csv(p, sep="\t", keep_default_na=False, na_values=[MISSING]) for split, p in existing.items()
    }
    summary = split_summary_table(tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, format_tsv(summary))
    return summary
