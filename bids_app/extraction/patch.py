"""Patch mode: cubic patches tiling the volume on a regular grid.

Patches start at ``0, stride, 2 * stride, ...`` along each axis; a patch that would cross the far border is
dropped, so the number of patches is ``prod((dim - patch_size) // stride + 1)`` over the three axes (36 for
the 169x208x179 t1-linear crop with size 50 and stride 50: 3 x 4 x 3). Patches are numbered in C order of
their grid position: patch ``n`` has grid index ``np.unravel_index(n, grid_shape)`` and starts at voxel
``grid_index * stride``. With ``stride == patch_size`` and dimensions that are multiples of it, the patches
tile the volume exactly.
"""

from __future__ import annotations

import numpy as np

from bids_app.errors import ConfigError


def patch_grid_shape(volume_shape: tuple[int, ...], patch_size: int, stride: int) -> tuple[int, int, int]:
    """Number of patches along each axis.

    Args:
        volume_shape: ``(D, H, W)`` in voxels.
        patch_size: edge of the cubic patch, voxels.
        stride: step between patch origins, voxels.

    Returns:
        ``(n_d, n_h, n_w)`` with ``n = (dim - patch_size) // stride + 1``.

    Raises:
        ConfigError: ``patch_size`` or ``stride`` is not positive, or the patch is larger than the volume.
    """
    if len(volume_shape) != 3:
        raise ValueError(f"volume_shape must have 3 dimensions, got {volume_shape}")
    if patch_size <= 0:
        raise ConfigError(f"patch_size must be a positive number of voxels, got {patch_size}. Set it >= 1.")
    if stride <= 0:
        raise ConfigError(f"stride must be a positive number of voxels, got {stride}. Set it >= 1.")
    if patch_size > min(volume_shape):
        raise ConfigError(
            f"patch_size {patch_size} is larger than the preprocessed volume {tuple(volume_shape)} along at "
            f"least one axis. Use a patch_size <= {min(volume_shape)}."
        )
    n_d, n_h, n_w = ((dim - patch_size) // stride + 1 for dim in volume_shape)
    return n_d, n_h, n_w


def patch_origins(volume_shape: tuple[int, ...], patch_size: int, stride: int) -> np.ndarray:
    """First voxel of every patch, in the order of :func:`extract_patches`.

    Returns:
        ``(n_patches, 3)`` int64 voxel indices.
    """
    grid = patch_grid_shape(volume_shape, patch_size, stride)
    return np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1).astype(np.int64) * stride


def extract_patches(volume: np.ndarray, patch_size: int, stride: int) -> np.ndarray:
    """Cut cubic patches on a regular grid (one strided view, then one copy).

    Args:
        volume: ``(D, H, W)`` normalised float32 volume.
        patch_size: edge of the cubic patch, voxels.
        stride: step between patch origins, voxels.

    Returns:
        ``(n_patches, 1, P, P, P)`` float32 array, ``P = patch_size``, ordered as :func:`patch_origins`.

    Raises:
        ConfigError: invalid ``patch_size``/``stride`` for this volume.
    """
    patch_grid_shape(volume.shape, patch_size, stride)
    every_origin = np.lib.stride_tricks.sliding_window_view(volume, (patch_size,) * 3)
    windows = every_origin[::stride, ::stride, ::stride]  # a view: nothing is copied yet
    patches = np.array(windows, dtype=np.float32, order="C")  # the only copy
    return patches.reshape(-1, 1, patch_size, patch_size, patch_size)
