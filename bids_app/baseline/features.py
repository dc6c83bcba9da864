"""An image's tensor as one bounded feature vector: every part, average-pooled, concatenated.

The baseline sees what the network sees: the tensor the participant level wrote for the model's mode, read with
``extraction.storage.load_tensor`` (sidecar, shape and dtype checked, as ``data.dataset`` does), all parts of the
image (every patch, slice or region). Each part is average-pooled in blocks of ``factor`` voxels per side (3D
parts in ``factor³`` blocks, slices in ``factor²``; a block cut by the border averages the voxels it holds), and
the parts are concatenated in part order. A model of several channels (``--channels T1w FLAIR``) has one
tensor per channel: their vectors are concatenated in channel order.

``factor`` is the smallest integer that keeps ``n_channels × n_parts × pooled voxels`` at most ``MAX_FEATURES``
(20 000),
so a region or a few patches small enough stay at full resolution, and a whole 169×208×179 image becomes
25×30×26 = 19 500 features (factor 7). The budget bounds memory (``n_images × 20 000`` float32 values, 80 kB per
image) and the fit time of the linear models.

Features are standardised with the training group's mean and standard deviation only (a feature constant over
the training group keeps scale 1), then divided by ``√n_features``: every image vector then has a squared norm
near 1 whatever the number of features, so one hyper-parameter grid fits every mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.config import ExtractionMode
from bids_app.errors import DataError
from bids_app.extraction.storage import load_tensor

MAX_FEATURES = 20_000


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How one image's tensor becomes ``n_features`` numbers.

    Attributes:
        n_parts: parts per image (1 in image mode).
        part_shape: spatial shape of one part as stored, voxels (``(D, H, W)`` or ``(A, B)`` for a slice).
        factor: voxels per side of each averaged block (1: full resolution).
        n_channels: tensors per image (the model's channels), each pooled alike.
    """

    n_parts: int
    part_shape: tuple[int, ...]
    factor: int
    n_channels: int = 1

    @property
    def pooled_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil(side / self.factor) for side in self.part_shape)

    @property
    def n_features(self) -> int:
        return self.n_channels * self.n_parts * math.prod(self.pooled_shape)

    def describe(self) -> dict[str, Any]:
        """The JSON record of ``selection.json``."""
        return {
            "n_channels": self.n_channels,
            "n_parts": self.n_parts,
            "part_shape": list(self.part_shape),
            "block_voxels_per_side": self.factor,
            "pooled_part_shape": list(self.pooled_shape),
            "n_features": self.n_features,
            "max_features": MAX_FEATURES,
        }


def choose_pooling(
    n_parts: int, part_shape: Sequence[int], max_features: int = MAX_FEATURES, n_channels: int = 1
) -> Pooling:
    """The smallest pooling factor that keeps ``n_channels × n_parts × pooled voxels`` within ``max_features``.

    With more parts than ``max_features`` no factor fits; every part is then pooled to one value (its mean).
    """
    shape = tuple(int(side) for side in part_shape)
    factor = 1
    count = n_channels * n_parts
    while count * math.prod(math.ceil(side / factor) for side in shape) > max_features and factor < max(shape):
        factor += 1
    return Pooling(n_parts, shape, factor, n_channels)


def pool_mean(part: np.ndarray, factor: int) -> np.ndarray:
    """Block means of a 2D or 3D array over ``factor``-voxel blocks; border blocks average the voxels they hold."""
    if factor == 1:
        return part.astype(np.float64, copy=False)
    padded_shape = tuple(math.ceil(side / factor) * factor for side in part.shape)
    padding = [(0, p - s) for p, s in zip(padded_shape, part.shape, strict=True)]
    sums = np.pad(part.astype(np.float64), padding)
    counts = np.pad(np.ones(part.shape), padding)
    blocked = [n for side in padded_shape for n in (side // factor, factor)]
    axes = tuple(range(1, 2 * part.ndim, 2))
    return sums.reshape(blocked).sum(axis=axes) / counts.reshape(blocked).sum(axis=axes)


def tensor_pooling(path: Path, mode: ExtractionMode, max_features: int = MAX_FEATURES, n_channels: int = 1) -> Pooling:
    """The pooling of images of ``n_channels`` tensors shaped like ``path`` (read from its header, no voxel loaded)."""
    shape = load_tensor(path, mmap=True).shape
    if mode is ExtractionMode.IMAGE:  # (1, D, H, W)
        return choose_pooling(1, shape[1:], max_features, n_channels)
    return choose_pooling(shape[0], shape[2:], max_features, n_channels)  # (n_parts, 1, *spatial)


def image_features(paths: Path | Sequence[Path], mode: ExtractionMode, pooling: Pooling) -> np.ndarray:
    """The ``(n_features,)`` float32 vector of one image: its tensor's, or its channels' concatenated in order.

    Raises:
        DataError: a tensor's parts or shape differ from ``pooling``'s (tensors made with other settings), or
            the image has another number of channels.
    """
    paths = [paths] if isinstance(paths, Path) else list(paths)
    if len(paths) != pooling.n_channels:
        raise DataError(
            f"Image {paths[0]} has {len(paths)} channel(s), but the baseline's features were made from "
            f"{pooling.n_channels}. Predict tensors of the model's channels."
        )
    return np.concatenate([_tensor_features(Path(path), mode, pooling) for path in paths])


def _tensor_features(path: Path, mode: ExtractionMode, pooling: Pooling) -> np.ndarray:
    """The pooled features of one tensor file (one channel)."""
    array = load_tensor(path, mmap=True)
    parts = array[None] if mode is ExtractionMode.IMAGE else array
    expected = (pooling.n_parts, 1, *pooling.part_shape)
    if parts.shape != expected:
        raise DataError(
            f"Tensor {path} has shape {tuple(array.shape)}, but the baseline's features were made from "
            f"{pooling.n_parts} part(s) of {pooling.part_shape} voxels. Extract every image with the same "
            "participant-level settings."
        )
    pooled = [pool_mean(np.asarray(parts[k, 0]), pooling.factor).ravel() for k in range(pooling.n_parts)]
    return np.concatenate(pooled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Standardisation:
    """``(x - mean) / scale``: the training group's mean, and its standard deviation times ``√n_features``."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray) -> Standardisation:
        """From the training group's features ``(n_images, n_features)`` only."""
        values = train.astype(np.float64)
        sd = values.std(axis=0)
        sd[sd <= 1e-12 * max(1.0, float(np.abs(values).max(initial=0.0)))] = 1.0  # constant feature: left as is
        return cls(values.mean(axis=0), sd * math.sqrt(values.shape[1]))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features.astype(np.float64) - self.mean) / self.scale
