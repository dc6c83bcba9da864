"""The simulated scanner of the synthetic dataset: native pose, field of view, bias field, noise, PET blur, files.

A template-space image of a subject (``synthetic_anatomy``) is moved to its own native pose on a brain-centred
field of view (RAS+ affine in scanner mm; FLAIR with thicker slices); a T1w, T2w or FLAIR gets a smooth bias
field and Rician noise, a PET image the scanner's blur and Gaussian noise. The sidecars describe these simulated
acquisitions, and ``nifti_bytes`` writes the volumes reproducibly.

Intensity units: T1w, T2w and FLAIR as the anatomy's (template intensities times ``INTENSITY_SCALE``), stored as
int16; PET in Bq/mL, float32.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_app.synthetic.anatomy import (
    INTENSITY_SCALE,
    PET_BQ_PER_ML,
    TemplateSpace,
    evaluate_field,
    random_field_coefficients,
)

NATIVE_FOV_MM = np.array([176.0, 208.0, 176.0])  # a common sagittal MPRAGE matrix at 1 mm
WM_REFERENCE = 220.0 * INTENSITY_SCALE
NOISE_FRACTION = 0.012  # Rician sigma relative to white matter; background mean ~1.5 % of it
PET_FWHM_MM = 6.0
MAX_ROTATION_DEG = 8.0
MAX_SHIFT_MM = 10.0
MAX_SCALE = 0.05

# Sidecars of the simulated acquisitions (BIDS required fields, and the values the simulation uses)
T1W_SIDECAR = {
    "Manufacturer": "bids_app synthetic",
    "ManufacturersModelName": "bids_app-generate",
    "MagneticFieldStrength": 3,
    "PulseSequenceType": "MPRAGE",
    "RepetitionTime": 2.3,
    "EchoTime": 0.00298,
    "InversionTime": 0.9,
    "FlipAngle": 9,
}
T2W_SIDECAR = {
    "Manufacturer": "bids_app synthetic",
    "ManufacturersModelName": "bids_app-generate",
    "MagneticFieldStrength": 3,
    "PulseSequenceType": "SPACE",
    "RepetitionTime": 3.2,
    "EchoTime": 0.408,
    "FlipAngle": 120,
}
FLAIR_SIDECAR = {
    "Manufacturer": "bids_app synthetic",
    "ManufacturersModelName": "bids_app-generate",
    "MagneticFieldStrength": 3,
    "PulseSequenceType": "SPACE FLAIR",
    "RepetitionTime": 5.0,
    "EchoTime": 0.393,
    "InversionTime": 1.8,
    "FlipAngle": 120,
}
# the contrasts besides T1w: sidecar and slice thickness relative to the template's voxels (FLAIR: thick slices)
CONTRAST_ACQUISITIONS = {"T2w": (T2W_SIDECAR, 1.0), "FLAIR": (FLAIR_SIDECAR, 1.5)}
PET_SIDECAR = {
    "Manufacturer": "bids_app synthetic",
    "ManufacturersModelName": "bids_app-generate",
    "Units": "Bq/mL",
    "TracerName": "FDG",
    "TracerRadionuclide": "F18",
    "InjectedRadioactivity": 185,
    "InjectedRadioactivityUnits": "MBq",
    **dict.fromkeys(
        ["InjectedMass", "InjectedMassUnits", "SpecificRadioactivity", "SpecificRadioactivityUnits"], "n/a"
    ),
    "ModeOfAdministration": "bolus",
    "TimeZero": "10:00:00",
    "ScanStart": 1800,
    "InjectionStart": 0,
    "FrameTimesStart": [1800],
    "FrameDuration": [1200],
    "AcquisitionMode": "list mode",
    "ImageDecayCorrected": True,
    "ImageDecayCorrectionTime": 0,
    "ReconMethodName": "OSEM",
    "ReconMethodParameterLabels": ["subsets", "iterations"],
    "ReconMethodParameterUnits": ["none", "none"],
    "ReconMethodParameterValues": [21, 3],
    "ReconFilterType": "Gaussian",
    "ReconFilterSize": PET_FWHM_MM,
    "AttenuationCorrection": "CT-based",
}


@dataclass(frozen=True)
class NativeGrid:
    """A native acquisition grid: ``to_template`` maps native voxel indices to template voxel indices."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) native voxel → scanner mm, RAS+
    to_template: np.ndarray  # (4, 4)
    scale: float = 1.0  # head size relative to the template


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def random_native_grid(
    rng: np.random.Generator, space: TemplateSpace, slice_factor: float = 1.0, scale: float | None = None
) -> NativeGrid:
    """A random head pose in scanner space and a brain-centred field of view of ``NATIVE_FOV_MM``.

    Scanner mm ``x = s R (y - c) + t`` for MNI mm ``y`` (``c``: brain centre); the grid centre sits at
    ``t`` give or take 2 mm, so the translation shows in the affine and the rotation in the voxels. Voxels are
    as large as the template's, the third axis ``slice_factor`` times thicker (thick-slice acquisitions). The
    head size ``s`` is drawn unless ``scale`` gives it (another image of the same head: the session's T1w's).
    """
    rotation = _rotation(rng, MAX_ROTATION_DEG)
    drawn_scale = 1.0 + rng.uniform(-MAX_SCALE, MAX_SCALE)  # drawn either way: the stream stays the same
    scale = drawn_scale if scale is None else scale
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    voxel_mm = np.array([1.0, 1.0, slice_factor]) * space.voxel_mm
    shape = tuple(int(n) for n in np.round(NATIVE_FOV_MM / voxel_mm))
    affine = np.diag([*voxel_mm.tolist(), 1.0])
    affine[:3, 3] = shift + rng.uniform(-2.0, 2.0, 3) - voxel_mm * (np.array(shape) - 1) / 2.0
    scanner_to_mni = np.eye(4)
    scanner_to_mni[:3, :3] = rotation.T / scale
    scanner_to_mni[:3, 3] = space.brain_center_mm - rotation.T @ shift / scale
    to_template = np.linalg.inv(space.affine) @ scanner_to_mni @ affine
    return NativeGrid(shape=(shape[0], shape[1], shape[2]), affine=affine, to_template=to_template, scale=scale)


def resample_to_native(volume: np.ndarray, grid: NativeGrid) -> np.ndarray:
    """Trilinear resampling of a template-space volume onto ``grid`` (zero outside); float32, ``grid.shape``."""
    matrix, offset = grid.to_template[:3, :3], grid.to_template[:3, 3]
    return ndimage.affine_transform(volume, matrix, offset, output_shape=grid.shape, order=1, output=np.float32)


def acquire_mr(
    rng: np.random.Generator,
    space: TemplateSpace,
    image: np.ndarray,
    slice_factor: float = 1.0,
    scale: float | None = None,
) -> tuple[np.ndarray, NativeGrid]:
    """Pose, bias field and Rician noise applied to a template-space T1w, T2w or FLAIR.

    Args:
        slice_factor: the native grid's third axis is this many times thicker than the template's voxels.
        scale: the head size (None: drawn; a T2w or FLAIR takes its session's T1w's, the same head).

    Returns:
        (int16 volume of the native grid's shape, the native grid: ``.affine`` in scanner mm, ``.scale``).
    """
    grid = random_native_grid(rng, space, slice_factor, scale)
    native = resample_to_native(image, grid)
    unit_axes = [np.linspace(0.0, 1.0, n) for n in grid.shape]
    native *= np.exp(evaluate_field(random_field_coefficients(rng, 3, 0.08), unit_axes))
    sigma = np.float32(NOISE_FRACTION * WM_REFERENCE)
    real = native + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    return np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16), grid


def acquire_pet(rng: np.random.Generator, space: TemplateSpace, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scanner blur (``PET_FWHM_MM``), a pose of its own and Gaussian noise for a template-space FDG image.

    Returns:
        (float32 volume in Bq/mL on the native grid, (4, 4) affine in scanner mm).
    """
    blurred = ndimage.gaussian_filter(image, PET_FWHM_MM / 2.3548 / space.voxel_mm)
    grid = random_native_grid(rng, space)
    native = resample_to_native(blurred, grid)
    native += np.float32(0.02 * PET_BQ_PER_ML) * rng.standard_normal(grid.shape, dtype=np.float32)
    return np.clip(native, 0.0, None), grid.affine


def nifti_bytes(data: np.ndarray, affine: np.ndarray, xform_code: int) -> bytes:
    """Gzipped NIfTI-1 bytes with no timestamp, so equal inputs give equal files.

    Args:
        data: 3D volume; its dtype is stored as is (no scaling).
        affine: (4, 4) voxel → mm, written to both sform and qform.
        xform_code: 1 for scanner space, 4 for MNI152 template space.
    """
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=xform_code)
    image.set_qform(affine, code=xform_code)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
