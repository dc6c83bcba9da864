"""Quality control of images in template space: agreement with the template and intensity statistics.

Every figure is computed inside the template's brain mask (:func:`brain_mask`) on the cropped grid:

- ``correlation_to_template``: Pearson correlation of the image with the template.
- ``smoothed_correlation_to_template``: the same after Gaussian smoothing of both images (sigma
  ``QC_SMOOTHING_MM``), which discounts anatomical differences an affine cannot remove (sulci, brain edges)
  and keeps misregistrations. On grids finer than ``QC_SMOOTHING_MM`` (1 mm) both images are first averaged
  over blocks of ``k`` voxels per axis (``k = floor(QC_SMOOTHING_MM / voxel size)``, 2 at 1 mm) and smoothed
  on that grid by what the block mean leaves of the same sigma, over the blocks mostly inside the brain mask:
  8 times fewer voxels to smooth (the QC of one 1 mm image costs 0.1 s, not 0.6 s) for the same figure, within
  0.006 of the 1 mm computation on the synthetic data (0.886/0.889 for a good image, 0.705/0.711 shifted 5 mm,
  0.629/0.635 rotated 10°; NMI 1.207/1.210, 1.090/1.092, 1.072/1.073), far from the pass/fail thresholds'
  margins. Grids at 2 mm and coarser are smoothed as they are.
- ``nmi_to_template``: normalised mutual information (H(image) + H(template)) / H(image, template) of the
  smoothed images over ``NMI_BINS`` x ``NMI_BINS`` bins: 1 for independent images, 2 when one determines
  the other. It does not assume that the two images share a contrast, so it is the figure for PET.
- ``intensity_mean``, ``intensity_std``, ``intensity_p01``, ``intensity_p99``: the image's intensities
  (N4-corrected scanner units for T1w, SUVR for PET).

Pass/fail (:func:`qc_passes`, :func:`qc_rule`): a T1w passes when ``smoothed_correlation_to_template >=
MIN_T1W_CORRELATION``, a PET when ``nmi_to_template >= MIN_PET_NMI``, a T2w or FLAIR (``--contrasts``) when
``nmi_to_template >= MIN_CONTRAST_NMI`` (a well registered T2w correlates negatively with the T1 template). The
rules catch gross failures (a shift of 5 mm or a rotation of 10° and more), not subtle ones: look at the report's
overlays. Calibration on this project's synthetic 1 mm data (``bids_app.synthetic.dataset``, ``preset="realistic"``,
4 participants; T2w/FLAIR: 2, ``contrasts=("T2w", "FLAIR")``); no real scans were available, so the thresholds, the
PET and T2w/FLAIR ones in particular, are provisional. On the 4 mm ``tiny`` preset the NMI of a registered T2w is
lower (1.04-1.08, mostly below the threshold); its FLAIR scores 1.10-1.11:

==============================================  ===========  ===========  ===================
image                                           raw corr.    smoothed     NMI
==============================================  ===========  ===========  ===================
T1w: template at a random pose, bias, noise     0.95         0.96         1.32
T1w: synthetic participants after t1-linear     0.67-0.77    0.80-0.89    1.13-1.19
T1w: one of them shifted 5 mm / rotated 10°     0.42 / 0.38  0.64 / 0.57  1.06 / 1.06
FDG PET after pet-linear                        -            -            1.10
FDG PET shifted 3 mm / 5 mm / rotated 10°       -            -            1.07 / 1.05 / 1.05
T2w / FLAIR after t2-/flair-linear (2 each)     -            -            1.12-1.13 / 1.11-1.13
T2w shifted 3 mm / 5 mm / rotated 10°           -            -            1.08-1.10 / 1.05-1.06 / 1.05
FLAIR shifted 3 mm / 5 mm / rotated 10°         -            -            1.07-1.09 / 1.05 / 1.04-1.05
==============================================  ===========  ===========  ===================
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np

from bids_app.kinds import CUSTOM_NAME

logger = logging.getLogger(__name__)

MIN_T1W_CORRELATION = 0.70
MIN_PET_NMI = 1.06
MIN_CONTRAST_NMI = 1.07  # T2w, FLAIR: their contrast is not the T1 template's, so correlation cannot judge them
CONTRAST_SUFFIXES = ("T2w", "FLAIR")
# --custom-map maps (any contrast: NMI, like PET). nilearn's 2009a GM probability map on the template crop: NMI
# 1.22 in place, 1.06 shifted 5 mm, 1.02 shifted 10 mm (its correlation to the T1 template is -0.38 in place).
MIN_MAP_NMI = 1.06
NMI_BINS = 16
BRAIN_FRACTION = 0.1  # brain voxels: template above this fraction of its 99th percentile
QC_SMOOTHING_MM = 2.0
QC_KEYS = (
    "correlation_to_template",
    "smoothed_correlation_to_template",
    "nmi_to_template",
    "intensity_mean",
    "intensity_std",
    "intensity_p01",
    "intensity_p99",
)


def brain_mask(template_img: nib.Nifti1Image) -> np.ndarray:
    """Brain voxels of a skull-stripped template: intensity above ``BRAIN_FRACTION`` of its 99th percentile.

    Returns:
        (X, Y, Z) bool array on the template's grid.
    """
    data = np.asarray(template_img.dataobj, dtype=np.float32)
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    return np.asarray(data > BRAIN_FRACTION * float(np.percentile(positive, 99)))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two equally long 1D float64 arrays, summed by numpy in this thread.

    Why not ``np.dot``: it calls the multi-threaded BLAS, whose threads keep spinning after each call. With one
    worker per core they only compete with the other workers (a 1 mm image's QC cost 0.03 s more CPU under load),
    and the BLAS splits the sum by its thread count, so the figures' last bits depended on the machine's cores.
    """
    return float(np.einsum("i,i->", a, b))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long 1D arrays; 0.0 when either is constant."""
    centred_b = b.astype(np.float64) - b.mean()
    return _correlation_with(a, centred_b, float(np.sqrt(_dot(centred_b, centred_b))))


def _correlation_with(a: np.ndarray, centred_b: np.ndarray, norm_b: float) -> float:
    """Pearson correlation of ``a`` with a reference given centred (float64) and by its norm."""
    centred_a = a.astype(np.float64) - a.mean()
    denominator = float(np.sqrt(_dot(centred_a, centred_a))) * norm_b
    return float(_dot(centred_a, centred_b) / denominator) if denominator > 0 else 0.0


def _bin_indices(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 of each value, over its 0.5-99.5 percentile range (outliers go to the ends)."""
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        return np.zeros(values.shape, dtype=np.int64)
    scaled = (values.astype(np.float64) - low) / (high - low) * n_bins
    return np.clip(scaled.astype(np.int64), 0, n_bins - 1)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, n_bins: int = NMI_BINS) -> float:
    """(H(a) + H(b)) / H(a, b) of two equally long 1D arrays, in [1, 2]; 1.0 when either is constant."""
    return _nmi_with(a, _bin_indices(b, n_bins), n_bins)


def _nmi_with(a: np.ndarray, bins_b: np.ndarray, n_bins: int) -> float:
    """:func:`normalized_mutual_information` of ``a`` with a reference given by its bin indices."""
    joint = np.bincount(_bin_indices(a, n_bins) * n_bins + bins_b, minlength=n_bins * n_bins)
    joint = joint.reshape(n_bins, n_bins)
    h_joint = _entropy(joint)
    if h_joint == 0:
        return 1.0
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / h_joint


def smoothing_blocks(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """How the smoothed figures are computed on a grid with this ``affine``: voxels per block along each axis
    (``floor(QC_SMOOTHING_MM / voxel size)``, at least 1) and the Gaussian sigma left to apply on the block grid
    (in blocks), so that block mean then Gaussian smooth by ``QC_SMOOTHING_MM`` in all (the variances add: a mean
    over ``k`` voxels of size ``v`` has variance ``(k**2 - 1) v**2 / 12``)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    blocks = [max(1, int(QC_SMOOTHING_MM / v + 1e-9)) for v in sizes]
    sigmas = [
        float(np.sqrt(max(QC_SMOOTHING_MM**2 - (k * k - 1) * v * v / 12, 0.0)) / (k * v))
        for k, v in zip(blocks, sizes, strict=True)
    ]
    return (blocks[0], blocks[1], blocks[2]), (sigmas[0], sigmas[1], sigmas[2])


def block_mean(volume: np.ndarray, blocks: tuple[int, int, int]) -> np.ndarray:
    """Mean of ``volume`` (X, Y, Z) over blocks of ``blocks`` voxels; the last voxels of an axis that do not fill
    a block are left out. Returns float32 (X // bx, Y // by, Z // bz); ``volume`` itself for blocks (1, 1, 1)."""
    if blocks == (1, 1, 1):
        return np.asarray(volume, dtype=np.float32)
    ends = [n // k * k for n, k in zip(volume.shape, blocks, strict=True)]
    # the sum in the volume's own memory order (NIfTI data is Fortran-ordered): each strided view is read in order
    order: Literal["C", "F"] = "F" if volume.flags.f_contiguous and not volume.flags.c_contiguous else "C"
    total = np.zeros([n // k for n, k in zip(volume.shape, blocks, strict=True)], dtype=np.float32, order=order)
    for i, j, k in itertools.product(*(range(b) for b in blocks)):  # strided views: no copy of the volume
        total += volume[i : ends[0] : blocks[0], j : ends[1] : blocks[1], k : ends[2] : blocks[2]]
    return total / np.float32(blocks[0] * blocks[1] * blocks[2])


def _smooth(volume: np.ndarray, blocks: tuple[int, int, int], sigmas: tuple[float, float, float]) -> np.ndarray:
    """Block mean, then the Gaussian of :func:`smoothing_blocks` (zero outside the grid)."""
    from scipy import ndimage

    coarse = block_mean(volume, blocks)
    return np.asarray(ndimage.gaussian_filter(coarse, sigmas, mode="constant"), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class QcReference:
    """The template's side of every QC figure, computed once per template crop (a participant job holds one).

    Attributes:
        shape: the template crop's (X, Y, Z).
        mask: (X, Y, Z) bool, :func:`brain_mask` of the crop.
        centred: the template's values inside ``mask``, float64, minus their mean.
        norm: the Euclidean norm of ``centred``.
        blocks, sigmas: :func:`smoothing_blocks` of the crop's affine.
        smoothed_mask: the blocks at least half inside ``mask`` (block grid), where the smoothed figures are taken.
        smoothed_centred, smoothed_norm: as ``centred`` and ``norm``, of the smoothed template in ``smoothed_mask``.
        smoothed_bins: the NMI bin (0..NMI_BINS-1) of each of those smoothed template values.
    """

    shape: tuple[int, int, int]
    mask: np.ndarray
    centred: np.ndarray
    norm: float
    blocks: tuple[int, int, int]
    sigmas: tuple[float, float, float]
    smoothed_mask: np.ndarray
    smoothed_centred: np.ndarray
    smoothed_norm: float
    smoothed_bins: np.ndarray

    @classmethod
    def of(cls, template_crop: nib.Nifti1Image) -> QcReference:
        """The reference of ``template_crop`` (the template cut to the images' grid)."""
        template = np.asarray(template_crop.dataobj, dtype=np.float32)
        mask = brain_mask(template_crop)
        blocks, sigmas = smoothing_blocks(np.asarray(template_crop.affine))
        fraction = block_mean(mask.astype(np.float32), blocks)
        smoothed_mask = fraction >= 0.5
        if mask.any() and not smoothed_mask.any():  # a brain smaller than a block: any block touching it
            smoothed_mask = fraction > 0
        values = template[mask].astype(np.float64)
        centred = values - values.mean() if values.size else values
        smoothed = _smooth(template, blocks, sigmas)[smoothed_mask].astype(np.float64)
        smoothed_centred = smoothed - smoothed.mean() if smoothed.size else smoothed
        shape = tuple(int(n) for n in template.shape[:3])
        return cls(
            shape=(shape[0], shape[1], shape[2]),
            mask=mask,
            centred=centred,
            norm=float(np.sqrt(_dot(centred, centred))),
            blocks=blocks,
            sigmas=sigmas,
            smoothed_mask=smoothed_mask,
            smoothed_centred=smoothed_centred,
            smoothed_norm=float(np.sqrt(_dot(smoothed_centred, smoothed_centred))),
            smoothed_bins=_bin_indices(smoothed, NMI_BINS) if smoothed.size else np.zeros(0, dtype=np.int64),
        )


def compute_qc(
    image: nib.Nifti1Image, template_crop: nib.Nifti1Image, reference: QcReference | None = None
) -> dict[str, float]:
    """QC figures of a template-space image (keys: ``QC_KEYS``; see the module docstring).

    Args:
        image: preprocessed image on the same grid as ``template_crop`` (X, Y, Z).
        template_crop: the template cut to the same box.
        reference: ``QcReference.of(template_crop)``, computed here when not given (pass it when checking many
            images against one template: it holds the template's half of the work).

    Raises:
        ValueError: the two images differ in shape (a programming error: both come from the same crop).
    """
    if image.shape[:3] != template_crop.shape[:3]:
        raise ValueError(f"image shape {image.shape} differs from the template crop's {template_crop.shape}")
    reference = reference or QcReference.of(template_crop)
    volume = np.asarray(image.dataobj, dtype=np.float32).reshape(reference.shape)
    values = volume[reference.mask]
    if values.size == 0:
        logger.warning("The template crop has no brain voxel: QC figures set to 0")
        return dict.fromkeys(QC_KEYS, 0.0)
    p01, p99 = np.percentile(values, [1, 99])
    smoothed = _smooth(volume, reference.blocks, reference.sigmas)[reference.smoothed_mask]
    return {
        "correlation_to_template": round(_correlation_with(values, reference.centred, reference.norm), 6),
        "smoothed_correlation_to_template": round(
            _correlation_with(smoothed, reference.smoothed_centred, reference.smoothed_norm), 6
        ),
        "nmi_to_template": round(_nmi_with(smoothed, reference.smoothed_bins, NMI_BINS), 6),
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_p01": float(p01),
        "intensity_p99": float(p99),
    }


def qc_rule(suffix: str) -> tuple[str, float]:
    """The QC key and minimum value deciding pass/fail for an image of ``suffix`` (``"T1w"``, ``"T2w"``,
    ``"FLAIR"``, ``"pet"`` or a custom map's name)."""
    if suffix == "pet":
        return "nmi_to_template", MIN_PET_NMI
    if suffix in CONTRAST_SUFFIXES:
        return "nmi_to_template", MIN_CONTRAST_NMI
    if CUSTOM_NAME.match(suffix):  # a --custom-map's name (bids_app.kinds)
        return "nmi_to_template", MIN_MAP_NMI
    return "smoothed_correlation_to_template", MIN_T1W_CORRELATION


def qc_passes(qc: Mapping[str, float], suffix: str = "T1w") -> bool:
    """The pass/fail rule: T1w needs ``smoothed_correlation_to_template >= MIN_T1W_CORRELATION``; PET
    (``suffix == "pet"``) needs ``nmi_to_template >= MIN_PET_NMI``, T2w and FLAIR ``nmi_to_template >=
    MIN_CONTRAST_NMI``. A missing or non-finite figure fails."""
    key, threshold = qc_rule(suffix)
    value = qc.get(key)
    return isinstance(value, int | float) and bool(np.isfinite(value)) and value >= threshold
