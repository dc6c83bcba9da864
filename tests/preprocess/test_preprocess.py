"""t1-linear, pet-linear, input checks, QC and the participant report.

Registration tests use the tiny (4 mm) template of the shared generator, either through its participants
(compared with their template-space images) or posed here with a known affine (:func:`_pose`), so the
recovered transform can be checked point by point.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.config import PreprocessConfig
from bids_app.errors import ConfigError, DataError, InputMissingError
from bids_app.preprocess import qc as qc_module
from bids_app.preprocess.nifti_checks import load_checked_nifti
from bids_app.preprocess.pet_linear import load_preprocessed_pet, run_pet_linear
from bids_app.preprocess.qc import QC_KEYS, brain_mask, compute_qc, qc_passes
from bids_app.preprocess.t1_linear import crop_box, crop_image, load_template, run_t1_linear
from bids_app.preprocess.template_space import Resampling, TemplateGrid, load_preprocessed

TINY_CROP = (42, 52, 45)  # ~ the 1 mm crop (169, 208, 179) at 4 mm


def _save(path: Path, data: np.ndarray, affine: np.ndarray, code: int = 1) -> Path:
    """Write a NIfTI with ``affine`` as sform and qform (``code`` 0: no orientation at all)."""
    image = nib.Nifti1Image(data, None if code == 0 else affine)  # None: nibabel adds no sform of its own
    if code:
        image.set_sform(affine, code=code)
        image.set_qform(affine, code=code)
    nib.save(image, path)
    return path


def _pose(template_path: Path, seed: int, out_path: Path) -> tuple[Path, np.ndarray]:
    """The template at a random native pose (8° rotation, 4 % scale, shift) with a bias field and noise.

    Returns:
        (the image's path, (4, 4) true map from template mm to native mm, RAS).
    """
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    template = nib.load(template_path)
    voxel_mm = float(template.header.get_zooms()[0])
    rng = np.random.default_rng(seed)
    native_to_template = np.eye(4)  # world mm → world mm
    axis = rng.standard_normal(3)
    native_to_template[:3, :3] = Rotation.from_rotvec(np.deg2rad(8.0) * axis / np.linalg.norm(axis)).as_matrix()
    native_to_template[:3, :3] *= 1.04
    native_to_template[:3, 3] = rng.uniform(-8.0, 8.0, 3)
    shape = tuple(round(float(n)) for n in np.array([176.0, 208.0, 176.0]) / voxel_mm)
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = -voxel_mm * (np.array(shape) - 1) / 2.0 + np.array([0.0, -18.0, 8.0])
    to_voxels = np.linalg.inv(template.affine) @ native_to_template @ affine
    data = np.asarray(template.dataobj, dtype=np.float32) * np.float32(4.0)
    native = ndimage.affine_transform(data, to_voxels[:3, :3], to_voxels[:3, 3], output_shape=shape, order=1)
    ramps = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    native *= np.exp(0.15 * ramps[0] - 0.1 * ramps[2]).astype(np.float32)
    native += rng.normal(0.0, 8.0, shape).astype(np.float32)
    return _save(out_path, native.astype(np.float32), affine), np.linalg.inv(native_to_template)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dataset) -> PreprocessConfig:
    return PreprocessConfig(template_path=tiny_dataset.template_path, crop_shape=TINY_CROP, n4_shrink_factor=2)


@pytest.fixture(scope="module")
def posed_run(tiny_cfg, tmp_path_factory):
    """One t1-linear run on a posed tiny template: (input path, true template→native map, result)."""
    folder = tmp_path_factory.mktemp("posed")
    path, truth = _pose(tiny_cfg.template_path, seed=11, out_path=folder / "sub-01_T1w.nii.gz")
    return path, truth, run_t1_linear(path, tiny_cfg, folder / "work")


# -- t1-linear ----------------------------------------------------------------------------------------


def test_t1_linear_recovers_the_pose(posed_run, tiny_cfg, tmp_path):
    import ants

    path, truth, result = posed_run
    template = load_template(tiny_cfg)
    template_crop = crop_image(template, crop_box(template, TINY_CROP))
    assert result.image.shape == TINY_CROP
    assert result.image.get_data_dtype() == np.float32
    np.testing.assert_allclose(result.image.affine, template_crop.affine, atol=1e-6)
    assert result.qc["correlation_to_template"] >= 0.9
    assert qc_passes(result.qc)
    assert result.transform_path.is_file() and result.transform_path.suffix == ".mat"
    assert path.parent / "work" in result.transform_path.parents
    # the saved transform maps template points (ITK's LPS mm) to native points as the true pose does
    transform = ants.read_transform(str(result.transform_path))
    lps = np.array([-1.0, -1.0, 1.0])
    brain = np.argwhere(brain_mask(template))[::50]
    points = nib.affines.apply_affine(template.affine, brain)
    estimated = np.array([np.array(transform.apply_to_point(tuple(p * lps))) * lps for p in points])
    expected = nib.affines.apply_affine(truth, points)
    errors = np.linalg.norm(estimated - expected, axis=1)
    assert errors.mean() < 1.5 and errors.max() < 4.0  # mm, on a 4 mm template


def test_t1_linear_is_deterministic(posed_run, tiny_cfg, tmp_path):
    path, _, first = posed_run
    second = run_t1_linear(path, tiny_cfg, tmp_path / "work")
    assert second.transform_path != first.transform_path
    assert second.transform_path.read_bytes() == first.transform_path.read_bytes()
    np.testing.assert_array_equal(np.asarray(second.image.dataobj), np.asarray(first.image.dataobj))
    assert {k: v for k, v in second.qc.items() if k != "seconds"} == {
        k: v for k, v in first.qc.items() if k != "seconds"
    }


def test_t1_linear_on_a_generated_participant_matches_its_template_space_image(tiny_dataset, tiny_cfg, tmp_path):
    raw = sorted(tiny_dataset.bids_dir.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[0]
    truth_path = next(tiny_dataset.derivative_dir.rglob(raw.name.replace("_T1w", "_space-*_desc-preproc_T1w")))
    result = run_t1_linear(raw, tiny_cfg, tmp_path)
    grid = TemplateGrid.from_template(load_template(tiny_cfg), tiny_cfg.crop_shape, tiny_cfg.template_space)
    truth, _ = load_preprocessed(truth_path, tiny_cfg.template_space, grid)
    a, b = np.asarray(result.image.dataobj), np.asarray(truth.dataobj)
    inside = b > 0
    assert np.corrcoef(a[inside], b[inside])[0, 1] >= 0.9
    assert set(QC_KEYS) | {"seconds"} == set(result.qc)
    assert qc_passes(result.qc)


def test_crop_larger_than_the_template_is_a_config_error(tiny_dataset, tmp_path):
    cfg = PreprocessConfig(template_path=tiny_dataset.template_path)  # 169x208x179 on a 49x58x47 template
    t1w = sorted(tiny_dataset.bids_dir.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[0]
    with pytest.raises(ConfigError, match=r"crop_shape \(169, 208, 179\) does not fit the template.*\(49, 58, 47\)"):
        run_t1_linear(t1w, cfg, tmp_path)


def test_t1_linear_checks_its_input_before_any_work(tiny_cfg, tmp_path):
    path = _bad(tmp_path, "no_orientation")
    with pytest.raises(DataError, match=r"no_orientation\.nii\.gz has no orientation"):
        run_t1_linear(path, tiny_cfg, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_thread_count_must_be_positive(posed_run, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="omp_nthreads must be at least 1, got 0"):
        run_t1_linear(posed_run[0], tiny_cfg, tmp_path, omp_nthreads=0)


# -- crop box ------------------------------------------------------------------------------------------


def _box_template(shape: tuple[int, int, int], brain: tuple[slice, slice, slice]) -> nib.Nifti1Image:
    data = np.zeros(shape, dtype=np.float32)
    data[brain] = 100.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-40.0, -50.0, -30.0)
    return nib.Nifti1Image(data, affine)


def test_crop_box_is_centred_on_the_brain_bounding_box():
    template = _box_template((40, 50, 60), (slice(10, 20), slice(5, 30), slice(20, 41)))
    box = crop_box(template, (20, 35, 31))
    assert [(s.start, s.stop) for s in box] == [(5, 25), (0, 35), (15, 46)]
    brain_centres = (14.5, 17.0, 30.0)
    assert [(s.start + s.stop - 1) / 2 for s in box] == list(brain_centres)


def test_crop_box_is_shifted_inside_the_grid_and_keeps_its_shape():
    template = _box_template((40, 50, 60), (slice(0, 6), slice(44, 50), slice(10, 20)))
    box = crop_box(template, (30, 30, 60))
    assert [(s.start, s.stop) for s in box] == [(0, 30), (20, 50), (0, 60)]


def test_crop_box_none_keeps_the_grid_and_too_large_raises():
    template = _box_template((40, 50, 60), (slice(10, 20), slice(10, 20), slice(10, 20)))
    assert crop_box(template, None) == (slice(0, 40), slice(0, 50), slice(0, 60))
    with pytest.raises(ConfigError, match=r"crop_shape \(41, 50, 60\).*no larger than \(40, 50, 60\)"):
        crop_box(template, (41, 50, 60))


def test_default_crop_of_the_mni_template():
    template = load_template(PreprocessConfig())
    box = crop_box(template, (169, 208, 179))
    assert [(s.start, s.stop) for s in box] == [(14, 183), (13, 221), (0, 179)]
    brain = brain_mask(template)
    assert brain[box].sum() == brain.sum()  # the whole brain is inside the crop


def test_cropped_affine_encodes_the_offset():
    template = _box_template((40, 50, 60), (slice(10, 20), slice(5, 30), slice(20, 41)))
    box = crop_box(template, (20, 35, 31))
    cropped = crop_image(template, box)
    start = np.array([s.start for s in box])
    offset = np.linalg.inv(template.affine) @ cropped.affine
    np.testing.assert_allclose(offset[:3, 3], start)
    np.testing.assert_allclose(offset[:3, :3], np.eye(3))
    np.testing.assert_array_equal(np.asarray(cropped.dataobj), np.asarray(template.dataobj)[box])
    assert int(cropped.header["sform_code"]) > 0 and int(cropped.header["qform_code"]) > 0


# -- already preprocessed inputs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_template(tiny_cfg) -> nib.Nifti1Image:
    return load_template(tiny_cfg)


def _grid(tiny_template, tiny_cfg) -> TemplateGrid:
    return TemplateGrid.from_template(tiny_template, TINY_CROP, tiny_cfg.template_space)


def test_load_preprocessed_crops_a_full_grid_image(tiny_template, tiny_cfg, tmp_path):
    data = np.asarray(tiny_template.dataobj) * 2.0
    path = _save(tmp_path / "full.nii.gz", data, tiny_template.affine, code=4)
    image, placement = load_preprocessed(path, tiny_cfg.template_space, _grid(tiny_template, tiny_cfg))
    box = crop_box(tiny_template, TINY_CROP)
    assert image.shape == TINY_CROP and placement.resampling is Resampling.SHIFT
    np.testing.assert_array_equal(np.asarray(image.dataobj), data[box])
    np.testing.assert_allclose(image.affine, crop_image(tiny_template, box).affine)


def test_load_preprocessed_accepts_the_cropped_grid(tiny_template, tiny_cfg, tmp_path):
    crop = crop_image(tiny_template, crop_box(tiny_template, TINY_CROP))
    affine = crop.affine.copy()
    affine[:3, 3] += 0.004  # float32 header rounding stays within tolerance
    path = _save(tmp_path / "crop.nii.gz", np.asarray(crop.dataobj), affine, code=4)
    image, placement = load_preprocessed(path, tiny_cfg.template_space, _grid(tiny_template, tiny_cfg))
    assert placement.resampling is Resampling.NONE
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(crop.dataobj))
    np.testing.assert_allclose(image.affine, crop.affine)


def test_load_preprocessed_accepts_the_generators_derivative(tiny_dataset, tiny_template, tiny_cfg):
    path = next(tiny_dataset.derivative_dir.rglob("*_desc-preproc_T1w.nii.gz"))
    image, _ = load_preprocessed(path, tiny_cfg.template_space, _grid(tiny_template, tiny_cfg))
    assert image.shape == TINY_CROP


# -- input checks --------------------------------------------------------------------------------------


def _volume(shape: tuple[int, ...] = (10, 12, 14)) -> np.ndarray:
    return np.random.default_rng(0).random(shape, dtype=np.float32) + 1.0


def test_valid_nifti_loads_as_float32_3d(tmp_path):
    affine = np.diag([1.2, 1.0, 0.9, 1.0])
    image = load_checked_nifti(_save(tmp_path / "ok.nii.gz", (_volume() * 100).astype(np.int16), affine))
    assert image.shape == (10, 12, 14) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, affine)


def test_4d_with_one_volume_is_squeezed(tmp_path):
    image = load_checked_nifti(_save(tmp_path / "one.nii.gz", _volume((10, 12, 14, 1)), np.eye(4)))
    assert image.shape == (10, 12, 14)


def test_missing_file_is_input_missing(tmp_path):
    with pytest.raises(InputMissingError, match=r"T1w image .*absent\.nii\.gz does not exist"):
        load_checked_nifti(tmp_path / "absent.nii.gz")


def _bad(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.nii.gz"
    if case == "garbage":
        path.write_bytes(b"this is not an image" * 50)
    elif case == "truncated":
        full = gzip.compress(nib.Nifti1Image(_volume((30, 30, 30)), np.eye(4)).to_bytes())
        path.write_bytes(full[: len(full) // 2])
    elif case == "2d":
        _save(path, _volume((64, 64)), np.eye(4))
    elif case == "4d":
        _save(path, _volume((10, 12, 14, 3)), np.eye(4))
    elif case in ("nan", "inf"):
        data = _volume()
        data[1, 2, 3] = np.nan if case == "nan" else np.inf
        _save(path, data, np.eye(4))
    elif case == "constant":
        _save(path, np.full((10, 12, 14), 7.0, dtype=np.float32), np.eye(4))
    elif case in ("tiny_voxels", "huge_voxels"):
        size = 0.05 if case == "tiny_voxels" else 12.0
        _save(path, _volume(), np.diag([size, size, size, 1.0]))
    elif case == "no_orientation":
        _save(path, _volume(), np.eye(4), code=0)
    elif case == "singular":
        affine = np.eye(4)
        affine[2, 2] = 0.0
        image = nib.Nifti1Image(_volume(), None)
        image.set_sform(affine, code=1)  # a qform cannot even store a singular matrix
        nib.save(image, path)
    return path


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("garbage", r"Cannot read T1w image .*garbage\.nii\.gz.*Re-export"),
        ("truncated", r"Cannot read the voxels of T1w image .*truncated\.nii\.gz \(truncated or corrupted\?\)"),
        ("2d", r"T1w image .*2d\.nii\.gz has shape \(64, 64\): it is 2D.*3D volume is expected"),
        ("4d", r"T1w image .*4d\.nii\.gz is 4D with shape \(10, 12, 14, 3\).*Pass a single volume"),
        ("nan", r"T1w image .*nan\.nii\.gz contains 1 NaN and 0 infinite voxel\(s\)\. Replace them"),
        ("inf", r"T1w image .*inf\.nii\.gz contains 0 NaN and 1 infinite voxel\(s\)"),
        ("constant", r"T1w image .*constant\.nii\.gz is constant \(every voxel is 7\.0\)"),
        ("tiny_voxels", r"T1w image .*tiny_voxels\.nii\.gz has voxel size \(0\.05, 0\.05, 0\.05\) mm, outside 0\.1"),
        ("huge_voxels", r"T1w image .*huge_voxels\.nii\.gz has voxel size \(12\.0, 12\.0, 12\.0\) mm.*xyzt_units"),
        ("no_orientation", r"T1w image .*no_orientation\.nii\.gz has no orientation \(qform_code and sform_code"),
        ("singular", r"T1w image .*singular\.nii\.gz has a singular or invalid affine \(determinant 0"),
    ],
)
def test_bad_inputs_raise_one_clear_data_error(tmp_path, case, pattern):
    path = _bad(tmp_path, case)
    with pytest.raises(DataError) as caught:
        load_checked_nifti(path)
    assert re.search(pattern, str(caught.value), flags=re.DOTALL), str(caught.value)


def test_the_kind_is_named_in_the_message(tmp_path):
    with pytest.raises(DataError, match=r"^pet image .*nan\.nii\.gz contains"):
        load_checked_nifti(_bad(tmp_path, "nan"), kind="pet")


# -- QC -----------------------------------------------------------------------------------------------


def test_qc_of_the_template_itself_is_perfect_and_of_a_shifted_one_fails(tiny_template):
    crop = crop_image(tiny_template, crop_box(tiny_template, TINY_CROP))
    qc = compute_qc(crop, crop)
    assert tuple(qc) == QC_KEYS
    assert qc["correlation_to_template"] == pytest.approx(1.0)
    assert qc["smoothed_correlation_to_template"] == pytest.approx(1.0)
    assert qc["nmi_to_template"] == pytest.approx(2.0)
    assert qc_passes(qc) and qc_passes(qc, "pet")
    shifted = nib.Nifti1Image(np.roll(np.asarray(crop.dataobj), 3, axis=1), crop.affine)  # 12 mm
    bad = compute_qc(shifted, crop)
    assert bad["correlation_to_template"] < 0.6
    assert not qc_passes(bad) and not qc_passes(bad, "pet")


def test_qc_intensity_statistics_are_inside_the_brain(tiny_template):
    crop = crop_image(tiny_template, crop_box(tiny_template, TINY_CROP))
    data = np.asarray(crop.dataobj)
    mask = brain_mask(crop)
    qc = compute_qc(nib.Nifti1Image(data * 3.0 + 5.0, crop.affine), crop)
    assert qc["intensity_mean"] == pytest.approx(float((data[mask] * 3.0 + 5.0).mean()), rel=1e-5)
    assert qc["intensity_p01"] < qc["intensity_mean"] < qc["intensity_p99"]
    assert qc["correlation_to_template"] == pytest.approx(1.0)  # invariant to a linear intensity change


def test_qc_rule_thresholds_and_missing_values():
    threshold = qc_module.MIN_T1W_CORRELATION
    assert qc_passes({"smoothed_correlation_to_template": threshold})
    assert not qc_passes({"smoothed_correlation_to_template": threshold - 1e-6})
    assert not qc_passes({})
    assert not qc_passes({"smoothed_correlation_to_template": float("nan")})
    assert qc_passes({"nmi_to_template": qc_module.MIN_PET_NMI}, "pet")
    assert not qc_passes({"smoothed_correlation_to_template": 0.99, "nmi_to_template": 1.0}, "pet")


# -- PET -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pet_dataset(tmp_path_factory):
    from bids_app.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("pet") / "bids"
    return generate_dataset(root, n_subjects=2, n_sessions=1, preset="tiny", seed=7, with_pet=True)


def test_pet_linear_registers_to_the_template_and_normalises_to_suvr(pet_dataset, tmp_path):
    cfg = PreprocessConfig(template_path=pet_dataset.template_path, crop_shape=TINY_CROP, n4_shrink_factor=2)
    t1w = sorted(pet_dataset.bids_dir.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[0]
    pet = sorted(pet_dataset.bids_dir.glob("sub-*/ses-*/pet/*_pet.nii.gz"))[0]
    t1 = run_t1_linear(t1w, cfg, tmp_path)
    result = run_pet_linear(pet, t1w, t1.transform_path, cfg, tmp_path)
    template = load_template(cfg)
    crop = crop_image(template, crop_box(template, TINY_CROP))
    suvr = np.asarray(result.image.dataobj)
    assert result.image.shape == TINY_CROP
    np.testing.assert_allclose(result.image.affine, crop.affine, atol=1e-6)
    assert float(suvr[brain_mask(crop)].mean()) == pytest.approx(1.0, rel=1e-5)  # whole-brain reference
    assert result.qc["suvr_reference_mean"] > 1000  # Bq/mL
    assert result.transform_path is not None and result.transform_path.is_file()
    # FDG follows grey matter: the registered PET must correlate with the template's GM map
    from bids_app.synthetic.dataset import TINY_GM_NAME

    gm = np.asarray(nib.load(pet_dataset.template_path.parent / TINY_GM_NAME).dataobj)[crop_box(template, TINY_CROP)]
    inside = brain_mask(crop)
    assert np.corrcoef(suvr[inside], gm[inside])[0, 1] >= 0.6
    assert qc_passes(result.qc, "pet")


def test_preprocessed_pet_uses_the_reference_mask(tiny_template, tiny_cfg, tmp_path):
    data = np.asarray(tiny_template.dataobj) * 50.0 + 10.0
    pet_path = _save(tmp_path / "pet.nii.gz", data, tiny_template.affine, code=4)
    mask = np.zeros(tiny_template.shape, dtype=np.uint8)
    mask[20:26, 20:26, 10:16] = 1
    mask_path = _save(tmp_path / "ref.nii.gz", mask, tiny_template.affine, code=4)
    cfg = dataclasses.replace(tiny_cfg, suvr_reference_mask=mask_path)
    result = load_preprocessed_pet(pet_path, cfg.template_space, _grid(tiny_template, cfg), tiny_template, cfg)
    box = crop_box(tiny_template, TINY_CROP)
    suvr = np.asarray(result.image.dataobj)
    assert suvr[(mask > 0)[box]].mean() == pytest.approx(1.0, rel=1e-5)
    assert result.qc["suvr_reference_mean"] == pytest.approx(float(data[mask > 0].mean()), rel=1e-5)
    np.testing.assert_allclose(suvr, data[box] / data[mask > 0].mean(), rtol=1e-5)


def test_empty_reference_mask_is_a_data_error(tiny_template, tiny_cfg, tmp_path):
    pet_path = _save(tmp_path / "pet.nii.gz", np.asarray(tiny_template.dataobj) + 1.0, tiny_template.affine, code=4)
    mask = np.zeros(tiny_template.shape, dtype=np.uint8)
    mask[0, 0, 0] = 1  # outside the crop box
    mask_path = _save(tmp_path / "ref.nii.gz", mask, tiny_template.affine, code=4)
    cfg = dataclasses.replace(tiny_cfg, suvr_reference_mask=mask_path)
    with pytest.raises(DataError, match=r"reference mask .*ref\.nii\.gz has no voxel inside the crop box"):
        load_preprocessed_pet(pet_path, cfg.template_space, _grid(tiny_template, cfg), tiny_template, cfg)


# -- realistic ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_t1_linear_at_1mm_registers_a_posed_template(tmp_path):
    from bids_app.template import default_template_path

    path, _ = _pose(default_template_path(), seed=5, out_path=tmp_path / "sub-01_T1w.nii.gz")
    result = run_t1_linear(path, PreprocessConfig(), tmp_path / "work")
    assert result.image.shape == (169, 208, 179)
    assert result.qc["correlation_to_template"] >= 0.9
    assert qc_passes(result.qc)
