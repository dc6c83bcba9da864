"""A transfer-learning source: the MAPS named by ``train.transfer_from`` and what a new model takes from it.

The target model's convolutional weights start from the source's best model (first selection metric) of the
same split, or of split 0 when the source has fewer splits; the source's training pool joins the target's
``train+validation.tsv`` so no image the source learned from is ever tested on (``levels.run_split_stage``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_app.maps import Maps

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

log = logging.getLogger(__name__)


def describe_source(source_dir: Path, n_unfrozen_layers: int | None) -> dict[str, Any]:
    """The ``transfer_source`` entry of the target's model-folder record (the source is validated first)."""
    source = Maps.open(source_dir).record
    return {
        "maps_dir": str(Path(source_dir).absolute()),
        "architecture": source.architecture,
        "bids_app_version": source.version,
        "n_unfrozen_layers": n_unfrozen_layers,
    }


def load_source_weights(model: nn.Module, source_dir: Path, split: int, n_unfrozen_layers: int | None) -> None:
    """Copy the source's convolutional weights into ``model`` and freeze all but its last layers if asked.

    Raises:
        DataError: the source MAPS is invalid or its weights do not fit ``model``'s convolutional part.
        InputMissingError: the source has no model for this split nor for split 0.
    """
    from bids_app.maps.weights import load_state
    from bids_app.models import freeze_all_but_last, transfer_weights

    source = Maps.open(source_dir)
    metric = source.record.config.train.selection_metrics[0]
    source_split = split if source.layout.model_path(split, metric).is_file() else 0
    path = source.model_path(source_split, metric)
    copied = transfer_weights(model, load_state(path), source.record.architecture)
    log.info("Split %d: %d tensors transferred from %s", split, len(copied), path)
    if n_unfrozen_layers is not None:
        freeze_all_but_last(model, n_unfrozen_layers)


def source_training_pool(source_dir: Path) -> pd.DataFrame:
    """The source's training pool (it joins the target's own ``train+validation.tsv``)."""
    fix = "Point train.transfer_from to a MAPS written by bids_app's training."
    return Maps.open(source_dir).training_pool(fix)
