"""Slice mode: every 2D slice along one axis, minus ``discarded_slices`` at both ends.

Axes follow the RAS voxel order of the template-space volume: sagittal slices are orthogonal to axis 0,
coronal to axis 1, axial to axis 2. A slice keeps the two other axes in their original order, e.g. a sagittal
slice of a ``(D, H, W)`` volume is ``(H, W)``. Slices are stored single-channel; any RGB replication a model
needs happens at load time.
"""

from __future__ import annotations

import numpy as np

from bids_app.config import SliceDirection
from bids_app.errors import ConfigError

SLICE_AXES: dict[SliceDirection, int] = {
    SliceDirection.SAGITTAL: 0,
    SliceDirection.CORONAL: 1,
    SliceDirection.AXIAL: 2,
}


def kept_slice_range(volume_shape: tuple[int, ...], direction: SliceDirection, discarded: int) -> range:
    """Indices (along the slicing axis) of the slices that are kept.

    Raises:
        ConfigError: ``discarded`` is negative or removes every slice (``2 * discarded >= n``).
    """
    axis = SLICE_AXES[direction]
    n_total = volume_shape[axis]
    if discarded < 0:
        raise ConfigError(f"discarded_slices must be >= 0, got {discarded}. Set it to 0 or more.")
    if 2 * discarded >= n_total:
        raise ConfigError(
            f"discarded_slices {discarded} removes every {direction.value} slice of the preprocessed volume "
            f"{tuple(volume_shape)} ({n_total} slices along axis {axis}). "
            f"Use discarded_slices < {(n_total + 1) // 2}."
        )
    return range(discarded, n_total - discarded)


def extract_slices(volume: np.ndarray, direction: SliceDirection, discarded: int) -> np.ndarray:
    """Cut the kept slices along ``direction``.

    Args:
        volume: ``(D, H, W)`` normalised float32 volume.
        direction: the axis orthogonal to the slices (see :data:`SLICE_AXES`).
        discarded: number of slices dropped at each end of the axis.

    Returns:
        ``(n_slices, 1, A, B)`` float32 array; slice ``i`` is ``volume.take(discarded + i, axis)`` and
        ``(A, B)`` are the two other axes in order.

    Raises:
        ConfigError: ``discarded`` is negative or at least half the axis length.
    """
    kept = kept_slice_range(volume.shape, direction, discarded)
    stacked = np.moveaxis(volume, SLICE_AXES[direction], 0)[kept.start : kept.stop]
    return np.array(stacked[:, np.newaxis], dtype=np.float32, order="C")
