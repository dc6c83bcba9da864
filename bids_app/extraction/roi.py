"""ROI mode: regions given by the user's binary masks in template space.

Each mask is binarised (``value > 0.5``) and aligned to the preprocessed image's grid, which may be the full
template grid or a crop of it (:func:`align_mask`). With cropping, every region is cut to one common box: the
largest bounding-box extent over all masks along each axis, centred on each mask's own bounding box and
shifted inside the volume, so the box always contains its mask and all regions share one shape. Voxels outside
a region's mask are zeroed. Without cropping, each region keeps the full frame, masked.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from bids_app.errors import ConfigError, DataError, InputMissingError

logger = logging.getLogger(__name__)

# Affines read from float32 headers agree to ~1e-6; these tolerances only absorb that rounding.
_SPACING_TOLERANCE_MM = 1e-3
_DIRECTION_TOLERANCE = 1e-3
_OFFSET_TOLERANCE_VOXELS = 1e-2

Box = tuple[slice, slice, slice]


def _grid_description(img: SpatialImage) -> str:
    spacing = tuple(round(float(v), 4) for v in np.linalg.norm(img.affine[:3, :3], axis=0))
    return (
        f"shape {tuple(int(v) for v in img.shape[:3])}, voxel size {spacing} mm, "
        f"orientation {''.join(nib.orientations.aff2axcodes(img.affine))}"
    )


def _mask_label(mask_img: SpatialImage, name: str) -> str:
    filename = mask_img.get_filename()
    return f"ROI mask '{name}' ({filename})" if filename else f"ROI mask '{name}'"


def align_mask(mask_img: SpatialImage, image_img: SpatialImage, name: str) -> np.ndarray:
    """Cut a template-space mask to the preprocessed image's grid and binarise it.

    The mask may be on the image's own grid or on a larger grid that contains it (the full template while
    the image is a crop of it). Both need the same voxel size and orientation; the image's first voxel must
    fall on a voxel of the mask grid (integer offset) and the image box must lie inside the mask grid.

    Args:
        mask_img: the mask (3D, or 4D with a trailing singleton axis).
        image_img: the preprocessed image whose grid the mask must match.
        name: the region's name, quoted in messages with the mask's file name.

    Returns:
        ``(D, H, W)`` bool array (``mask > 0.5``) on the image grid.

    Raises:
        DataError: voxel size or orientation differ, the offset is not a whole number of voxels, the image box
            is not inside the mask grid, the mask is unreadable or not 3D, or no voxel is inside the region.
    """
    label = _mask_label(mask_img, name)
    fix = (
        "Resample the mask to the template grid (nearest-neighbour, e.g. "
        "nilearn.image.resample_to_img(mask, template, interpolation='nearest')) and pass it again."
    )
    if len(mask_img.shape) < 3 or any(int(v) != 1 for v in mask_img.shape[3:]):
        raise DataError(f"{label} has shape {mask_img.shape}; a 3D binary mask is expected. {fix}")
    image_shape = tuple(int(v) for v in image_img.shape[:3])
    mismatch = f"{label}: {_grid_description(mask_img)}; preprocessed image: {_grid_description(image_img)}."
    mask_linear = mask_img.affine[:3, :3]
    image_linear = image_img.affine[:3, :3]
    mask_spacing = np.linalg.norm(mask_linear, axis=0)
    image_spacing = np.linalg.norm(image_linear, axis=0)
    if not np.allclose(mask_spacing, image_spacing, rtol=0, atol=_SPACING_TOLERANCE_MM):
        raise DataError(f"Voxel size differs. {mismatch} {fix}")
    if not np.allclose(mask_linear / mask_spacing, image_linear / image_spacing, atol=_DIRECTION_TOLERANCE):
        raise DataError(f"Orientation differs. {mismatch} {fix}")
    offset = np.linalg.solve(mask_linear, image_img.affine[:3, 3] - mask_img.affine[:3, 3])
    start = np.round(offset).astype(int)
    if not np.allclose(offset, start, rtol=0, atol=_OFFSET_TOLERANCE_VOXELS):
        raise DataError(
            f"The image grid is shifted by {tuple(round(float(v), 3) for v in offset)} voxels from the mask "
            f"grid, not a whole number of voxels. {mismatch} {fix}"
        )
    stop = start + np.array(image_shape)
    if (start < 0).any() or (stop > np.array(mask_img.shape[:3])).any():
        raise DataError(
            f"The image box (voxels {tuple(int(v) for v in start)} to {tuple(int(v) for v in stop)} of the "
            f"mask grid) is not inside the mask grid. {mismatch} {fix}"
        )
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    try:
        data = np.asarray(mask_img.dataobj[box]).reshape(image_shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"Cannot read {label}: {exc}. Check that the file is a valid NIfTI image.") from exc
    mask = data > 0.5
    if not mask.any():
        raise DataError(
            f"{label} has no voxel above 0.5 inside the preprocessed image's box. {mismatch} "
            "Check that the mask is a binary mask (0/1) in template space covering the brain."
        )
    if np.any((data != 0) & (data != 1)):
        logger.warning("%s has values other than 0 and 1; it is binarised as value > 0.5.", label)
    return mask


def load_roi_masks(roi_masks: Sequence[tuple[str, Path]], image_img: SpatialImage) -> dict[str, np.ndarray]:
    """Read and align the configured ROI masks to one preprocessed image.

    Masks are first put in RAS voxel order (flips and permutations only), like the image by ``load_volume``.

    Args:
        roi_masks: ``(name, mask path)`` pairs in template space (``ExtractionConfig.roi_masks``).
        image_img: the preprocessed image in RAS voxel order (from ``load_volume``).

    Returns:
        ``{name: (D, H, W) bool mask}`` in the order given.

    Raises:
        ConfigError: two masks share a name.
        InputMissingError: a mask file does not exist.
        DataError: a mask is unreadable, not 3D, or does not match the image grid (see :func:`align_mask`).
    """
    masks: dict[str, np.ndarray] = {}
    for name, path in roi_masks:
        if name in masks:
            raise ConfigError(f"ROI name '{name}' is given twice in roi_masks. Give each a distinct name.")
        if not Path(path).is_file():
            raise InputMissingError(f"ROI mask '{name}' file {path} does not exist. Check roi_masks.")
        fix = "Provide a NIfTI binary mask in template space."
        try:
            mask_img = nib.load(path)
            if isinstance(mask_img, SpatialImage) and len(mask_img.shape) == 3:
                mask_img = nib.as_closest_canonical(mask_img)
        except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise DataError(f"Cannot read ROI mask '{name}' ({path}): {exc}. {fix}") from exc
        if not isinstance(mask_img, SpatialImage):
            raise DataError(f"ROI mask '{name}' ({path}) is not an image with an affine. {fix}")
        mask_img.set_filename(str(path))  # reorienting drops it; error messages quote it
        masks[name] = align_mask(mask_img, image_img, name)
    return masks


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last voxel index of the mask along each axis."""
    low = []
    high = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        low.append(hits[0])
        high.append(hits[-1] + 1)
    return np.array(low), np.array(high)


def roi_boxes(masks: Sequence[np.ndarray]) -> list[Box]:
    """The common-size box of every region, in mask order.

    The box extent along each axis is the largest bounding-box extent over all masks; each box is centred on
    its mask's bounding box, then shifted to lie inside the volume (it still contains the whole mask).

    Args:
        masks: non-empty ``(D, H, W)`` bool masks on one grid.

    Returns:
        One ``(slice, slice, slice)`` per mask, all of the same extent.
    """
    bounds = [_bounding_box(mask) for mask in masks]
    extent = np.max([high - low for low, high in bounds], axis=0)
    volume_shape = np.array(masks[0].shape)
    boxes: list[Box] = []
    for low, high in bounds:
        start = low - (extent - (high - low)) // 2
        start = np.clip(start, 0, volume_shape - extent)
        sx, sy, sz = (slice(int(a), int(a + e)) for a, e in zip(start, extent, strict=True))
        boxes.append((sx, sy, sz))
    return boxes


def extract_rois(volume: np.ndarray, masks: Mapping[str, np.ndarray], crop: bool) -> np.ndarray:
    """Cut one masked region per mask.

    Args:
        volume: ``(D, H, W)`` normalised float32 volume.
        masks: ``{name: (D, H, W) bool mask}`` aligned to ``volume`` (see :func:`load_roi_masks`); the output
            follows this order.
        crop: cut each region to the common box (:func:`roi_boxes`); otherwise keep the full frame.

    Returns:
        ``(n_rois, 1, d, h, w)`` float32 array, zero outside each mask; ``(d, h, w)`` is the common box
        extent, or ``(D, H, W)`` without cropping.

    Raises:
        ConfigError: no mask is given.
        DataError: a mask's shape differs from the volume's or a mask is empty.
    """
    if not masks:
        raise ConfigError("ROI mode needs at least one mask. Set roi_masks to (name, path) pairs.")
    arrays = []
    for name, mask in masks.items():
        if mask.shape != volume.shape:
            raise DataError(
                f"ROI mask '{name}' has shape {mask.shape} but the volume has shape {volume.shape}. "
                "Align masks with load_roi_masks first."
            )
        binary = mask if mask.dtype == np.bool_ else mask > 0.5
        if not binary.any():
            raise DataError(f"ROI mask '{name}' is empty. Provide a mask with voxels inside the brain.")
        arrays.append(binary)
    boxes = roi_boxes(arrays) if crop else [(slice(None), slice(None), slice(None))] * len(arrays)
    extent = volume[boxes[0]].shape
    rois = np.zeros((len(arrays), 1, *extent), dtype=np.float32)
    for index, (mask, box) in enumerate(zip(arrays, boxes, strict=True)):
        np.copyto(rois[index, 0], volume[box], where=mask[box])
    return rois
