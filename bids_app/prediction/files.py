"""The prediction and metric TSVs of a group the network predicted (the format lives in ``maps.results``).

See ``prediction.stage`` for the files' names and columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bids_app.config import Task
from bids_app.derivatives import atomic_write_text
from bids_app.maps.results import format_tsv, output_table, write_cohort_metrics, write_image_outputs
from bids_app.prediction.voting import is_single_part


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
    baseline: pd.DataFrame | None = None,
    training_status: str | None = None,
) -> str | None:
    """Write the prediction TSVs, and the metric and confusion-matrix TSVs when images are labelled.

    The part-level TSV (patch, slice, roi) is written here; the image-level files by
    ``maps.results.write_image_outputs``, in the format the baseline's files share.

    Args:
        positive_class: the model's ``labels.positive_class`` (None: the class of index 1).
        baseline: the baseline's metric table of the same images (``maps.results.read_baseline_metrics``),
            merged beside the network's values as ``baseline_value``, ``baseline_ci_low``, ``baseline_ci_high``.
        training_status: whether the model's network learned (``Maps.learning_status``), the metric TSVs' last
            column ``training_status``.

    Returns:
        The small-group warning written in the metric TSV (``maps.results.group_size_warning``), None when there
        is none or no image is labelled.
    """
    if not is_single_part(parts):
        part_path = out_dir / f"{group_name}_{mode}_level_prediction.tsv"
        atomic_write_text(part_path, format_tsv(output_table(parts, task, class_names)))
    warning, _ = write_image_outputs(out_dir, group_name, image, task, class_names, n_bootstrap, positive_class,
                                     baseline=baseline, training_status=training_status)  # fmt: skip
    write_cohort_metrics(out_dir, group_name, image, task, class_names, n_bootstrap, positive_class, training_status)
    return warning
