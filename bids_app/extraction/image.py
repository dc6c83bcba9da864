"""Whole-image mode and the per-image intensity normalisation applied before any cutting.

Normalising the full volume once, before it is cut, means every patch, slice or region carries
intensities on the image's own scale: a training sample needs no second read of the volume.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from bids_app.config import Normalization
from bids_app.errors import DataError, InputMissingError


def normalize_volume(volume: np.ndarray, method: Normalization, source: str = "volume") -> np.ndarray:
    """Normalise one 3D volume's intensities and return a new float32 array.

    Args:
        volume: ``(D, H, W)`` intensities of one preprocessed image, any real dtype.
        method: ``minmax`` rescales to ``[0, 1]``; ``zscore`` uses the mean and standard deviation of the
            non-zero (brain) voxels, rescales those voxels and leaves the zero background at 0; ``none``
            only converts to float32.
        source: what the volume is (usually the file name), quoted in error messages.

    Returns:
        ``(D, H, W)`` float32 array (never a view of ``volume``).

    Raises:
        DataError: the volume has NaN/inf voxels, is constant (``minmax``), or has no non-zero voxel or a
            constant brain (``zscore``).
    """
    if volume.ndim != 3:
        raise DataError(f"{source} has shape {volume.shape}; expected a 3D volume. Check the image.")
    out = np.array(volume, dtype=np.float32, copy=True)
    finite = np.isfinite(out)
    if not finite.all():
        n_bad = int(out.size - np.count_nonzero(finite))
        raise DataError(
            f"{source} has {n_bad} non-finite voxel(s) (NaN or inf) out of {out.size}. "
            "Re-run the preprocessing of this image or fix the input file."
        )
    del finite
    if method is Normalization.MINMAX:
        low = out.min()
        span = out.max() - low  # float32, so that (max - low) / span is exactly 1
        if span <= 0:
            raise DataError(
                f"{source} is constant (every voxel = {float(low):g}); min-max normalisation is undefined. "
                "Check that preprocessing produced a real image."
            )
        out -= low
        out /= span
    elif method is Normalization.ZSCORE:
        brain = out != 0
        values = out[brain]
        if values.size == 0:
            raise DataError(
                f"{source} has no non-zero voxel; z-score normalisation is undefined. "
                "Check that preprocessing produced a real image."
            )
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        if std == 0:
            raise DataError(
                f"{source} has constant non-zero voxels (= {mean:g}); z-score normalisation is undefined. "
                "Check that preprocessing produced a real image."
            )
        out[brain] = (values - np.float32(mean)) / np.float32(std)
    return out


def load_volume(path: Path, method: Normalization) -> tuple[SpatialImage, np.ndarray]:
    """Read a preprocessed image in RAS voxel order and normalise it.

    Slice directions assume RAS voxel order (axis 0 = sagittal), so an image stored in another axis order
    (e.g. LAS) is reoriented by flips and axis permutations only, never resampled.

    Args:
        path: the preprocessed NIfTI (template space).
        method: the normalisation (:func:`normalize_volume`).

    Returns:
        The RAS image (pass it to ``load_roi_masks``) and its ``(D, H, W)`` normalised float32 volume.

    Raises:
        InputMissingError: the file does not exist.
        DataError: the file is unreadable, not 3D, or its intensities cannot be normalised.
    """
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"Preprocessed image {path} does not exist. Run the preprocessing first.")
    fix = "Re-run the preprocessing."
    try:
        loaded = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"Cannot read preprocessed image {path}: {exc}. {fix}") from exc
    if not isinstance(loaded, SpatialImage):
        raise DataError(f"Preprocessed image {path} is not an image with an affine. {fix}")
    try:
        img = nib.as_closest_canonical(loaded)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"Cannot read preprocessed image {path}: {exc}. {fix}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return img, normalize_volume(data, method, source=str(path))


def extract_image(volume: np.ndarray) -> np.ndarray:
    """The whole volume as one single-channel sample.

    Args:
        volume: ``(D, H, W)`` normalised float32 volume.

    Returns:
        ``(1, D, H, W)`` float32 copy (never a view of ``volume``).
    """
    return np.array(volume[np.newaxis], dtype=np.float32, order="C")
