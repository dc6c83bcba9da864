"""Image synthesis for the synthetic dataset: subject anatomy, disease effect, native pose, noise, PET.

Images start from nilearn's MNI152 2009a symmetric template (1 mm, skull-stripped), block-averaged for coarser
presets (4 mm for ``tiny``). A subject is a smooth random deformation of the template with smooth intensity and
tissue-contrast changes, so subjects differ while their sessions share one anatomy. AD subjects lose grey-matter
intensity (PET: uptake) in a smooth region around both hippocampi (MNI ``(±26, -20, -14)`` mm) and have slightly
larger ventricles. Each session is then moved to its own native pose on a brain-centred field of view (RAS+
affine in scanner mm) with a smooth bias field and Rician noise. Smooth fields are low-frequency cosine (DCT)
bases over the template's box, evaluated as tensor products: cheap at 1 mm and identical on any grid.

Intensity units: template intensities (0-255) times ``INTENSITY_SCALE``; PET in Bq/mL.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_app.preprocess.template import default_template_path, default_tissue_path

HIPPOCAMPI_MM = ((-26.0, -20.0, -14.0), (26.0, -20.0, -14.0))
ROI_SIGMA_MM = np.array([7.0, 11.0, 7.0])  # elongated along the hippocampal (anterior-posterior) axis
VENTRICLES_MM = np.array([0.0, -10.0, 15.0])
VENTRICLE_SIGMA_MM = 20.0
NATIVE_FOV_MM = np.array([176.0, 208.0, 176.0])  # a common sagittal MPRAGE matrix at 1 mm
INTENSITY_SCALE = 4.0  # white matter ends near 900, well inside int16
WM_REFERENCE = 220.0 * INTENSITY_SCALE
NOISE_FRACTION = 0.012  # Rician sigma relative to white matter; background mean ~1.5 % of it
PET_FWHM_MM = 6.0
PET_BQ_PER_ML = 20000.0  # grey matter FDG concentration at about SUV 8
MAX_ROTATION_DEG = 8.0
MAX_SHIFT_MM = 10.0
MAX_SCALE = 0.05

Box = tuple[slice, slice, slice]

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
class TemplateSpace:
    """The template resampled to one voxel size (block average of the 1 mm grid).

    Attributes:
        voxel_mm: isotropic voxel size in mm (1, 2 or 4).
        affine: (4, 4) voxel → MNI mm, diagonal and positive (RAS+).
        t1: (X, Y, Z) float32 template intensities, 0-255, 0 outside the brain.
        gm: (X, Y, Z) float32 grey-matter probability, 0-1, zeroed outside the brain.
        wm: (X, Y, Z) float32 white-matter probability.
        roi_weight: (X, Y, Z) float32 in [0, 1], smooth atrophy weight around both hippocampi.
        brain_box: voxel box of the brain with a margin for the subject deformation.
        roi_box: voxel box where ``roi_weight`` is not negligible.
        brain_center_mm: (3,) centre of the brain's bounding box, MNI mm.
    """

    voxel_mm: int
    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    roi_weight: np.ndarray
    brain_box: Box
    roi_box: Box
    brain_center_mm: np.ndarray

    def axis_mm(self, axis: int) -> np.ndarray:
        """MNI coordinate (mm) of every voxel centre along ``axis``, shape (n,)."""
        return (self.affine[axis, 3] + self.affine[axis, axis] * np.arange(self.t1.shape[axis])).astype(np.float32)

    def roi_mask(self) -> np.ndarray:
        """Binary atrophy region (uint8, template grid): weight ≥ 0.5 inside the brain."""
        return ((self.roi_weight >= 0.5) & (self.t1 > 0)).astype(np.uint8)


@dataclass(frozen=True)
class SubjectAnatomy:
    """One subject's random parameters; images come from :func:`render_subject` on any template space.

    Attributes:
        deformation: (3, K, K, K) DCT coefficients of the displacement field, mm.
        intensity: (K, K, K) DCT coefficients of the relative intensity field.
        gm_gain: relative grey-matter contrast change (includes an age-related loss).
        wm_gain: relative white-matter contrast change.
        ventricle_gain: strength of the radial ventricle enlargement (AD), dimensionless.
        severity: AD grey-matter intensity loss at baseline (fraction, 0 for CN).
    """

    deformation: np.ndarray
    intensity: np.ndarray
    gm_gain: float
    wm_gain: float
    ventricle_gain: float
    severity: float

    def severity_at(self, years: float) -> float:
        """Atrophy fraction ``years`` after baseline: progresses by 10 % of the baseline value per year."""
        return min(self.severity * (1.0 + 0.1 * years), 0.95)


@dataclass(frozen=True)
class SubjectImages:
    """Template-space images of one subject: ``image(years) = base - severity_at(years) * loss``."""

    anatomy: SubjectAnatomy
    base: np.ndarray  # (X, Y, Z) float32
    loss: np.ndarray  # (X, Y, Z) float32, zero outside the atrophy region

    def at(self, years: float) -> np.ndarray:
        return self.base - np.float32(self.anatomy.severity_at(years)) * self.loss


@dataclass(frozen=True)
class NativeGrid:
    """A native acquisition grid: ``to_template`` maps native voxel indices to template voxel indices."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) native voxel → scanner mm, RAS+
    to_template: np.ndarray  # (4, 4)


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return volume.astype(np.float32)
    x, y, z = (n // factor for n in volume.shape)
    cropped = volume[: x * factor, : y * factor, : z * factor].astype(np.float32)
    return cropped.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last voxel index of ``mask`` along each axis, shapes (3,)."""
    hits = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    return np.array([h[0] for h in hits]), np.array([h[-1] for h in hits])


def _box(mask: np.ndarray, margin: int) -> Box:
    first, last = _bounds(mask)
    lo = np.maximum(first - margin, 0)
    hi = np.minimum(last + margin + 1, mask.shape)
    return (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))


@functools.cache
def load_template_space(voxel_mm: int) -> TemplateSpace:
    """The MNI152 2009a template and tissue maps block-averaged to ``voxel_mm`` (1 = as shipped)."""
    import nibabel as nib

    image = nib.Nifti1Image.from_filename(default_template_path())
    affine = np.array(image.affine, dtype=np.float64)
    affine[:3, :3] *= voxel_mm
    affine[:3, 3] += (voxel_mm - 1) / 2.0 * np.diag(image.affine)[:3]  # centre of each block
    t1 = _block_mean(np.asarray(image.dataobj), voxel_mm)
    brain = t1 > 0
    gm, wm = (
        _block_mean(np.asarray(nib.Nifti1Image.from_filename(default_tissue_path(t)).dataobj), voxel_mm) / 255.0 * brain
        for t in ("gm", "wm")
    )
    axes = [affine[a, 3] + affine[a, a] * np.arange(t1.shape[a]) for a in range(3)]
    weight = np.zeros(t1.shape, dtype=np.float32)
    for center in HIPPOCAMPI_MM:
        profiles = [np.exp(-0.5 * ((axes[a] - center[a]) / ROI_SIGMA_MM[a]) ** 2) for a in range(3)]
        weight += np.einsum("i,j,k->ijk", *profiles).astype(np.float32)
    weight = np.clip(weight, 0.0, 1.0)
    margin = int(np.ceil(8.0 / voxel_mm))
    first, last = _bounds(brain)
    center = affine[:3, :3] @ ((first + last) / 2.0) + affine[:3, 3]
    gm, wm = gm.astype(np.float32), wm.astype(np.float32)
    for array in (t1, gm, wm, weight):
        array.flags.writeable = False  # shared by every caller of this cache
    return TemplateSpace(
        voxel_mm=voxel_mm,
        affine=affine,
        t1=t1,
        gm=gm,
        wm=wm,
        roi_weight=weight,
        brain_box=_box(brain, margin),
        roi_box=_box(weight > 0.01, margin),
        brain_center_mm=center,
    )


def random_field_coefficients(rng: np.random.Generator, n_basis: int, rms: float) -> np.ndarray:
    """DCT coefficients (n_basis,)*3 of a zero-mean smooth field whose RMS over its box is ``rms``."""
    k = np.arange(n_basis)
    order = k[:, None, None] + k[None, :, None] + k[None, None, :]
    coefficients = rng.standard_normal((n_basis,) * 3) / (1.0 + order)
    coefficients[0, 0, 0] = 0.0
    # each non-constant cosine has mean square 1/2 over the box
    n_nonzero = (k[:, None, None] > 0).astype(int) + (k[None, :, None] > 0) + (k[None, None, :] > 0)
    current = np.sqrt(np.sum(coefficients**2 * 0.5**n_nonzero))
    return coefficients * (rms / current)


def evaluate_field(coefficients: np.ndarray, unit_axes: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluate a DCT field on a grid given per-axis coordinates scaled to [0, 1] over the field's box.

    Returns:
        float32 array of shape (len(unit_axes[0]), len(unit_axes[1]), len(unit_axes[2])).
    """
    k = np.arange(coefficients.shape[0])
    bases = [np.cos(np.pi * np.outer(k, np.asarray(u, dtype=np.float64))) for u in unit_axes]  # (K, n)
    field = np.tensordot(coefficients, bases[2], axes=(2, 0))  # (K, K, nz)
    field = np.einsum("abz,by->ayz", field, bases[1]).astype(np.float32)  # (K, ny, nz)
    return np.tensordot(bases[0].astype(np.float32), field, axes=(0, 0))  # (nx, ny, nz)


@functools.cache
def _template_extent_mm() -> tuple[np.ndarray, np.ndarray]:
    """MNI mm of the first and last voxel centres of the 1 mm template: the box of every smooth field."""
    import nibabel as nib

    image = nib.Nifti1Image.from_filename(default_template_path())  # header only: data stays on disk
    affine = image.affine
    return affine[:3, 3], affine[:3, :3] @ (np.array(image.shape[:3]) - 1.0) + affine[:3, 3]


def _template_unit_axes(space: TemplateSpace, box: Box) -> list[np.ndarray]:
    lo, hi = _template_extent_mm()
    return [(space.axis_mm(a)[box[a]] - lo[a]) / (hi[a] - lo[a]) for a in range(3)]


def random_subject(rng: np.random.Generator, severity: float, age: float) -> SubjectAnatomy:
    """Draw one subject's anatomy parameters; ``severity`` is 0 for cognitively normal subjects."""
    ageing = 0.004 * max(age - 60.0, 0.0)  # grey-matter intensity loss per year past 60
    return SubjectAnatomy(
        deformation=np.stack([random_field_coefficients(rng, 5, 2.0) for _ in range(3)]),
        intensity=random_field_coefficients(rng, 4, 0.03),
        gm_gain=float(rng.normal(0.0, 0.03)) - ageing,
        wm_gain=float(rng.normal(0.0, 0.03)),
        ventricle_gain=0.15 * severity,
        severity=severity,
    )


def _tissue(space: TemplateSpace, anatomy: SubjectAnatomy, modality: str, box: Box) -> tuple[np.ndarray, ...]:
    """The subject's undeformed image and its atrophy-prone part (full loss), both cropped to ``box``."""
    t1, gm, wm, weight = (v[box] for v in (space.t1, space.gm, space.wm, space.roi_weight))
    field = 1.0 + evaluate_field(anatomy.intensity, _template_unit_axes(space, box))
    if modality == "T1w":
        tissue = field * t1 * (1.0 + np.float32(anatomy.gm_gain) * gm + np.float32(anatomy.wm_gain) * wm)
        tissue *= np.float32(INTENSITY_SCALE)
        return tissue, tissue * gm * weight  # grey matter replaced by CSF: darker
    if modality == "pet":
        gm = field * gm * np.float32((1.0 + anatomy.gm_gain) * PET_BQ_PER_ML)
        rest = field * (0.3 * wm + 0.05 * (t1 > 0)) * np.float32((1.0 + anatomy.wm_gain) * PET_BQ_PER_ML)
        return gm + rest, gm * weight  # hypometabolism
    raise ValueError(f"modality must be 'T1w' or 'pet', got {modality!r}")


def _warp(volume: np.ndarray, space: TemplateSpace, anatomy: SubjectAnatomy, box: Box) -> np.ndarray:
    """Pull ``volume`` (cropped to ``box``) through the subject's deformation; full grid, zero outside ``box``."""
    unit_axes = _template_unit_axes(space, box)
    shape = volume.shape
    rel = [
        (space.axis_mm(a)[box[a]] - np.float32(VENTRICLES_MM[a])).reshape([-1 if b == a else 1 for b in range(3)])
        for a in range(3)
    ]
    radial = np.exp((rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) * np.float32(-0.5 / VENTRICLE_SIGMA_MM**2))
    coords = np.empty((3, *shape), dtype=np.float32)
    for a in range(3):
        displacement = evaluate_field(anatomy.deformation[a], unit_axes)
        # sampling closer to the ventricles' centre enlarges them
        displacement -= np.float32(anatomy.ventricle_gain) * rel[a] * radial
        displacement *= np.float32(1.0 / space.voxel_mm)
        displacement += np.arange(shape[a], dtype=np.float32).reshape([-1 if b == a else 1 for b in range(3)])
        coords[a] = displacement
    out = np.zeros(space.t1.shape, dtype=np.float32)
    out[box] = ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    return out


def render_subject(space: TemplateSpace, anatomy: SubjectAnatomy, modality: str = "T1w") -> SubjectImages:
    """Template-space T1w (template intensity × ``INTENSITY_SCALE``) or FDG (Bq/mL) images of a subject."""
    tissue = _tissue(space, anatomy, modality, space.brain_box)[0]
    lost = _tissue(space, anatomy, modality, space.roi_box)[1]
    base = _warp(tissue, space, anatomy, space.brain_box)
    loss = _warp(lost, space, anatomy, space.roi_box)
    return SubjectImages(anatomy=anatomy, base=base, loss=loss)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def random_native_grid(rng: np.random.Generator, space: TemplateSpace) -> NativeGrid:
    """A random head pose in scanner space and a brain-centred field of view of ``NATIVE_FOV_MM``.

    Scanner mm ``x = s R (y - c) + t`` for MNI mm ``y`` (``c``: brain centre); the grid centre sits at
    ``t`` give or take 2 mm, so the translation shows in the affine and the rotation in the voxels.
    """
    rotation = _rotation(rng, MAX_ROTATION_DEG)
    scale = 1.0 + rng.uniform(-MAX_SCALE, MAX_SCALE)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    voxel_mm = space.voxel_mm  # native voxels as large as the template's
    shape = tuple(int(n) for n in np.round(NATIVE_FOV_MM / voxel_mm))
    affine = np.diag([float(voxel_mm)] * 3 + [1.0])
    affine[:3, 3] = shift + rng.uniform(-2.0, 2.0, 3) - voxel_mm * (np.array(shape) - 1) / 2.0
    scanner_to_mni = np.eye(4)
    scanner_to_mni[:3, :3] = rotation.T / scale
    scanner_to_mni[:3, 3] = space.brain_center_mm - rotation.T @ shift / scale
    to_template = np.linalg.inv(space.affine) @ scanner_to_mni @ affine
    return NativeGrid(shape=(shape[0], shape[1], shape[2]), affine=affine, to_template=to_template)


def resample_to_native(volume: np.ndarray, grid: NativeGrid) -> np.ndarray:
    """Trilinear resampling of a template-space volume onto ``grid`` (zero outside); float32, ``grid.shape``."""
    matrix, offset = grid.to_template[:3, :3], grid.to_template[:3, 3]
    return ndimage.affine_transform(volume, matrix, offset, output_shape=grid.shape, order=1, output=np.float32)


def acquire_t1w(rng: np.random.Generator, space: TemplateSpace, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose, bias field and Rician noise applied to a template-space T1w.

    Returns:
        (int16 volume of the native grid's shape, (4, 4) affine in scanner mm).
    """
    grid = random_native_grid(rng, space)
    native = resample_to_native(image, grid)
    unit_axes = [np.linspace(0.0, 1.0, n) for n in grid.shape]
    native *= np.exp(evaluate_field(random_field_coefficients(rng, 3, 0.08), unit_axes))
    sigma = np.float32(NOISE_FRACTION * WM_REFERENCE)
    real = native + sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    return np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16), grid.affine


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
