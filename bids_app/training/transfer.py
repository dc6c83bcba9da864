"""A transfer-learning source: the MAPS named by ``train.transfer_from`` and what a new model takes from it.

The target model's convolutional weights start from the source's best model (first selection metric) of the
same split, or of split 0 when the source has fewer splits; the source's training pool joins the target's
``train+validation.tsv`` so no image the source learned from is ever tested on (``levels.run_split_stage``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_app.errors import ConfigError
from bids_app.maps import Maps

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

log = logging.getLogger(__name__)


def check_source_channels(source_dir: Path, channels: tuple[str, ...]) -> None:
    """Refuse a source whose models read another number of channels than ``channels`` (``--channels``): its
    first convolution cannot be copied, and training would only find out after the model folder was written.

    Only the source's record is read (``Maps.read_record``); a missing source is left to the caller's check.

    Raises:
        ConfigError: naming the source's channels and the requested ones.
    """
    source = tuple(Maps.read_record(source_dir).config.train.channels)
    if len(source) != len(channels):
        raise ConfigError(
            f"Invalid --transfer-from {source_dir}: its models read {len(source)} channel(s) ({', '.join(source)}), "
            f"but --channels asks for {len(channels)} ({', '.join(channels)}); the first convolution's weights "
            f"cannot be copied. Transfer from a model trained on {len(channels)} channel(s), or train with "
            f"--channels {' '.join(source)}."
        )


def describe_source(source_dir: Path, n_unfrozen_layers: int | None, channels: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``transfer_source`` entry of the target's model-folder record (the source is validated first).

    A source trained on other image kinds than ``channels`` (the same number of them, or
    :func:`check_source_channels` refused it) is transferred with a warning naming both: its first convolution
    learned the contrast of those kinds.
    """
    source = Maps.open(source_dir).record
    source_channels = tuple(source.config.train.channels)
    if channels and source_channels != tuple(channels):
        log.warning(
            "The --transfer-from model %s was trained on %s, this model reads %s: its first convolution learned "
            "another contrast, so expect the transferred weights to need more fine-tuning (unfreeze the first "
            "layers, or transfer from a model trained on %s).",
            source_dir, " ".join(source_channels), " ".join(channels), " ".join(channels),
        )  # fmt: skip
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
