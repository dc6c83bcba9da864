"""Quality control of images in template space: agreement with the template and intensity statistics.

Every figure is computed inside the template's brain mask (:func:`brain_mask`) on the cropped grid:

- ``correlation_to_template``: Pearson correlation of the image with the template.
- ``smoothed_correlation_to_template``: the same after Gaussian smoothing of both images (sigma
  ``QC_SMOOTHING_MM``), which discounts anatomical differences an affine cannot remove (sulci, brain edges)
  and keeps misregistrations.
- ``nmi_to_template``: normalised mutual information (H(image) + H(template)) / H(image, template) of the
  smoothed images over ``NMI_BINS`` x ``NMI_BINS`` bins: 1 for independent images, 2 when one determines
  the other. It does not assume that the two images share a contrast, so it is the figure for PET.
- ``intensity_mean``, ``intensity_std``, ``intensity_p01``, ``intensity_p99``: the image's intensities
  (N4-corrected scanner units for T1w, SUVR for PET).

Pass/fail (:func:`qc_passes`, :func:`qc_rule`): a T1w passes when ``smoothed_correlation_to_template >=
MIN_T1W_CORRELATION``, a PET when ``nmi_to_template >= MIN_PET_NMI``. The rules catch gross failures (a
shift of 5 mm or a rotation of 10° and more), not subtle ones: look at the report's overlays. Calibration
on this project's synthetic 1 mm data (``bids_app.synthetic.dataset``, ``preset="realistic"``, 4 participants);
no real scans were available, so both thresholds, the PET one in particular, are provisional:

==============================================  ===========  ===========  ===================
image                                           raw corr.    smoothed     NMI
==============================================  ===========  ===========  ===================
T1w: template at a random pose, bias, noise     0.95         0.96         1.32
T1w: synthetic participants after t1-linear     0.67-0.77    0.80-0.89    1.13-1.19
T1w: one of them shifted 5 mm / rotated 10°     0.42 / 0.38  0.64 / 0.57  1.06 / 1.06
FDG PET after pet-linear                        -            -            1.10
FDG PET shifted 3 mm / 5 mm / rotated 10°       -            -            1.07 / 1.05 / 1.05
==============================================  ===========  ===========  ===================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

MIN_T1W_CORRELATION = 0.70
MIN_PET_NMI = 1.06
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


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long 1D arrays; 0.0 when either is constant."""
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


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
    joint = np.bincount(_bin_indices(a, n_bins) * n_bins + _bin_indices(b, n_bins), minlength=n_bins * n_bins)
    joint = joint.reshape(n_bins, n_bins)
    h_joint = _entropy(joint)
    if h_joint == 0:
        return 1.0
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / h_joint


def _smooth(volume: np.ndarray, grid: nib.Nifti1Image) -> np.ndarray:
    """Gaussian smoothing with sigma ``QC_SMOOTHING_MM`` (converted to voxels of ``grid``)."""
    from scipy import ndimage

    sigma = QC_SMOOTHING_MM / np.linalg.norm(np.asarray(grid.affine)[:3, :3], axis=0)
    return np.asarray(ndimage.gaussian_filter(volume, sigma, mode="constant"), dtype=np.float32)


def compute_qc(image: nib.Nifti1Image, template_crop: nib.Nifti1Image) -> dict[str, float]:
    """QC figures of a template-space image (keys: ``QC_KEYS``; see the module docstring).

    Args:
        image: preprocessed image on the same grid as ``template_crop`` (X, Y, Z).
        template_crop: the template cut to the same box.

    Raises:
        ValueError: the two images differ in shape (a programming error: both come from the same crop).
    """
    if image.shape[:3] != template_crop.shape[:3]:
        raise ValueError(f"image shape {image.shape} differs from the template crop's {template_crop.shape}")
    mask = brain_mask(template_crop)
    volume = np.asarray(image.dataobj, dtype=np.float32).reshape(template_crop.shape[:3])
    template = np.asarray(template_crop.dataobj, dtype=np.float32)
    values, reference = volume[mask], template[mask]
    if values.size == 0:
        logger.warning("The template crop has no brain voxel: QC figures set to 0")
        return dict.fromkeys(QC_KEYS, 0.0)
    p01, p99 = np.percentile(values, [1, 99])
    smoothed, smoothed_template = _smooth(volume, template_crop), _smooth(template, template_crop)
    return {
        "correlation_to_template": round(correlation(values, reference), 6),
        "smoothed_correlation_to_template": round(correlation(smoothed[mask], smoothed_template[mask]), 6),
        "nmi_to_template": round(normalized_mutual_information(smoothed[mask], smoothed_template[mask]), 6),
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_p01": float(p01),
        "intensity_p99": float(p99),
    }


def qc_rule(suffix: str) -> tuple[str, float]:
    """The QC key and minimum value deciding pass/fail for an image of ``suffix`` (``"T1w"`` or ``"pet"``)."""
    if suffix == "pet":
        return "nmi_to_template", MIN_PET_NMI
    return "smoothed_correlation_to_template", MIN_T1W_CORRELATION


def qc_passes(qc: Mapping[str, float], suffix: str = "T1w") -> bool:
    """The pass/fail rule: T1w needs ``smoothed_correlation_to_template >= MIN_T1W_CORRELATION``; PET
    (``suffix == "pet"``) needs ``nmi_to_template >= MIN_PET_NMI``. A missing or non-finite figure fails."""
    key, threshold = qc_rule(suffix)
    value = qc.get(key)
    return isinstance(value, int | float) and bool(np.isfinite(value)) and value >= threshold
