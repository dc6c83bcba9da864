"""Saliency volumes on disk: the preprocessed image's grid, NIfTI writing, per-image and per-class mean maps.

A saliency map is written on the grid (shape, affine, xform codes) of the preprocessed image its tensor was
cut from, found through the tensor sidecar's ``Source``. An image-mode tensor on a coarser grid
(``--image-voxel-size``) is explained on its own grid, and the map is then resampled (trilinear) onto the
``Source`` grid through the two affines (:func:`to_source_grid`). File names, under ``<method>/`` of an interpret
folder (``bids_app.interpret.stage``)::

    sub-<p>[_ses-<s>]_desc-<label>_saliency.nii.gz          one per image
    class-<name>_desc-<label>_mean_saliency.nii.gz          mean over the images explained for <name>
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.config import ExtractionMode
from bids_app.data.tables import NO_SESSION
from bids_app.derivatives import atomic_path
from bids_app.errors import DataError, InputMissingError
from bids_app.interpret.saliency import SaliencyMethod

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageGrid:
    """The voxel grid of a preprocessed image, on which its saliency maps are written.

    Attributes:
        source_path: the preprocessed NIfTI.
        affine: its ``(4, 4)`` voxel-to-world affine (mm).
        shape: its ``(D, H, W)`` in voxels.
        qform_code, sform_code: its NIfTI xform codes (kept, so a template space stays a template space).
    """

    source_path: Path
    affine: np.ndarray
    shape: tuple[int, int, int]
    qform_code: int
    sform_code: int


# -- the grid: where a tensor's parts come from ---------------------------------------------------------


def output_root(tensor_path: Path) -> Path:
    """The participant-level output folder holding ``tensor_path`` (the parent of its ``sub-*`` folder)."""
    for parent in Path(tensor_path).parents:
        if parent.name.startswith("sub-"):
            return parent.parent
    raise DataError(f"Tensor {tensor_path} is not inside a sub-<label> folder of a participant-level output.")


def read_grid(source_path: Path) -> ImageGrid:
    """The grid of a preprocessed image (header only; the voxels are not read).

    Raises:
        InputMissingError: the image does not exist.
        DataError: it is not a readable 3D NIfTI.
    """
    import nibabel as nib

    if not source_path.is_file():
        raise InputMissingError(
            f"Preprocessed image {source_path} is missing: saliency maps are written on its grid. Re-run the "
            "participant level for this image (or restore the file)."
        )
    try:
        image = nib.load(source_path)
        if not isinstance(image, nib.Nifti1Image):  # NIfTI-2 images are Nifti1Image subclasses
            raise ValueError(f"not a NIfTI image but {type(image).__name__}")
        _, qform_code = image.header.get_qform(coded=True)
        _, sform_code = image.header.get_sform(coded=True)
        shape = tuple(int(v) for v in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, AttributeError) as exc:
        raise DataError(f"Cannot read preprocessed image {source_path}: {exc}. Re-run the participant level.") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"Preprocessed image {source_path} has shape {shape}; a 3D image is expected.")
    return ImageGrid(source_path, affine, (shape[0], shape[1], shape[2]), int(qform_code), int(sform_code))


@dataclasses.dataclass(frozen=True, eq=False)
class TensorGrid:
    """The grid of an image-mode tensor resampled to a coarser voxel size, whose maps go back to ``Source``.

    Attributes:
        affine: ``(4, 4)`` voxel-to-world affine of the tensor's voxels, mm.
        shape: ``(D', H', W')`` of the tensor's volume.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]


def read_tensor_grid(tensor_path: Path, mode: ExtractionMode) -> tuple[ImageGrid, dict[str, Any], TensorGrid | None]:
    """The grid of the preprocessed image ``tensor_path`` was cut from, the sidecar's ``ModeParameters``, and
    the tensor's own grid when it is coarser than that image's (image mode with ``VoxelSize``; else None).

    Raises:
        DataError: the sidecar is not of ``mode`` or names no ``Source``, or its recorded ``Grid`` is not the
            coarse grid of its ``Source``; see also :func:`read_grid`.
    """
    from bids_app.extraction.storage import read_sidecar

    sidecar = read_sidecar(tensor_path)
    if sidecar.get("Mode") != mode.value or "Source" not in sidecar:
        raise DataError(
            f"Tensor sidecar of {tensor_path} has Mode {sidecar.get('Mode')!r} and Source "
            f"{sidecar.get('Source')!r}; the model needs {mode.value} tensors with a Source. "
            "Re-run the participant level for this image."
        )
    grid = read_grid(output_root(tensor_path) / str(sidecar["Source"]))
    parameters = dict(sidecar.get("ModeParameters") or {})
    if mode is not ExtractionMode.IMAGE or parameters.get("VoxelSize") is None:
        return grid, parameters, None
    from bids_app.extraction import coarse_grid

    shape, affine = coarse_grid(grid.shape, grid.affine, float(parameters["VoxelSize"]))
    recorded = (sidecar.get("Grid") or {}).get("Affine")
    if recorded is not None and not np.allclose(np.asarray(recorded, dtype=np.float64), affine, atol=1e-4):
        raise DataError(
            f"Tensor sidecar of {tensor_path} records the grid affine {recorded}, but the {parameters['VoxelSize']} "
            f"mm grid of its Source {grid.source_path} has {affine.round(6).tolist()}. Re-run the participant "
            "level for this image."
        )
    return grid, parameters, TensorGrid(affine, shape)


def to_source_grid(volume: np.ndarray, tensor_grid: TensorGrid, grid: ImageGrid) -> np.ndarray:
    """Resample a map on a tensor's coarse grid onto its ``Source`` image's grid (trilinear, edges extended).

    Each ``Source`` voxel takes the value at its own world position, read through the tensor's affine, so the
    map lands where the coarse voxels were (the coarse grid's voxel centres are not fine voxel centres).

    Args:
        volume: ``tensor_grid.shape`` map.
        tensor_grid: the tensor's grid (:func:`read_tensor_grid`).
        grid: the ``Source`` image's grid.

    Returns:
        ``grid.shape`` float32 map.
    """
    from scipy import ndimage

    if volume.shape != tensor_grid.shape:
        raise ValueError(f"map of shape {volume.shape} for the tensor grid {tensor_grid.shape}")
    fine_to_coarse = np.linalg.solve(tensor_grid.affine, grid.affine)  # Source voxel -> tensor voxel
    resampled = ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        fine_to_coarse[:3, :3],
        offset=fine_to_coarse[:3, 3],
        output_shape=grid.shape,
        order=1,
        mode="nearest",
    )
    return np.asarray(resampled, dtype=np.float32)


def same_grid(reference: ImageGrid | None, grid: ImageGrid) -> ImageGrid:
    """``reference`` (``grid`` when None); DataError when the two grids differ (mean maps need one grid)."""
    if reference is not None and (reference.shape != grid.shape or not np.allclose(reference.affine, grid.affine)):
        raise DataError(
            f"{grid.source_path} and {reference.source_path} are on different grids ({grid.shape} vs "
            f"{reference.shape}); mean maps need one template grid. Preprocess every image with the same "
            "template and crop."
        )
    return reference or grid


# -- writing --------------------------------------------------------------------------------------------


def write_map(path: Path, volume: np.ndarray, grid: ImageGrid) -> None:
    """Write ``volume`` (``grid.shape``) as float32 NIfTI with ``grid``'s affine and xform codes, atomically."""
    import nibabel as nib

    if volume.shape != grid.shape:
        raise ValueError(f"map of shape {volume.shape} for the grid {grid.shape} of {grid.source_path}")
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), grid.affine)
    image.header.set_qform(grid.affine, code=grid.qform_code)
    image.header.set_sform(grid.affine, code=grid.sform_code or 2)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def map_name(participant_id: str, session_id: str, method: SaliencyMethod) -> str:
    """``sub-01_ses-M000_desc-gradcam_saliency.nii.gz`` (no ``ses-`` without sessions)."""
    prefix = participant_id if session_id in ("", NO_SESSION) else f"{participant_id}_{session_id}"
    return f"{prefix}_desc-{method.label}_saliency.nii.gz"


def class_labels(class_names: Sequence[str]) -> list[str]:
    """BIDS labels of the class names (alphanumerics kept); the class index where that is empty or ambiguous."""
    labels = [re.sub(r"[^A-Za-z0-9]", "", name) for name in class_names]
    return [label if label and labels.count(label) == 1 else str(i) for i, label in enumerate(labels)]


class ClassMeans:
    """Per-method, per-class sums of saliency volumes on one grid, written as ``class-<label>`` mean maps.

    Attributes:
        grid: the grid every counted image shares (None before the first).
        counts: images counted per explained class index.
    """

    def __init__(self) -> None:
        self.grid: ImageGrid | None = None
        self.counts: dict[int, int] = {}
        self._sums: dict[tuple[SaliencyMethod, int], np.ndarray] = {}

    def add(self, method: SaliencyMethod, class_index: int, volume: np.ndarray) -> None:
        """Add one image's map ``volume`` (``(D, H, W)``) of ``method`` explained for ``class_index``."""
        key = (method, class_index)
        self._sums[key] = self._sums.get(key, np.zeros(volume.shape, np.float64)) + volume

    def count(self, grid: ImageGrid, class_index: int) -> None:
        """Count one image explained for ``class_index``, on ``grid`` (DataError from :func:`same_grid`)."""
        self.grid = same_grid(self.grid, grid)
        self.counts[class_index] = self.counts.get(class_index, 0) + 1

    def write(self, out_dir: Path, class_names: Sequence[str]) -> set[Path]:
        """Write ``<method>/class-<label>_desc-<label>_mean_saliency.nii.gz`` under ``out_dir``; their paths."""
        labels = class_labels(class_names)
        written: set[Path] = set()
        for (method, k), total in sorted(self._sums.items()):
            path = out_dir / method.value / f"class-{labels[k]}_desc-{method.label}_mean_saliency.nii.gz"
            if self.grid is not None:
                write_map(path, (total / self.counts[k]).astype(np.float32), self.grid)
                written.add(path)
        return written


def remove_stale_maps(out_dir: Path, methods: Iterable[SaliencyMethod], written: set[Path]) -> None:
    """Delete the ``*saliency.nii.gz`` of ``methods`` under ``out_dir`` that this run did not write."""
    for method in methods:
        for stale in sorted((out_dir / method.value).glob("**/*saliency.nii.gz")):
            if stale not in written:
                log.info("Removing %s, left by an earlier interpretation", stale)
                stale.unlink()
