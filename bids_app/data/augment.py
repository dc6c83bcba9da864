"""On-the-fly data augmentation of training samples, seeded per sample.

Each transform draws its random numbers from the ``numpy.random.Generator`` it is given; the data loader's
sampler hands every sample its own seed (drawn from the run's seed and the epoch), so an augmented epoch is the
same whatever the number of workers and whether or not the run was resumed.

Transforms, applied in this fixed order whatever order the names are given in:

- ``affine``: rotation of at most ``MAX_ROTATION_DEG`` about each axis (one in-plane angle for 2D slices)
  and a shift of at most ``MAX_SHIFT_VOXELS`` along each axis, linear interpolation, the sample's minimum
  outside the field of view;
- ``flip``: left-right mirror with probability 0.5, along the spatial axis that runs left-right (axis 0 of
  an image, patch or region, and of coronal or axial slices; sagittal slices have no left-right axis);
- ``intensity_scaling``: multiply by a factor uniform in ``[1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE]``;
- ``gaussian_noise``: add zero-mean noise whose standard deviation is uniform in ``[0, MAX_NOISE_SD]`` times
  the sample's intensity range.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from bids_app.config import ExtractionMode, SliceDirection
from bids_app.errors import ConfigError

AUGMENTATIONS = ("affine", "flip", "intensity_scaling", "gaussian_noise")
MAX_ROTATION_DEG = 5.0
MAX_SHIFT_VOXELS = 3.0
MAX_SCALE_CHANGE = 0.1
MAX_NOISE_SD = 0.05


def _rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """2x2 rotation for one angle, 3x3 for three (about axes 0, 1 and 2, composed in that order)."""
    if angles_rad.size == 1:
        c, s = math.cos(angles_rad[0]), math.sin(angles_rad[0])
        return np.array([[c, -s], [s, c]])
    matrix = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rotation = np.eye(3)
        rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
        matrix = rotation @ matrix
    return matrix


def random_affine(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate about the centre and shift one sample ``(C, *spatial)`` (2 or 3 spatial axes), float32."""
    from scipy import ndimage

    n_dims = x.ndim - 1
    n_angles = 1 if n_dims == 2 else 3
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=n_angles))
    shift = rng.uniform(-MAX_SHIFT_VOXELS, MAX_SHIFT_VOXELS, size=n_dims)
    matrix = _rotation_matrix(angles)
    centre = (np.asarray(x.shape[1:], dtype=float) - 1) / 2
    # affine_transform maps output coordinates o to input coordinates matrix @ o + offset.
    offset = centre - matrix @ centre - shift
    fill = float(x.min())
    out = np.empty_like(x, dtype=np.float32)
    for channel in range(x.shape[0]):
        ndimage.affine_transform(
            x[channel], matrix, offset=offset, order=1, mode="constant", cval=fill, output=out[channel]
        )
    return out


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """A seeded composition of transforms for samples ``(C, *spatial)``.

    Attributes:
        names: the enabled transforms (a subset of ``AUGMENTATIONS``).
        lr_axis: index in ``spatial`` of the left-right axis; None when the samples have none.
    """

    names: tuple[str, ...]
    lr_axis: int | None

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one float32 sample ``(C, *spatial)``; returns a new array of the same shape."""
        out = np.array(x, dtype=np.float32, copy=True)
        if "affine" in self.names:
            out = random_affine(out, rng)
        if "flip" in self.names and self.lr_axis is not None and rng.random() < 0.5:
            out = np.ascontiguousarray(np.flip(out, axis=1 + self.lr_axis))
        if "intensity_scaling" in self.names:
            out *= np.float32(rng.uniform(1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE))
        if "gaussian_noise" in self.names:
            span = float(out.max() - out.min()) or 1.0
            sd = rng.uniform(0.0, MAX_NOISE_SD) * span
            out += rng.normal(0.0, sd, size=out.shape).astype(np.float32)
        return out


def build_augmentation(
    names: tuple[str, ...], mode: ExtractionMode, slice_direction: SliceDirection = SliceDirection.SAGITTAL
) -> Augmentation | None:
    """The augmentation for ``TrainConfig.augmentations``; None when ``names`` is empty.

    Args:
        names: transform names, see ``AUGMENTATIONS``.
        mode: extraction mode of the samples (decides which axis is left-right).
        slice_direction: direction of the slices in slice mode.

    Raises:
        ConfigError: an unknown name, or ``flip`` on sagittal slices (they have no left-right axis).
    """
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"Unknown augmentation(s) {', '.join(repr(u) for u in unknown)} in train.augmentations. "
            f"Available: {', '.join(AUGMENTATIONS)}."
        )
    if not names:
        return None
    lr_axis: int | None = 0
    if mode is ExtractionMode.SLICE and slice_direction is SliceDirection.SAGITTAL:
        if "flip" in names:
            raise ConfigError(
                "Augmentation 'flip' mirrors left-right, but sagittal slices have no left-right axis. "
                "Remove 'flip' from train.augmentations or use coronal or axial slices."
            )
        lr_axis = None
    return Augmentation(names=tuple(dict.fromkeys(names)), lr_axis=lr_axis)
