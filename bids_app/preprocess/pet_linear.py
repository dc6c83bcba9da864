"""pet-linear: rigid PET → T1w registration composed with t1-linear's T1w → template affine, then SUVR.

The PET is registered rigidly (Mattes mutual information, which does not need matching contrasts) to the
participant's raw T1w of the same session; that transform and the T1w's template affine are applied in one
linear resampling onto the template grid, which is then cropped like the T1w. Intensities become SUVR:
PET divided by its mean inside a reference region, ``cfg.suvr_reference_mask`` (a binary mask on the
template grid or its crop; value > 0.5), or, when it is None, the template's whole brain mask
(:func:`bids_app.preprocess.qc.brain_mask`). Already preprocessed PET in an MNI152 space
(:func:`load_preprocessed_pet`) is brought onto the template grid by its world coordinates
(:mod:`bids_app.preprocess.template_space`) and gets the same SUVR normalisation, without any registration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.config import PreprocessConfig
from bids_app.errors import DataError
from bids_app.preprocess.nifti_checks import load_checked_nifti
from bids_app.preprocess.qc import brain_mask, compute_qc
from bids_app.preprocess.t1_linear import (
    crop_box,
    crop_image,
    import_ants,
    load_template,
    register_through_t1w,
    require_t1_transform,
    template_space_image,
    to_ants,
    to_crop_grid,
)
from bids_app.preprocess.template_space import Placement, TemplateGrid, load_preprocessed

logger = logging.getLogger(__name__)

PET_FINEST_LEVEL_MM = 2.0  # PET resolution (FWHM 4-8 mm) makes finer registration levels pointless


@dataclass(frozen=True)
class PetLinearResult:
    """What :func:`run_pet_linear` and :func:`load_preprocessed_pet` return.

    Attributes:
        image: float32 SUVR image on the cropped template grid.
        qc: :func:`bids_app.preprocess.qc.compute_qc` figures of the SUVR image, plus
            ``suvr_reference_mean`` (PET units inside the reference region) and ``seconds``.
        transform_path: the rigid PET → T1w ``.mat`` in the work folder; None for preprocessed input.
        placement: how a preprocessed PET was brought onto the template grid; None for pet-linear.
    """

    image: nib.Nifti1Image
    qc: dict[str, float]
    transform_path: Path | None = None
    placement: Placement | None = None


def normalize_suvr(
    pet_crop: nib.Nifti1Image, template_img: nib.Nifti1Image, cfg: PreprocessConfig, source: Path
) -> tuple[nib.Nifti1Image, float]:
    """Divide a PET on the cropped template grid by its mean inside the reference region.

    Args:
        pet_crop: PET (any units) on the cropped template grid.
        template_img: the full template (for the crop box and the default whole-brain reference).
        cfg: ``suvr_reference_mask`` (None: whole brain) and ``crop_shape``.
        source: the PET file, named in error messages.

    Returns:
        (SUVR image, reference mean in the PET's units).

    Raises:
        DataError: the reference mask is on another grid or empty, or the PET's mean there is not positive.
    """
    template_crop = crop_image(template_img, crop_box(template_img, cfg.crop_shape))
    if cfg.suvr_reference_mask is None:
        reference = brain_mask(template_crop)
        region = "the template's brain mask"
    else:
        mask_img = load_checked_nifti(cfg.suvr_reference_mask, kind="SUVR reference mask")
        what = f"SUVR reference mask {cfg.suvr_reference_mask}"
        fix = "Resample the mask to the template grid (nearest neighbour)"
        reference = np.asarray(to_crop_grid(mask_img, template_img, cfg, what, fix).dataobj) > 0.5
        region = f"reference mask {cfg.suvr_reference_mask}"
    data = np.asarray(pet_crop.dataobj, dtype=np.float32)
    if not reference.any():
        raise DataError(
            f"The SUVR {region} has no voxel inside the crop box. Use a binary mask (0/1) in template space "
            "covering the reference region (preprocess.suvr_reference_mask)."
        )
    mean = float(data[reference].mean())
    if not mean > 0:
        raise DataError(
            f"PET {source} has mean {mean:.4g} inside {region} after registration to the template: no signal "
            "to normalise by. Check the PET image (units, empty frames) and its registration to the T1w."
        )
    suvr = template_space_image(data / np.float32(mean), np.asarray(pet_crop.affine), pet_crop)
    return suvr, mean


def run_pet_linear(
    pet_path: Path,
    t1w_path: Path,
    t1_transform_path: Path,
    cfg: PreprocessConfig,
    work_dir: Path,
    *,
    omp_nthreads: int = 1,
) -> PetLinearResult:
    """Register a static PET to its T1w, bring it to the cropped template grid and normalise it to SUVR.

    Args:
        pet_path: static (3D) PET of the same session as ``t1w_path``.
        t1w_path: the raw T1w that ``t1_transform_path`` was computed from.
        t1_transform_path: t1-linear's T1w → template ANTs affine ``.mat``.
        cfg: template, crop shape and SUVR reference mask.
        work_dir: the rigid transform goes to ``work_dir/pet_linear/<PET stem>/`` (created).
        omp_nthreads: ITK threads; 1 gives bit-identical results run after run.

    Returns:
        SUVR image, QC figures and the PET → T1w transform.

    Raises:
        InputMissingError, DataError: an input is missing or unusable; no PET signal in the reference region.
    """
    start = time.perf_counter()
    ants = import_ants(omp_nthreads)
    t1_transform_path = require_t1_transform(t1_transform_path, t1w_path)
    template = load_template(cfg)
    moving_pet = to_ants(load_checked_nifti(pet_path, kind="pet"), ants)
    name = Path(pet_path).name.removesuffix(".gz").removesuffix(".nii")
    prefix = Path(work_dir) / "pet_linear" / name / "pet_to_T1w_"
    pet_crop, rigid = register_through_t1w(
        moving_pet, t1w_path, t1_transform_path, template, cfg.crop_shape, prefix, ants, finest_mm=PET_FINEST_LEVEL_MM
    )
    box = crop_box(template, cfg.crop_shape)
    suvr, reference_mean = normalize_suvr(pet_crop, template, cfg, Path(pet_path))
    qc = compute_qc(suvr, crop_image(template, box))
    qc["suvr_reference_mean"] = reference_mean
    qc["seconds"] = round(time.perf_counter() - start, 2)
    logger.info(
        "pet-linear %s: %.1f s, reference mean %.4g, NMI to template %.3f",
        Path(pet_path).name,
        qc["seconds"],
        reference_mean,
        qc["nmi_to_template"],
    )
    return PetLinearResult(image=suvr, qc=qc, transform_path=rigid)


def load_preprocessed_pet(
    path: Path, space: str | None, grid: TemplateGrid, template_img: nib.Nifti1Image, cfg: PreprocessConfig
) -> PetLinearResult:
    """An already preprocessed PET in a template space, brought onto the cropped template grid by its world
    coordinates (:func:`bids_app.preprocess.template_space.load_preprocessed`) and normalised to SUVR.

    Args:
        path: the PET file.
        space: its declared space (``space`` entity; None when its name has none).
        grid: the job's cropped template grid.
        template_img: the full template (SUVR reference region).
        cfg: crop shape and SUVR reference mask.

    Raises:
        InputMissingError, DataError: unreadable input, a space or affine that does not fit the template, or no
            signal in the reference region.
    """
    start = time.perf_counter()
    pet_crop, placement = load_preprocessed(path, space, grid, "Preprocessed PET", "pet")
    suvr, reference_mean = normalize_suvr(pet_crop, template_img, cfg, Path(path))
    qc = compute_qc(suvr, grid.crop)
    qc["suvr_reference_mean"] = reference_mean
    qc["seconds"] = round(time.perf_counter() - start, 2)
    return PetLinearResult(image=suvr, qc=qc, placement=placement)
