"""t2-linear / flair-linear: a raw T2w or FLAIR brought to the template through the session's T1w.

The contrast is N4 bias-corrected (as t1-linear does for the T1w), registered rigidly to the participant's raw
T1w of the same session with Mattes mutual information (which does not need the two images to share a
contrast: CSF is bright on T2w and dark on T1w), and that rigid transform composed with t1-linear's
T1w → template affine is applied in one linear resampling onto the template grid, which is then cropped like
the T1w. One resampling keeps the image as sharp as the T1w's; registering the contrast to the template
directly would fit a T1-weighted template with a T2-weighted image.

Intensities stay N4-corrected scanner units (no normalisation here; extraction normalises per image).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from bids_app.config import PreprocessConfig
from bids_app.preprocess.nifti_checks import load_checked_nifti
from bids_app.preprocess.qc import compute_qc
from bids_app.preprocess.t1_linear import (
    correct_bias,
    crop_box,
    crop_image,
    import_ants,
    load_template,
    register_through_t1w,
    require_t1_transform,
    to_ants,
)

logger = logging.getLogger(__name__)

PIPELINE_NAMES = {"T2w": "t2-linear", "FLAIR": "flair-linear"}
# The preprocessed image's sidecar Description, by contrast.
DESCRIPTIONS = {
    suffix: f"{name}: N4 bias correction, rigid registration (Mattes mutual information) to the session's raw T1w, "
    "composed with that T1w's affine to the template (t1-linear), one linear resampling onto the template grid, "
    "crop"
    for suffix, name in PIPELINE_NAMES.items()
}


@dataclass(frozen=True)
class AnatLinearResult:
    """What :func:`run_anat_linear` returns.

    Attributes:
        image: float32 image on the cropped template grid (N4-corrected intensities, scanner units).
        qc: :func:`bids_app.preprocess.qc.compute_qc` figures plus ``seconds`` (wall time of the run).
        transform_path: the rigid contrast → T1w ANTs ``.mat`` in the work folder.
    """

    image: nib.Nifti1Image
    qc: dict[str, float]
    transform_path: Path


def run_anat_linear(
    image_path: Path,
    suffix: str,
    t1w_path: Path,
    t1_transform_path: Path,
    cfg: PreprocessConfig,
    work_dir: Path,
    *,
    omp_nthreads: int = 1,
) -> AnatLinearResult:
    """N4, rigid registration to the session's T1w, the T1w's affine to the template, one resampling, crop.

    Args:
        image_path: raw T2w or FLAIR of the same session as ``t1w_path`` (any pose, voxel size 0.1–10 mm).
        suffix: ``"T2w"`` or ``"FLAIR"`` (names the image in messages and the work folder).
        t1w_path: the raw T1w that ``t1_transform_path`` was computed from.
        t1_transform_path: t1-linear's T1w → template ANTs affine ``.mat``.
        cfg: template, crop shape and N4 shrink factor.
        work_dir: the rigid transform goes to ``work_dir/<t2|flair>_linear/<image stem>/`` (created).
        omp_nthreads: ITK threads; 1 gives bit-identical results run after run.

    Returns:
        The image on the cropped template grid, its QC figures and the contrast → T1w transform.

    Raises:
        InputMissingError, DataError: an input is missing or unusable (see ``load_checked_nifti``).
    """
    start = time.perf_counter()
    ants = import_ants(omp_nthreads)
    t1_transform_path = require_t1_transform(t1_transform_path, t1w_path)
    template = load_template(cfg)
    moving = correct_bias(to_ants(load_checked_nifti(image_path, kind=suffix), ants), cfg.n4_shrink_factor, ants)
    name = Path(image_path).name.removesuffix(".gz").removesuffix(".nii")
    prefix = Path(work_dir) / PIPELINE_NAMES[suffix].replace("-", "_") / name / f"{suffix}_to_T1w_"
    image, rigid = register_through_t1w(moving, t1w_path, t1_transform_path, template, cfg.crop_shape, prefix, ants)
    box = crop_box(template, cfg.crop_shape)
    qc = compute_qc(image, crop_image(template, box))
    qc["seconds"] = round(time.perf_counter() - start, 2)
    logger.info(
        "%s %s: %.1f s, through T1w %s; NMI to template %.3f",
        PIPELINE_NAMES[suffix],
        Path(image_path).name,
        qc["seconds"],
        Path(t1w_path).name,
        qc["nmi_to_template"],
    )
    return AnatLinearResult(image=image, qc=qc, transform_path=rigid)
