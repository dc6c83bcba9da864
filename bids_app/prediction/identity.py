"""Anatomical fingerprints: the same person under two names, found from the preprocessed images alone.

An ID or checksum check cannot see that participant ``sub-A`` of one cohort is ``sub-B`` of another (the
ClinicaDL paper's OASIS-1 / OASIS-3 example): the scans differ by noise, bias, head pose and time. What they
share is the person's anatomy, which in template space after an affine registration is the part of the image
that the population does not share. The fingerprint of a preprocessed image is therefore:

1. the image block-averaged to about ``FINGERPRINT_MM`` (8 mm): noise, interpolation and the last millimetre of
   registration error average out, the shape of ventricles, sulci and brain outline stays;
2. minus its Gaussian smoothing at ``HIGH_PASS_MM`` (16 mm): what is left of a bias field after N4 goes;
3. scaled per image (99th percentile inside the pool's brain mask, then z-scored there), so scanner units and
   N4 scaling do not matter;
4. minus the training pool's mean fingerprint (the template and the shared disease pattern), then scaled to
   unit length: two fingerprints compare by their dot product, a correlation in [-1, 1].

Calibration (``calibrate``): on the training pool itself, the similarities of every pair of DIFFERENT
participants give the largest value two different people reach (``max_different``) and its spread
(``sd_different``); pairs of sessions of the SAME participant give the smallest value one person reaches
(``min_same``). Each pair is scored as a new image would be (the image left out of the pool's mean, see
``calibrate``). The threshold is half-way between the two, ``(max_different + min_same) / 2``: above every
pair of different people of the pool, with a margin for the larger number of pairs a new group makes with the
pool (the maximum over more pairs of strangers grows), and below every re-scan the pool shows. A pool with one
session per person gives no ``min_same``: the threshold is then ``max_different + sd_different``. When
``min_same <= max_different`` the fingerprints do not separate this pool's people, the threshold is
``max_different`` and a warning says that re-scans may be missed.

Measured with ``calibrate`` on the synthetic data (``bids_app.synthetic.dataset``, ``tiny`` preset, 10 participants x
2 sessions): after t1-linear, same person at least 0.53, different people at most 0.31 (mean 0.00, sd 0.10),
threshold 0.42; template-space derivative images (no noise): same person 1.00, different people at most 0.38
(sd 0.15), threshold 0.69.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_app.errors import DataError

log = logging.getLogger(__name__)

FINGERPRINT_MM = 8.0
HIGH_PASS_MM = 16.0
BRAIN_FRACTION = 0.2  # brain: pool mean above this fraction of the images' 99th percentile
BLOCK_ROWS = 512  # group x pool pairs are scored in blocks of rows: memory O(BLOCK_ROWS x pool size)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The training pool's own similarity figures and the threshold derived from them (module docstring)."""

    threshold: float
    max_different: float
    mean_different: float
    sd_different: float
    min_same: float | None  # None: no participant has two sessions in the pool
    n_different_pairs: int
    n_same_pairs: int
    separable: bool


@dataclasses.dataclass(frozen=True)
class FingerprintModel:
    """What the pool fixes: brain mask on the low-resolution grid and the pool's mean z-scored image.

    Attributes:
        mask: (x, y, z) bool, low-resolution grid.
        mean: (n_mask,) float64 mean of the pool's z-scored images inside ``mask``.
    """

    mask: np.ndarray
    mean: np.ndarray


def preprocessed_image_path(tensor_path: Path) -> Path | None:
    """The preprocessed NIfTI a tensor was cut from (its sidecar's ``Source``, relative to the output root)."""
    from bids_app.derivatives import sidecar_path

    try:
        source = json.loads(sidecar_path(Path(tensor_path)).read_text(encoding="utf-8")).get("Source")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str) or not source:
        return None
    for root in Path(tensor_path).parents:
        if (root / source).is_file():
            return root / source
    return None


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    x, y, z = (max(n // factor, 1) for n in volume.shape[:3])
    cropped = volume[: x * factor, : y * factor, : z * factor]
    return cropped.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5), dtype=np.float64)


def lowres_volume(path: Path) -> np.ndarray:
    """A preprocessed image block-averaged to about ``FINGERPRINT_MM`` (the factor is rounded to an integer).

    Returns:
        (x, y, z) float32, in the image's intensity units.

    Raises:
        DataError: the file cannot be read as a 3D image.
    """
    import nibabel as nib

    try:
        image = nib.Nifti1Image.from_filename(path)
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"Cannot read preprocessed image {path} for its fingerprint: {exc}. Re-run its participant."
        ) from exc
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise DataError(f"Preprocessed image {path} has shape {volume.shape}, not 3D. Re-run its participant.")
    voxel_mm = float(np.mean(image.header.get_zooms()[:3]))
    factor = max(1, round(FINGERPRINT_MM / voxel_mm))
    return _block_mean(np.nan_to_num(volume), factor).astype(np.float32)


def _scaled(volumes: np.ndarray) -> np.ndarray:
    """Each volume divided by its 99th percentile (1 where that is not positive)."""
    scale = np.percentile(volumes.reshape(len(volumes), -1), 99, axis=1)
    scale[scale <= 0] = 1.0
    return volumes / scale.reshape(-1, *([1] * (volumes.ndim - 1)))


def _zscored(volumes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """High-pass each volume (``HIGH_PASS_MM``), then z-score it inside ``mask``: ``(n, n_mask)`` float64."""
    from scipy import ndimage

    sigma = HIGH_PASS_MM / FINGERPRINT_MM  # in low-resolution voxels
    values = np.stack([(v - ndimage.gaussian_filter(v, sigma, mode="nearest"))[mask] for v in _scaled(volumes)])
    values -= values.mean(axis=1, keepdims=True)
    sd = values.std(axis=1, keepdims=True)
    sd[sd <= 0] = 1.0
    return values / sd


def fit_model(volumes: np.ndarray) -> FingerprintModel:
    """The pool's brain mask and mean from its low-resolution volumes ``(n, x, y, z)``."""
    mask = _scaled(volumes).mean(axis=0) > BRAIN_FRACTION
    return FingerprintModel(mask=mask, mean=_zscored(volumes, mask).mean(axis=0))


def features(volumes: np.ndarray, model: FingerprintModel) -> np.ndarray:
    """High-passed, z-scored values ``(n, n_mask)`` of low-resolution volumes ``(n, x, y, z)``, before the
    pool's mean is removed.

    Raises:
        DataError: the volumes are not on the pool's low-resolution grid.
    """
    if volumes.shape[1:] != model.mask.shape:
        raise DataError(
            f"Images of the group are on a {volumes.shape[1:]} fingerprint grid, the training pool's on "
            f"{model.mask.shape}: they were preprocessed differently (template, crop or voxel size). Preprocess "
            "both with the same options."
        )
    return _zscored(volumes, model.mask)


def fingerprints(volumes: np.ndarray, model: FingerprintModel) -> np.ndarray:
    """Unit-length fingerprints ``(n, n_mask)`` float32: ``features`` minus the pool mean, normalised."""
    residual = features(volumes, model) - model.mean
    norm = np.linalg.norm(residual, axis=1, keepdims=True)
    norm[norm <= 0] = 1.0
    return (residual / norm).astype(np.float32)


def _left_out_scores(gram: np.ndarray, totals: np.ndarray, grand: float, row: int, left_out: np.ndarray) -> np.ndarray:
    """Similarities of image ``row`` with every pool image when the images ``left_out`` are not in the mean.

    With ``m`` the mean of the other images, ``sim(a, b) = (z_a - m).(z_b - m) / (|z_a - m| |z_b - m|)``,
    expanded on the Gram matrix ``gram = Z Z^T`` (``totals = gram.sum(1)``, ``grand = totals.sum()``).
    """
    n_kept = len(gram) - int(left_out.sum())
    dot_mean = (totals - gram[:, left_out].sum(axis=1)) / n_kept  # z_b . m for every b, (n,)
    mean_sq = (grand - 2.0 * totals[left_out].sum() + gram[np.ix_(left_out, left_out)].sum()) / n_kept**2
    norms_sq = np.clip(np.diag(gram) - 2.0 * dot_mean + mean_sq, 1e-12, None)
    numerator = gram[row] - dot_mean[row] - dot_mean + mean_sq
    return numerator / np.sqrt(norms_sq[row] * norms_sq)


def calibrate(values: np.ndarray, participant_ids: Sequence[str], session_ids: Sequence[str]) -> Calibration | None:
    """Similarity figures of the pool's own pairs and the threshold (module docstring); None below 2 people.

    Each pair is scored as a new image would be against the pool: for two different participants, image ``a``
    is left out of the mean with every image of its participant (a stranger is not in the pool); for two
    sessions of one participant, only image ``a`` is (a re-scan's other sessions are). Scoring the pool
    against its own full mean instead biases strangers by about ``-1 / (n_participants - 1)``.

    Args:
        values: (n, d) ``features`` of the pool's images (memory: an (n, n) float64 Gram matrix).
        participant_ids, session_ids: the images' ids, length n.
    """
    ids = np.asarray(participant_ids, dtype=object)
    sessions = np.asarray(session_ids, dtype=object)
    if len(set(ids)) < 2:
        return None
    gram = values @ values.T
    totals = gram.sum(axis=1)
    grand = float(totals.sum())
    different_scores: list[np.ndarray] = []
    same_scores: list[np.ndarray] = []
    for row in range(len(values)):
        person = ids == ids[row]
        different_scores.append(_left_out_scores(gram, totals, grand, row, person)[~person])
        only_row = np.arange(len(values)) == row
        other_sessions = person & (sessions != sessions[row])
        if other_sessions.any():
            same_scores.append(_left_out_scores(gram, totals, grand, row, only_row)[other_sessions])
    different = np.concatenate(different_scores)
    same = np.concatenate(same_scores) if same_scores else np.zeros(0)
    max_diff, mean, sd = float(different.max()), float(different.mean()), float(different.std())
    min_same = float(same.min()) if same.size else np.inf
    gap = min_same - max_diff
    margin = sd if not same.size else max(0.0, gap / 2.0)
    if gap <= 0:
        log.warning(
            "Identity fingerprints: sessions of one participant (min %.3f) are no more alike than two different "
            "participants (max %.3f) in this training pool; re-scans under new names may be missed.",
            min_same,
            max_diff,
        )
    return Calibration(
        threshold=round(max_diff + margin, 6),
        max_different=round(max_diff, 6),
        mean_different=round(mean, 6),
        sd_different=round(sd, 6),
        min_same=round(min_same, 6) if same.size else None,
        n_different_pairs=int(different.size) // 2,
        n_same_pairs=int(same.size) // 2,
        separable=bool(gap > 0),
    )


def matching_pairs(group: np.ndarray, pool: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """``(group row, pool row, similarity)`` of every pair more alike than ``threshold``, most alike first."""
    found: list[tuple[int, int, float]] = []
    for start in range(0, len(group), BLOCK_ROWS):
        scores = group[start : start + BLOCK_ROWS].astype(np.float64) @ pool.T.astype(np.float64)
        for i, j in zip(*np.nonzero(scores > threshold), strict=True):
            found.append((start + int(i), int(j), round(float(scores[i, j]), 6)))
    return sorted(found, key=lambda t: (-t[2], t[0], t[1]))
