"""t1-linear: N4 bias-field correction, ANTs affine registration to the template, resampling and crop.

Reproducibility: ANTs samples the Mattes metric at random points, so every registration runs with the
fixed seed ``RANDOM_SEED`` (``ANTS_RANDOM_SEED``). ITK's multi-threaded metric sums in a scheduling-dependent
order, so bit-identical results need one thread (``omp_nthreads=1``, the default): with 2 threads two runs
differ by ~1e-4 mm in the affine. ITK reads its thread count (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``) once,
when ANTs is first imported, so the first call in a process fixes it (:func:`import_ants`).

The crop box (:func:`crop_box`) is centred on the bounding box of the template's brain and shifted inside
the template grid; the cropped image's affine encodes the offset, so masks on the full template grid align
by affine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np

from bids_app.config import PreprocessConfig
from bids_app.errors import ConfigError, DataError
from bids_app.preprocess.nifti_checks import describe_grid, load_checked_nifti, voxel_sizes
from bids_app.preprocess.qc import brain_mask, compute_qc
from bids_app.template import default_template_path

logger = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]

RANDOM_SEED = 20250101
ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
N4_ITERATIONS = (50, 50, 50, 50)  # ANTs' defaults: four fitting levels, 50 iterations each
N4_TOLERANCE = 1e-7
# Multi-resolution schedule of the affine registration at 1 mm (ANTs' defaults); scaled to the template's
# voxel size so a coarse template is not shrunk to a few voxels.
AFFINE_SHRINK_MM = (6, 4, 2, 1)
AFFINE_SMOOTHING_MM = (3.0, 2.0, 1.0, 0.0)
AFFINE_TOLERANCE_MM = 0.01  # preprocessed inputs: affine entries may differ by float32 header rounding only

_itk_threads: int | None = None  # the thread count ITK was started with in this process (None: unknown)


@dataclass(frozen=True)
class T1LinearResult:
    """What :func:`run_t1_linear` returns.

    Attributes:
        image: float32 image on the cropped template grid (N4-corrected intensities, scanner units).
        transform_path: ANTs affine ``.mat`` (native T1w → template) in the work folder.
        qc: :func:`bids_app.preprocess.qc.compute_qc` figures plus ``seconds`` (wall time of the run).
    """

    image: nib.Nifti1Image
    transform_path: Path
    qc: dict[str, float]


def load_template(cfg: PreprocessConfig) -> nib.Nifti1Image:
    """The registration template: ``cfg.template_path`` or nilearn's MNI152 2009a symmetric (1 mm).

    Returns:
        float32 3D image (checked like any input; a template must be skull-stripped: brain > 0, background 0).
    """
    return load_checked_nifti(cfg.template_path or default_template_path(), kind="template")


def crop_box(template_img: nib.Nifti1Image, crop_shape: tuple[int, int, int] | None) -> Box:
    """Voxel box of ``crop_shape`` centred on the template's brain bounding box, inside the template grid.

    Along each axis the box starts at ``floor(centre - (size - 1) / 2)``, ``centre`` being the middle of the
    brain's first and last voxel, so box and brain share their centre (to half a voxel). A box that sticks
    out of the grid is shifted back inside; it keeps its shape. The brain is ``qc.brain_mask(template_img)``.

    Raises:
        ConfigError: ``crop_shape`` is larger than the template along some axis, or not positive.
    """
    shape = tuple(int(n) for n in template_img.shape[:3])
    if crop_shape is None:
        return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    if any(c < 1 or c > n for c, n in zip(crop_shape, shape, strict=True)):
        raise ConfigError(
            f"crop_shape {tuple(crop_shape)} does not fit the template {describe_grid(shape, template_img.affine)}. "
            f"Choose a crop no larger than {shape} (preprocess.crop_shape), or 'none' to keep the full grid."
        )
    mask = brain_mask(template_img)
    if not mask.any():
        raise DataError(
            f"The template has no brain voxel (all values <= 0). Use a skull-stripped T1w template "
            f"(preprocess.template_path = {template_img.get_filename()})."
        )
    box = []
    for axis, (size, extent) in enumerate(zip(crop_shape, shape, strict=True)):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        centre2 = int(hits[0]) + int(hits[-1])  # twice the centre, to stay in integers
        start = min(max((centre2 - size + 1) // 2, 0), extent - size)
        box.append(slice(start, start + size))
    return (box[0], box[1], box[2])


def crop_image(img: nib.Nifti1Image, box: Box) -> nib.Nifti1Image:
    """``img`` cut to ``box``: float32 data in memory, affine shifted by the box's start (qform = sform)."""
    start = np.array([s.start for s in box], dtype=np.float64)
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    data = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32)[box])
    return template_space_image(data, affine, img)


def template_space_image(
    data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image, code: int | None = None
) -> nib.Nifti1Image:
    """A float32 NIfTI in template space, with ``code`` (default: ``like``'s sform code, 2 (aligned) when that
    is 0 or 1: the image is on a template grid, not in scanner space) in both sform and qform, units in mm."""
    if code is None:
        code = int(like.header["sform_code"])
        code = code if code > 1 else 2
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    out = nib.Nifti1Image(data.astype(np.float32, copy=False), affine, header)
    out.set_sform(affine, code=code)
    out.set_qform(affine, code=code)
    out.set_data_dtype(np.float32)
    return out


def import_ants(omp_nthreads: int = 1) -> ModuleType:
    """Import ANTsPy with ITK limited to ``omp_nthreads`` threads (only the first import can set it)."""
    global _itk_threads
    if omp_nthreads < 1:
        raise ConfigError(f"omp_nthreads must be at least 1, got {omp_nthreads}. Fix --omp-nthreads.")
    if "ants" not in sys.modules:
        os.environ[ITK_THREADS_ENV] = str(omp_nthreads)
        _itk_threads = omp_nthreads
    elif _itk_threads is None:
        _itk_threads = int(os.environ.get(ITK_THREADS_ENV, "0")) or None
    if _itk_threads != omp_nthreads:
        logger.warning(
            "ANTs was started with %s thread(s) in this process; %d requested. ITK keeps its first setting.",
            _itk_threads or "all",
            omp_nthreads,
        )
    import ants

    return ants


@contextlib.contextmanager
def seeded_ants() -> Iterator[None]:
    """Run ANTs with ``ANTS_RANDOM_SEED=RANDOM_SEED`` (restores the previous value afterwards)."""
    previous = os.environ.get("ANTS_RANDOM_SEED")
    os.environ["ANTS_RANDOM_SEED"] = str(RANDOM_SEED)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["ANTS_RANDOM_SEED"]
        else:
            os.environ["ANTS_RANDOM_SEED"] = previous


def to_ants(img: nib.Nifti1Image, ants: ModuleType) -> Any:
    """ANTs image (float32) with the same voxels and world coordinates as ``img`` (RAS mm → ITK's LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    return ants.from_numpy(data, origin=lps[:3, 3].tolist(), spacing=spacing.tolist(), direction=lps[:3, :3] / spacing)


def correct_bias(image: Any, shrink_factor: int, ants: ModuleType) -> Any:
    """N4 bias-field correction fitted on the image shrunk by ``shrink_factor``, inside a head mask.

    The mask is the voxels above the image mean (ANTs' ``get_mask`` rule): background noise, whose logarithm
    N4 would otherwise fit, is left out. Returns the corrected ANTs image (same grid).
    """
    if shrink_factor < 1:
        raise ConfigError(f"n4_shrink_factor must be at least 1, got {shrink_factor}. Fix preprocess.n4_shrink_factor.")
    array = image.numpy()
    head = image.new_image_like((array > array.mean()).astype(np.float32))
    return ants.n4_bias_field_correction(
        image,
        mask=head,
        shrink_factor=shrink_factor,
        convergence={"iters": list(N4_ITERATIONS), "tol": N4_TOLERANCE},
    )


def register_affine(
    fixed: Any,
    moving: Any,
    type_of_transform: str,
    out_prefix: Path,
    ants: ModuleType,
    *,
    finest_mm: float | None = None,
) -> Path:
    """Seeded ANTs linear registration of ``moving`` to ``fixed`` (Mattes MI); returns the ``.mat`` path.

    The multi-resolution levels are ``AFFINE_SHRINK_MM``/``AFFINE_SMOOTHING_MM`` divided by the fixed
    image's voxel size (identical to ANTs' defaults at 1 mm); ``finest_mm`` stops the levels at that
    resolution (for a low-resolution moving image such as PET).

    Args:
        fixed, moving: ANTs images.
        type_of_transform: ``"AffineFast"``, ``"Affine"`` or ``"Rigid"``.
        out_prefix: ANTs writes ``<out_prefix>0GenericAffine.mat`` (its folder is created).
    """
    voxel_mm = float(np.mean(fixed.spacing))
    floor_mm = max(finest_mm or 0.0, voxel_mm)
    shrink = tuple(max(1, round(max(mm, floor_mm) / voxel_mm)) for mm in AFFINE_SHRINK_MM)
    smoothing = tuple(round(max(mm, floor_mm - voxel_mm) / voxel_mm, 3) for mm in AFFINE_SMOOTHING_MM)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with seeded_ants():
        result = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=type_of_transform,
            outprefix=str(out_prefix),
            aff_shrink_factors=shrink,
            aff_smoothing_sigmas=smoothing,
        )
    return Path(result["fwdtransforms"][0])


def resample_to_grid(moving: Any, fixed: Any, transforms: list[Path], ants: ModuleType) -> np.ndarray:
    """``moving`` resampled (linear) onto ``fixed``'s grid through ``transforms`` (ANTs order).

    Returns:
        float32 array of ``fixed``'s shape; 0 outside the moving image's field of view.
    """
    warped = ants.apply_transforms(
        fixed=fixed, moving=moving, transformlist=[str(t) for t in transforms], interpolator="linear"
    )
    return np.asarray(warped.numpy(), dtype=np.float32)


def require_t1_transform(t1_transform_path: Path, t1w_path: Path) -> Path:
    """``t1_transform_path`` (t1-linear's T1w → template ``.mat``), checked to exist before any other work.

    Raises:
        InputMissingError: the transform is missing (t1-linear has not run on ``t1w_path``).
    """
    from bids_app.errors import InputMissingError

    path = Path(t1_transform_path)
    if not path.is_file():
        raise InputMissingError(f"T1w → template transform {path} does not exist. Run t1-linear on {t1w_path} first.")
    return path


def register_through_t1w(
    moving: Any,
    t1w_path: Path,
    t1_transform_path: Path,
    template: nib.Nifti1Image,
    crop_shape: tuple[int, int, int] | None,
    out_prefix: Path,
    ants: ModuleType,
    *,
    finest_mm: float | None = None,
) -> tuple[nib.Nifti1Image, Path]:
    """Bring another image of a session (PET, T2w, FLAIR) onto the cropped template grid through its T1w.

    ``moving`` is registered rigidly (Mattes MI, which does not need matching contrasts) to the session's raw
    T1w, then resampled once (linear) onto the template grid through that transform composed with the T1w's
    t1-linear affine, and cropped.

    Args:
        moving: ANTs image of the session (any pose and voxel size).
        t1w_path: the raw T1w that ``t1_transform_path`` was computed from.
        t1_transform_path: t1-linear's T1w → template ``.mat`` (see :func:`require_t1_transform`).
        template, crop_shape: the template and its crop.
        out_prefix: ANTs writes the rigid ``<out_prefix>0GenericAffine.mat``.
        finest_mm: stop the registration levels at this resolution (low-resolution images such as PET).

    Returns:
        (float32 image on the cropped template grid, the rigid moving → T1w ``.mat``).
    """
    fixed_t1w = to_ants(load_checked_nifti(t1w_path, kind="T1w"), ants)
    rigid = register_affine(fixed_t1w, moving, "Rigid", out_prefix, ants, finest_mm=finest_mm)
    # ANTs order: the last transform listed acts first on the moving image (moving → T1w, then T1w → template).
    warped = resample_to_grid(moving, to_ants(template, ants), [Path(t1_transform_path), rigid], ants)
    full = template_space_image(warped, np.asarray(template.affine), template)
    return crop_image(full, crop_box(template, crop_shape)), rigid


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def run_t1_linear(t1w_path: Path, cfg: PreprocessConfig, work_dir: Path, *, omp_nthreads: int = 1) -> T1LinearResult:
    """Preprocess a raw T1w: N4, affine registration to the template, linear resampling, crop.

    Args:
        t1w_path: raw T1w NIfTI (any orientation and voxel size within 0.1–10 mm).
        cfg: template, crop shape, registration flavour and N4 shrink factor.
        work_dir: the transform is written to ``work_dir/t1_linear/<input stem>/`` (created).
        omp_nthreads: ITK threads; 1 gives bit-identical results run after run.

    Returns:
        The cropped image ``cfg.crop_shape`` (or the template's shape), its transform and QC figures.

    Raises:
        InputMissingError, DataError: the T1w or template is missing or unusable (see ``load_checked_nifti``).
        ConfigError: the crop does not fit the template.
    """
    start = time.perf_counter()
    ants = import_ants(omp_nthreads)
    template = load_template(cfg)
    box = crop_box(template, cfg.crop_shape)
    t1w = load_checked_nifti(t1w_path, kind="T1w")
    fixed = to_ants(template, ants)
    moving = to_ants(t1w, ants)
    loaded = time.perf_counter()
    corrected = correct_bias(moving, cfg.n4_shrink_factor, ants)
    bias_done = time.perf_counter()
    prefix = Path(work_dir) / "t1_linear" / _stem(Path(t1w_path)) / "T1w_to_template_"
    transform = register_affine(fixed, corrected, cfg.registration.value, prefix, ants)
    registered = time.perf_counter()
    warped = resample_to_grid(corrected, fixed, [transform], ants)
    full = template_space_image(warped, np.asarray(template.affine), template)
    image = crop_image(full, box)
    template_crop = crop_image(template, box)
    qc = compute_qc(image, template_crop)
    qc["seconds"] = round(time.perf_counter() - start, 2)
    logger.info(
        "t1-linear %s: load %.1f s, N4 %.1f s, %s %.1f s, resample+crop+QC %.1f s; correlation %.3f",
        Path(t1w_path).name,
        loaded - start,
        bias_done - loaded,
        cfg.registration.value,
        registered - bias_done,
        time.perf_counter() - registered,
        qc["correlation_to_template"],
    )
    return T1LinearResult(image=image, transform_path=transform, qc=qc)


def _same_grid(img: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    return tuple(img.shape[:3]) == tuple(shape[:3]) and bool(
        np.allclose(img.affine, affine, rtol=0, atol=AFFINE_TOLERANCE_MM)
    )


def to_crop_grid(
    img: nib.Nifti1Image,
    template_img: nib.Nifti1Image,
    cfg: PreprocessConfig,
    what: str,
    fix: str = "Pass the raw T1w instead (t1-linear registers it)",
) -> nib.Nifti1Image:
    """A mask in template space brought to the cropped template grid, without resampling (masks must stay binary:
    images go through :func:`bids_app.preprocess.template_space.to_template_grid` instead).

    Accepts the full template grid (the crop is applied) or the cropped grid itself (affine within
    ``AFFINE_TOLERANCE_MM``). ``what`` names the image in the error message, ``fix`` the remedy offered
    besides choosing the right template.

    Raises:
        DataError: any other grid.
    """
    box = crop_box(template_img, cfg.crop_shape)
    template_crop = crop_image(template_img, box)
    if _same_grid(img, template_img.shape, template_img.affine):
        return crop_image(img, box)
    if _same_grid(img, template_crop.shape, template_crop.affine):
        return template_space_image(np.asarray(img.dataobj, dtype=np.float32), np.asarray(template_crop.affine), img)
    sizes = tuple(round(v, 3) for v in voxel_sizes(template_img.affine))
    raise DataError(
        f"{what} is not on the template grid: {describe_grid(img.shape[:3], img.affine)}; expected the template "
        f"{cfg.template_space} grid, shape {tuple(template_img.shape[:3])} (or its crop {tuple(template_crop.shape)}), "
        f"voxel size {sizes} mm, with the template's affine:\n{np.array2string(template_img.affine[:3], precision=3)}\n"
        f"{fix}, or set preprocess.template_path to the template it was made on."
    )
