"""Input checks for NIfTI images before any processing: one clear error per defect.

:func:`load_checked_nifti` reads the whole image once (so a truncated ``.nii.gz`` fails here, not in the
middle of a registration) and rejects what would make preprocessing silently wrong: images that are not 3D,
NaN or infinite voxels, a constant image, voxel sizes outside 0.1–10 mm, and a missing or singular
orientation (both ``qform_code`` and ``sform_code`` 0, which makes nibabel guess the orientation).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from bids_app.errors import DataError, InputMissingError

logger = logging.getLogger(__name__)

MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0
MIN_EXTENT_VOXELS = 4  # an axis shorter than this is a slice stack, not a volume
MIN_ABS_DETERMINANT = 1e-6  # mm³ per voxel; below it the affine cannot be inverted reliably


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis in mm: the column norms of the affine's 3x3 part."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def describe_grid(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """``shape (X, Y, Z), voxel size (a, b, c) mm`` for error messages."""
    sizes = tuple(round(v, 3) for v in voxel_sizes(affine))
    return f"shape {tuple(int(n) for n in shape)}, voxel size {sizes} mm"


def _read(path: Path, kind: str) -> tuple[nib.Nifti1Image | nib.Nifti2Image, np.ndarray]:
    """Header and float32 data of ``path``; every reading failure becomes a DataError naming the file."""
    if not path.is_file():
        raise InputMissingError(f"{kind} image {path} does not exist. Check the path.")
    fix = "Re-export or re-download the image (e.g. with dcm2niix) and check that the copy is complete."
    try:
        image = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"Cannot read {kind} image {path}: {exc}. {fix}") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(
            f"{kind} image {path} is a {type(image).__name__}, not a NIfTI image. Convert it to .nii.gz (e.g. with "
            "nibabel or mri_convert)."
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(
            f"Cannot read the voxels of {kind} image {path} (truncated or corrupted?): {exc}. {fix}"
        ) from None
    return image, data


def _check_shape(path: Path, kind: str, data: np.ndarray) -> np.ndarray:
    """Return a 3D array: trailing singleton axes are dropped, anything else that is not 3D raises."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(
            f"{kind} image {path} is {len(shape)}D with shape {shape}; a 3D volume is expected. Pass a single "
            "volume (e.g. one run, or the average of the frames for a static PET)."
        )
    if data.ndim < 3 or min(data.shape) < MIN_EXTENT_VOXELS:
        raise DataError(
            f"{kind} image {path} has shape {shape}: it is 2D (or a stack of fewer than {MIN_EXTENT_VOXELS} slices), "
            "a 3D volume is expected. Check the conversion from DICOM (all slices must be in one file)."
        )
    if data.ndim != len(shape):
        logger.debug("%s: dropped trailing singleton axes of shape %s", path, shape)
    return data


def _check_values(path: Path, kind: str, data: np.ndarray) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum()) - n_nan
        raise DataError(
            f"{kind} image {path} contains {n_nan} NaN and {n_inf} infinite voxel(s). Replace them (e.g. "
            "`fslmaths in -nan out`, or numpy.nan_to_num) or re-export the image."
        )
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise DataError(
            f"{kind} image {path} is constant (every voxel is {low}). Check the conversion from DICOM; "
            "the file holds no image."
        )


def _check_orientation(path: Path, kind: str, image: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The image's affine, once its orientation codes and determinant are sound; raises otherwise."""
    header = image.header
    qform_code = int(header["qform_code"])
    sform_code = int(header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        raise DataError(
            f"{kind} image {path} has no orientation (qform_code and sform_code are both 0), so left/right and "
            "voxel positions are unknown. Re-convert it from DICOM (dcm2niix writes both) or set a valid sform."
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    determinant = float(np.linalg.det(affine[:3, :3])) if np.isfinite(affine).all() else float("nan")
    if not np.isfinite(determinant) or abs(determinant) < MIN_ABS_DETERMINANT:
        raise DataError(
            f"{kind} image {path} has a singular or invalid affine (determinant {determinant:.3g}; "
            f"qform_code {qform_code}, sform_code {sform_code}):\n{np.array2string(affine[:3], precision=3)}\n"
            "Fix the header's sform/qform (e.g. re-convert from DICOM with dcm2niix)."
        )
    sizes = voxel_sizes(affine)
    if not all(MIN_VOXEL_MM <= s <= MAX_VOXEL_MM for s in sizes):
        raise DataError(
            f"{kind} image {path} has voxel size {tuple(round(s, 4) for s in sizes)} mm, outside "
            f"{MIN_VOXEL_MM}–{MAX_VOXEL_MM} mm. Check the header's units (xyzt_units must be mm) and pixdim, "
            "or re-convert the image."
        )
    return affine


def load_checked_nifti(path: Path, kind: str = "T1w") -> nib.Nifti1Image:
    """Load a 3D NIfTI image fully into memory after checking that it can be preprocessed.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: what the image is (``"T1w"``, ``"pet"``, ``"template"``...), quoted in error messages.

    Returns:
        A NIfTI-1 image with float32 data of shape (X, Y, Z) in memory, the input's affine (mm) and header
        (qform and sform kept; a 4D image with one volume is squeezed to 3D).

    Raises:
        InputMissingError: ``path`` does not exist.
        DataError: unreadable or truncated file, not NIfTI, not 3D, NaN/Inf voxels, constant image, voxel size
            outside [MIN_VOXEL_MM, MAX_VOXEL_MM], no orientation or a singular affine.
    """
    path = Path(path)
    image, data = _read(path, kind)
    data = _check_shape(path, kind, data)
    affine = _check_orientation(path, kind, image)
    _check_values(path, kind, data)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    checked = nib.Nifti1Image(data, affine, header)
    for getter, setter in ((image.get_sform, checked.set_sform), (image.get_qform, checked.set_qform)):
        matrix, code = getter(coded=True)
        if code:
            setter(matrix, code=int(code))
        else:
            setter(None, code=0)
    checked.set_data_dtype(np.float32)
    return checked
