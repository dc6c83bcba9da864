"""Whole-image mode, its optional coarser grid, and the per-image intensity normalisation applied before any cutting.

Normalising the full volume once, before it is cut, means every patch, slice or region carries
intensities on the image's own scale: a training sample needs no second read of the volume.

Coarse image mode (``extraction.image_voxel_size``, ``--image-voxel-size MM``): a whole 1 mm t1-linear image
(169x208x179) costs a CPU about a second per training step and image, so image-mode tensors can be resampled
to a coarser isotropic grid at extraction: 85x104x90 at 2 mm, 57x70x60 at 3 mm (``coarse_grid``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from bids_app.config import Normalization
from bids_app.errors import ConfigError, DataError, InputMissingError

# FWHM of a Gaussian = this factor x its standard deviation
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# A requested voxel size may undercut the template's by this much (mm) and still count as equal (float headers).
VOXEL_SIZE_TOLERANCE_MM = 1e-3


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
    out = np.array(volume, dtype=np.float32, copy=True, order="C")  # C order: the tensors are C-ordered
    # a finite sum means every voxel is finite (a NaN or inf would make it NaN or inf); only a non-finite sum (or
    # one that overflowed) needs the voxel-by-voxel count, which costs a boolean volume
    with np.errstate(over="ignore", invalid="ignore"):
        total = out.sum()
    finite = np.isfinite(out) if not np.isfinite(total) else None
    if finite is not None and not finite.all():
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
        # the mean passed in: numpy's std would sum the values again for the same float64 mean
        std = float(values.std(dtype=np.float64, mean=np.full(1, mean)))
        if std == 0:
            raise DataError(
                f"{source} has constant non-zero voxels (= {mean:g}); z-score normalisation is undefined. "
                "Check that preprocessing produced a real image."
            )
        values -= np.float32(mean)  # in place (``values`` is a copy): the same float32 operations, no temporaries
        values /= np.float32(std)
        out[brain] = values
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


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Edge of a voxel along each array axis, mm: the norms of the affine's first three columns."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(sizes[0]), float(sizes[1]), float(sizes[2])


def check_image_voxel_size(voxel_size: float, affine: np.ndarray, source: str = "the template") -> None:
    """Refuse a coarse voxel size that is not finite, or finer than the grid it would be resampled from.

    Args:
        voxel_size: requested isotropic voxel edge, mm.
        affine: ``(4, 4)`` voxel-to-world affine of the template-space grid (the preprocessed images').
        source: what ``affine`` belongs to, named in the message.

    Raises:
        ConfigError: ``voxel_size`` is not a finite number >= the largest voxel edge of ``affine`` (upsampling
            would invent detail and cost more than the template grid itself).
    """
    largest = max(voxel_sizes(affine))
    if not (np.isfinite(voxel_size) and voxel_size >= largest - VOXEL_SIZE_TOLERANCE_MM):
        raise ConfigError(
            f"--image-voxel-size (extraction.image_voxel_size) is {voxel_size:g} mm, finer than the {largest:g} mm "
            f"voxels of {source}: image mode can only be made coarser. Use a value >= {largest:g} (e.g. 2 or 3), "
            "or leave it out to keep the template grid."
        )


def coarse_grid(
    shape: tuple[int, ...], affine: np.ndarray, voxel_size: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The isotropic grid of ``voxel_size`` mm covering the field of view of a ``shape``/``affine`` grid.

    The coarse grid starts at the same corner as the fine one (the outer face of the first voxel), and has
    ``ceil(n * v / voxel_size)`` voxels along an axis of ``n`` voxels of ``v`` mm, so it covers the whole field
    of view (at most one coarse voxel beyond its far face). Coarse voxel ``i`` is centred on fine voxel
    coordinate ``i * r + (r - 1) / 2`` with ``r = voxel_size / v``: for an integer ``r`` that is the centre of
    the ``r`` fine voxels it replaces.

    Args:
        shape: ``(D, H, W)`` of the fine grid, voxels.
        affine: its ``(4, 4)`` voxel-to-world affine, mm.
        voxel_size: the coarse voxel edge, mm.

    Returns:
        The coarse ``(D', H', W')`` and its ``(4, 4)`` affine (same orientation, columns scaled to ``voxel_size``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    ratios = np.array([voxel_size / v for v in voxel_sizes(affine)])
    # 1e-6: a size that is a whole multiple of the fine voxel in exact arithmetic must not gain a voxel
    dims = tuple(int(np.ceil(n / r - 1e-6)) for n, r in zip(shape[:3], ratios, strict=True))
    index_map = np.diag([*ratios, 1.0])
    index_map[:3, 3] = (ratios - 1.0) / 2.0
    return (dims[0], dims[1], dims[2]), affine @ index_map


def resample_to_voxel_size(volume: np.ndarray, affine: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume onto the coarser isotropic grid of :func:`coarse_grid`, anti-aliased.

    A Gaussian prefilter, then trilinear sampling at the coarse voxel centres. The Gaussian's FWHM along an
    axis of ratio ``r = voxel_size / v`` is ``sqrt(r**2 - 1)`` fine voxels: convolved with the fine voxel
    itself (FWHM about 1 voxel) the result has the resolution of a voxel of ``voxel_size``. At ``r = 2`` this
    leaves about 7 % of a one-voxel checkerboard (the highest frequency the fine grid holds) before sampling, at
    ``r = 3`` under 0.1 %, and ``r = 1`` is the identity. One filter serves every ratio, also non-integer ones
    (1.5 mm, or a 2 mm size on a 1.5 mm template), where block averaging would need whole multiples; a block
    average would also weight the r fine voxels of a coarse one equally and their neighbours not at all, which
    aliases more than the Gaussian's smooth roll-off. Borders extend the edge voxels (``nearest``), so a region
    of constant intensity keeps it up to the field of view's edge.

    Args:
        volume: ``(D, H, W)`` float volume on the fine grid.
        affine: its ``(4, 4)`` voxel-to-world affine, mm.
        voxel_size: coarse voxel edge, mm (>= every fine voxel edge: :func:`check_image_voxel_size`).

    Returns:
        The ``(D', H', W')`` float32 volume and its ``(4, 4)`` affine.

    Raises:
        ConfigError: ``voxel_size`` is finer than the volume's voxels.
    """
    from scipy import ndimage

    check_image_voxel_size(voxel_size, affine, "the preprocessed image")
    shape, coarse_affine = coarse_grid(volume.shape, affine, voxel_size)
    ratios = np.array([voxel_size / v for v in voxel_sizes(affine)])
    if shape == volume.shape and np.allclose(ratios, 1.0, atol=1e-6):  # the template's own voxel size
        return np.array(volume, dtype=np.float32), coarse_affine
    sigmas = np.sqrt(np.maximum(ratios**2 - 1.0, 0.0)) / FWHM_PER_SIGMA
    smoothed = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), sigmas, mode="nearest", truncate=4.0)
    coarse = ndimage.affine_transform(
        smoothed, np.diag(ratios), offset=(ratios - 1.0) / 2.0, output_shape=shape, order=1, mode="nearest"
    )
    return np.asarray(coarse, dtype=np.float32), coarse_affine


def extract_image(volume: np.ndarray, voxel_size: float | None = None, affine: np.ndarray | None = None) -> np.ndarray:
    """The whole volume as one single-channel sample, on the template grid or a coarser one.

    Args:
        volume: ``(D, H, W)`` normalised float32 volume.
        voxel_size: ``None`` keeps the volume's grid; a size in mm resamples it (:func:`resample_to_voxel_size`).
        affine: the volume's ``(4, 4)`` affine; required with ``voxel_size``.

    Returns:
        ``(1, D, H, W)`` float32 copy (never a view of ``volume``); ``(1, D', H', W')`` on a coarse grid.
    """
    if voxel_size is not None:
        if affine is None:
            raise ValueError("extract_image needs the volume's affine to resample it to a voxel size")
        volume, _ = resample_to_voxel_size(volume, affine, voxel_size)
    return np.array(volume[np.newaxis], dtype=np.float32, order="C")
