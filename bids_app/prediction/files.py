"""The prediction and metric TSVs of a predicted group, written with a fixed text format.

Floats have 6 decimals, missing values are ``n/a`` and ``-0.000000`` never appears, so the same model and data
give byte-identical files; classes appear by name (``true_label``, ``predicted_label``, ``proba_<class>``).
See ``predict`` for the files' names and columns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_app.config import Task
from bids_app.derivatives import atomic_write_text
from bids_app.labels import NA as MISSING
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


def write_group_outputs(
    out_dir: Path,
    group_name: str,
    mode: str,
    parts: pd.DataFrame,
    image: pd.DataFrame,
    task: Task,
    class_names: Sequence[str],
    n_bootstrap: int,
) -> None:
    """Write the prediction TSVs, and the metric and confusion-matrix TSVs when images are labelled."""
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
        return
    if len(labelled) < len(image):
        log.warning("Group '%s': metrics on the %d labelled image(s) of %d.", group_name, len(labelled), len(image))
    metrics, matrix = image_metrics(labelled, task, len(class_names), n_bootstrap)
    atomic_write_text(out_dir / f"{group_name}_image_level_metrics.tsv", format_tsv(metrics))
    if matrix is not None:
        frame = pd.DataFrame(matrix, columns=list(class_names))
        frame.insert(0, "true_label", list(class_names))
        atomic_write_text(out_dir / f"{group_name}_confusion_matrix.tsv", format_tsv(frame))
