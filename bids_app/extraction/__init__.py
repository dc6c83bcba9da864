"""Tensor extraction: cut one normalised template-space volume into model inputs, one file per image per mode.

Shapes (float32, or float16 when ``ExtractionConfig.dtype`` says so):

| mode  | tensor                          | parts                                         |
|-------|---------------------------------|-----------------------------------------------|
| image | ``(1, D, H, W)``                | 1 (``D, H, W`` of ``image_voxel_size`` if set) |
| patch | ``(n_patches, 1, P, P, P)``     | ``prod((dim - P) // stride + 1)``             |
| slice | ``(n_slices, 1, A, B)``         | ``n_axis - 2 * discarded_slices``             |
| roi   | ``(n_rois, 1, d, h, w)``        | number of ROI masks                           |

Typical use for one preprocessed image::

    img, volume = load_volume(preproc_path, cfg.normalization)  # RAS order, normalised float32
    masks = load_roi_masks(cfg.roi_masks, img) if cfg.roi_masks else None
    for mode in cfg.modes:
        tensor = extract_tensor(volume, mode, cfg, masks, affine=img.affine)
        sidecar = {"Mode": mode.value, "ModeParameters": mode_parameters(mode, cfg, list(masks or ())), ...}
        write_tensor(tensor_path, tensor, sidecar)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bids_app.config import ExtractionConfig, ExtractionMode
from bids_app.errors import ConfigError
from bids_app.extraction.image import (
    check_image_voxel_size,
    coarse_grid,
    extract_image,
    load_volume,
    normalize_volume,
    resample_to_voxel_size,
    voxel_sizes,
)
from bids_app.extraction.patch import extract_patches, patch_grid_shape, patch_origins
from bids_app.extraction.roi import align_mask, extract_rois, load_roi_masks, roi_boxes
from bids_app.extraction.slice import SLICE_AXES, extract_slices, kept_slice_range
from bids_app.extraction.storage import (
    is_tensor_complete,
    load_part,
    load_tensor,
    read_sidecar,
    write_tensor,
)

__all__ = [
    "EXTRACTORS",
    "SLICE_AXES",
    "align_mask",
    "check_image_voxel_size",
    "coarse_grid",
    "extract_image",
    "extract_patches",
    "extract_rois",
    "extract_slices",
    "extract_tensor",
    "is_tensor_complete",
    "load_part",
    "load_roi_masks",
    "load_tensor",
    "load_volume",
    "mode_parameters",
    "n_parts",
    "normalize_volume",
    "patch_origins",
    "read_sidecar",
    "resample_to_voxel_size",
    "roi_boxes",
    "voxel_sizes",
    "write_tensor",
]

# Each mode's pure cutter: (volume, **mode arguments) -> (n_parts, 1, ...) float32.
EXTRACTORS: dict[ExtractionMode, Callable[..., np.ndarray]] = {
    ExtractionMode.IMAGE: extract_image,
    ExtractionMode.PATCH: extract_patches,
    ExtractionMode.SLICE: extract_slices,
    ExtractionMode.ROI: extract_rois,
}


def _cutter_arguments(
    mode: ExtractionMode,
    cfg: ExtractionConfig,
    roi_masks: Mapping[str, np.ndarray] | None,
    affine: np.ndarray | None,
) -> dict[str, Any]:
    if mode is ExtractionMode.PATCH:
        return {"patch_size": cfg.patch_size, "stride": cfg.stride}
    if mode is ExtractionMode.SLICE:
        return {"direction": cfg.slice_direction, "discarded": cfg.discarded_slices}
    if mode is ExtractionMode.ROI:
        if not roi_masks:
            raise ConfigError("Extraction mode 'roi' needs ROI masks. Set roi_masks to (name, path) pairs.")
        return {"masks": roi_masks, "crop": cfg.roi_crop}
    if cfg.image_voxel_size is not None:
        return {"voxel_size": cfg.image_voxel_size, "affine": affine}
    return {}


def extract_tensor(
    volume: np.ndarray,
    mode: ExtractionMode,
    cfg: ExtractionConfig,
    roi_masks: dict[str, np.ndarray] | None = None,
    affine: np.ndarray | None = None,
) -> np.ndarray:
    """Cut a normalised volume into the tensor of one mode, in the configured storage dtype.

    Args:
        volume: ``(D, H, W)`` float32 volume already normalised (:func:`normalize_volume`).
        mode: which cutter to apply.
        cfg: patch size, stride, slice direction, discarded slices, ROI cropping, image voxel size, dtype.
        roi_masks: ``{name: (D, H, W) bool}`` from :func:`load_roi_masks`; required for ``roi``.
        affine: the volume's ``(4, 4)`` voxel-to-world affine; required for ``image`` with ``image_voxel_size``.

    Returns:
        ``(n_parts, 1, ...)`` array (shapes in the module docstring), float32 or float16 per ``cfg.dtype``.

    Raises:
        ConfigError: parameters incompatible with the volume shape, or ``roi`` without masks.
        DataError: a mask does not match the volume or is empty.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (D, H, W), got shape {volume.shape}")
    tensor = EXTRACTORS[mode](volume, **_cutter_arguments(mode, cfg, roi_masks, affine))
    return tensor.astype(cfg.dtype.value, copy=False)


def mode_parameters(mode: ExtractionMode, cfg: ExtractionConfig, roi_names: Sequence[str] = ()) -> dict[str, Any]:
    """The parameters of ``mode`` for the tensor sidecar's ``ModeParameters`` (JSON-ready, BIDS-style keys).

    Args:
        mode: the extraction mode.
        cfg: the extraction configuration.
        roi_names: region names in tensor order; empty means the names in ``cfg.roi_masks``.

    Returns:
        ``{}`` for image on the template grid, ``VoxelSize`` (mm) on a coarser one; ``PatchSize``/``Stride`` for
        patch; ``SliceDirection``/``SliceAxis``/``DiscardedSlices`` for slice; ``RoiNames``/``RoiCrop`` for roi.
    """
    if mode is ExtractionMode.PATCH:
        return {"PatchSize": cfg.patch_size, "Stride": cfg.stride}
    if mode is ExtractionMode.SLICE:
        return {
            "SliceDirection": cfg.slice_direction.value,
            "SliceAxis": SLICE_AXES[cfg.slice_direction],
            "DiscardedSlices": cfg.discarded_slices,
        }
    if mode is ExtractionMode.ROI:
        names = list(roi_names) if roi_names else [name for name, _ in cfg.roi_masks]
        return {"RoiNames": names, "RoiCrop": cfg.roi_crop}
    # Absent on the template grid, so tensors made before the option existed keep their configuration hash.
    return {} if cfg.image_voxel_size is None else {"VoxelSize": cfg.image_voxel_size}


def n_parts(mode: ExtractionMode, cfg: ExtractionConfig, volume_shape: Sequence[int], n_rois: int = 0) -> int:
    """Number of parts (patches, slices, regions) per image, without reading any data.

    Also validates the parameters against ``volume_shape``, so a bad configuration fails before preprocessing.

    Args:
        mode: the extraction mode.
        cfg: the extraction configuration.
        volume_shape: ``(D, H, W)`` of the preprocessed image, voxels.
        n_rois: number of ROI masks; 0 means ``len(cfg.roi_masks)``.

    Raises:
        ConfigError: parameters incompatible with ``volume_shape``, or ``roi`` without masks.
    """
    shape = tuple(int(v) for v in volume_shape)
    if mode is ExtractionMode.PATCH:
        return int(np.prod(patch_grid_shape(shape, cfg.patch_size, cfg.stride)))
    if mode is ExtractionMode.SLICE:
        return len(kept_slice_range(shape, cfg.slice_direction, cfg.discarded_slices))
    if mode is ExtractionMode.ROI:
        count = n_rois or len(cfg.roi_masks)
        if count == 0:
            raise ConfigError("Extraction mode 'roi' needs ROI masks. Set roi_masks to (name, path) pairs.")
        return count
    return 1
