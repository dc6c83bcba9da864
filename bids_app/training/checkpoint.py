"""End-of-epoch training checkpoints that resume a run bit for bit, without pickling objects.

A checkpoint holds only tensors and plain Python values (dicts, lists, numbers, strings, None), saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``, so loading never runs code from the
file. It holds everything the next epoch depends on: model, optimizer, LR scheduler and AMP scaler states;
the torch (CPU and CUDA), numpy and Python random states; the data loader generator; the sampler epoch; the
early-stopping counter; the best value and epoch of every selection metric; the rows of ``training.tsv``;
and a hash of the training configuration (``training_config_hash``), so that a resume under another
configuration is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_app.config import RunConfig, TrainConfig
from bids_app.config_file import config_to_nested
from bids_app.derivatives import atomic_path
from bids_app.errors import ConfigError, DataError

FORMAT_VERSION = 1
# [train] options that may change between an interrupted run and its resume. The [runtime] section may change
# too (device and memory layout change where and how the same values are computed; a checkpoint's tensors
# load into either), except the two runtime options that change the arithmetic itself.
RESUMABLE_KEYS = ("resume", "epochs", "splits")
# [train] options that act after the network is trained (the linear baseline is fitted beside it): not hashed.
AFTER_TRAINING_KEYS = ("linear_baseline",)
HASHED_RUNTIME_KEYS = ("amp", "deterministic")
DEFAULT_CHANNELS = TrainConfig().channels


@dataclasses.dataclass
class TrainingState:
    """What the fit loop carries from one epoch to the next (besides the torch objects).

    Attributes:
        epoch: the last completed epoch (0-based); -1 before the first.
        best: selection metric → ``(value, epoch)`` of the model kept in ``best-<metric>``.
        early_stopping_best: lowest validation loss seen (``inf`` at start).
        early_stopping_counter: epochs since the validation loss last improved by more than the tolerance.
        stopped: early stopping fired.
        history: one ``training.tsv`` row per completed epoch.
    """

    epoch: int = -1
    best: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    early_stopping_best: float = math.inf
    early_stopping_counter: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def improves(self, metric: str, value: float) -> bool:
        """True when ``value`` is finite and beats the best ``metric`` kept so far (or none is kept)."""
        from bids_app.metrics import higher_is_better

        if not math.isfinite(value):
            return False
        best = self.best.get(metric)
        if best is None:
            return True
        return value > best[0] if higher_is_better(metric) else value < best[0]

    def update_early_stopping(self, loss: float, patience: int, tolerance: float) -> None:
        """Count epochs without a validation ``loss`` lower than the best by more than ``tolerance``."""
        if loss < self.early_stopping_best - tolerance:
            self.early_stopping_best = loss
            self.early_stopping_counter = 0
        else:
            self.early_stopping_counter += 1
        self.stopped = self.early_stopping_counter >= patience


def capture_rng() -> dict[str, Any]:
    """Global random states as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    version, python_state, gauss_next = random.getstate()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss_next,
        },
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global random states saved by ``capture_rng``."""
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = rng["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"]), python_state["gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    scaler: torch.amp.GradScaler,
    loader_generator: torch.Generator,
    state: TrainingState,
    config_hash: str,
) -> None:
    """Write the full training state after epoch ``state.epoch`` to ``path`` atomically.

    Raises:
        OutputError, IOFailure: the checkpoint cannot be written (permissions; a full disk).
    """
    content = {
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash,
        "model": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng(),
        "loader_generator": loader_generator.get_state(),
        "sampler_epoch": state.epoch + 1,  # the epoch the sampler starts from after a resume
        "training": {
            "epoch": state.epoch,
            "best": {metric: [value, epoch] for metric, (value, epoch) in state.best.items()},
            "early_stopping_best": state.early_stopping_best,
            "early_stopping_counter": state.early_stopping_counter,
            "stopped": state.stopped,
            "history": state.history,
        },
    }
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        writer = _KeepWriteError(handle)
        try:
            torch.save(content, cast(BinaryIO, writer))
        except RuntimeError as exc:
            if writer.error is None:
                raise
            # torch's zip writer reports a failed write as "unexpected pos N vs M": keep the errno (ENOSPC...)
            # so that atomic_path reports a full disk with the checkpoint's name.
            raise OSError(writer.error.errno, writer.error.strerror, str(tmp)) from exc
        handle.flush()
        os.fsync(handle.fileno())


class _KeepWriteError:
    """The file ``torch.save`` writes to, keeping the first ``OSError`` of a write (torch swallows it)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(path: Path, config_hash: str) -> dict[str, Any]:
    """Read a checkpoint without unpickling objects and check it belongs to this configuration.

    Raises:
        DataError: the file is not a readable checkpoint of this format.
        ConfigError: it was written under another training configuration.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError on a bad file
        raise DataError(
            f"Checkpoint {path} cannot be read safely ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Delete it and train without --resume."
        ) from exc
    if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
        raise DataError(f"Checkpoint {path} has an unknown format. Delete it and train without --resume.")
    stored = content.get("config_hash", content.get("fingerprint"))  # bids_app 0.1.0 called it fingerprint
    if stored != config_hash:
        raise ConfigError(
            f"Checkpoint {path} was written under another training configuration (seed, data, model or "
            "optimisation options differ). Resume with the original options, or train without --resume."
        )
    return content


def restore_checkpoint(
    content: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    scaler: torch.amp.GradScaler,
    loader_generator: torch.Generator,
) -> TrainingState:
    """Load ``content`` into the training objects and global RNGs; return the loop's state."""
    model.load_state_dict(content["model"])
    optimizer.load_state_dict(content["optimizer"])
    if scheduler is not None and content["scheduler"] is not None:
        scheduler.load_state_dict(content["scheduler"])
    if content["scaler"]:
        scaler.load_state_dict(content["scaler"])
    loader_generator.set_state(content["loader_generator"])
    restore_rng(content["rng"])
    training = content["training"]
    return TrainingState(
        epoch=int(training["epoch"]),
        best={metric: (float(value), int(epoch)) for metric, (value, epoch) in training["best"].items()},
        early_stopping_best=float(training["early_stopping_best"]),
        early_stopping_counter=int(training["early_stopping_counter"]),
        stopped=bool(training["stopped"]),
        history=list(training["history"]),
    )


def training_config_hash(cfg: RunConfig, split: int, train_table: pd.DataFrame, val_table: pd.DataFrame) -> str:
    """SHA-256 of everything a checkpoint depends on: training options, seed, split and its images."""
    nested = config_to_nested(cfg)
    train_options = {k: v for k, v in nested["train"].items() if k not in (*RESUMABLE_KEYS, *AFTER_TRAINING_KEYS)}
    train_options.update({k: nested["runtime"][k] for k in HASHED_RUNTIME_KEYS})
    if tuple(train_options.get("channels", DEFAULT_CHANNELS)) == DEFAULT_CHANNELS:
        # one T1w channel is what every checkpoint before --channels was trained on: they keep their hash
        train_options.pop("channels", None)
    images = {
        name: [
            [str(r.participant_id), str(r.session_id), str(getattr(r, "label", "")), Path(str(r.tensor_path)).name]
            for r in t.itertuples()
        ]
        for name, t in (("train", train_table), ("validation", val_table))
    }
    content = {"seed": cfg.seed, "split": split, "train_options": train_options, "labels": nested["labels"], **images}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names and raw bytes): equal iff bitwise equal."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
