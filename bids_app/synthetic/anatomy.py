"""Subject anatomy for the synthetic dataset: template space, subject deformation, disease effect, PET uptake.

Images start from nilearn's MNI152 2009a symmetric template (1 mm, skull-stripped), block-averaged for coarser
presets (4 mm for ``tiny``). A subject is a smooth random deformation of the template with smooth intensity and
tissue-contrast changes, so subjects differ while their sessions share one anatomy. AD subjects lose grey-matter
intensity (PET: uptake) in a smooth region around both hippocampi (MNI ``(±26, -20, -14)`` mm) and have slightly
larger ventricles. Smooth fields are low-frequency cosine (DCT) bases over the template's box, evaluated as tensor
products: cheap at 1 mm and identical on any grid. The scanner (native pose, bias field, noise, files) is
``synthetic_acquisition``.

Intensity units: template intensities (0-255) times ``INTENSITY_SCALE``; PET in Bq/mL.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_app.template import default_template_path, default_tissue_path

HIPPOCAMPI_MM = ((-26.0, -20.0, -14.0), (26.0, -20.0, -14.0))
ROI_SIGMA_MM = np.array([7.0, 11.0, 7.0])  # elongated along the hippocampal (anterior-posterior) axis
VENTRICLES_MM = np.array([0.0, -10.0, 15.0])
VENTRICLE_SIGMA_MM = 20.0
INTENSITY_SCALE = 4.0  # white matter ends near 900, well inside int16
PET_BQ_PER_ML = 20000.0  # grey matter FDG concentration at about SUV 8
# T2-weighted contrasts by tissue (CSF, grey matter, white matter), in template units (0-255) before
# INTENSITY_SCALE: T2w has bright CSF and white matter darker than grey matter; FLAIR suppresses CSF's signal.
CONTRAST_TISSUE_INTENSITIES = {"T2w": (240.0, 140.0, 95.0), "FLAIR": (25.0, 150.0, 110.0)}

Box = tuple[slice, slice, slice]


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
    if modality in CONTRAST_TISSUE_INTENSITIES:
        csf_level, gm_level, wm_level = (np.float32(v * INTENSITY_SCALE) for v in CONTRAST_TISSUE_INTENSITIES[modality])
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * (t1 > 0)
        gm_signal = field * gm * gm_level * np.float32(1.0 + anatomy.gm_gain)
        wm_signal = field * wm * wm_level * np.float32(1.0 + anatomy.wm_gain)
        tissue = gm_signal + wm_signal + field * csf * csf_level
        return tissue, (gm_signal - field * gm * csf_level) * weight  # grey matter replaced by CSF
    if modality == "pet":
        gm = field * gm * np.float32((1.0 + anatomy.gm_gain) * PET_BQ_PER_ML)
        rest = field * (0.3 * wm + 0.05 * (t1 > 0)) * np.float32((1.0 + anatomy.wm_gain) * PET_BQ_PER_ML)
        return gm + rest, gm * weight  # hypometabolism
    raise ValueError(f"modality must be 'T1w', 'T2w', 'FLAIR' or 'pet', got {modality!r}")


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
    """Template-space T1w (template intensity × ``INTENSITY_SCALE``), T2w or FLAIR (tissue levels of
    ``CONTRAST_TISSUE_INTENSITIES`` × ``INTENSITY_SCALE``) or FDG (Bq/mL) images of a subject."""
    tissue = _tissue(space, anatomy, modality, space.brain_box)[0]
    lost = _tissue(space, anatomy, modality, space.roi_box)[1]
    base = _warp(tissue, space, anatomy, space.brain_box)
    loss = _warp(lost, space, anatomy, space.roi_box)
    return SubjectImages(anatomy=anatomy, base=base, loss=loss)
