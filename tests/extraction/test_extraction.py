"""Tensor extraction: shapes and counts per mode, cut contents, ROI alignment, normalisation, storage."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.spatialimages import SpatialImage

from bids_app import extraction
from bids_app.config import ExtractionConfig, ExtractionMode, Normalization, SliceDirection, TensorDtype
from bids_app.derivatives import sidecar_path
from bids_app.errors import ConfigError, DataError, InputMissingError
from bids_app.extraction import (
    EXTRACTORS,
    align_mask,
    extract_patches,
    extract_rois,
    extract_slices,
    extract_tensor,
    is_tensor_complete,
    load_part,
    load_roi_masks,
    load_tensor,
    load_volume,
    mode_parameters,
    n_parts,
    normalize_volume,
    patch_origins,
    read_sidecar,
    roi_boxes,
    write_tensor,
)

SHAPE = (12, 14, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _volume(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _box_mask(shape: tuple[int, ...], low: tuple[int, ...], high: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high, strict=True))] = True
    return mask


def _cfg(**changes: object) -> ExtractionConfig:
    base = ExtractionConfig(patch_size=4, stride=4, discarded_slices=2)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --- shapes and counts ------------------------------------------------------------------------------------


def test_registry_covers_every_mode() -> None:
    assert set(EXTRACTORS) == set(ExtractionMode)


@pytest.mark.parametrize(
    ("mode", "expected_shape"),
    [
        (ExtractionMode.IMAGE, (1, 12, 14, 10)),
        (ExtractionMode.PATCH, (3 * 3 * 2, 1, 4, 4, 4)),
        (ExtractionMode.SLICE, (12 - 4, 1, 14, 10)),
        (ExtractionMode.ROI, (2, 1, 5, 4, 3)),
    ],
)
def test_each_mode_shape_and_count(mode: ExtractionMode, expected_shape: tuple[int, ...]) -> None:
    masks = {
        "left": _box_mask(SHAPE, (1, 2, 3), (4, 6, 6)),  # extent 3, 4, 3
        "right": _box_mask(SHAPE, (6, 1, 1), (11, 3, 3)),  # extent 5, 2, 2
    }
    tensor = extract_tensor(_volume(), mode, _cfg(), masks)
    assert tensor.shape == expected_shape
    assert tensor.dtype == np.float32
    assert tensor.shape[0] == n_parts(mode, _cfg(), SHAPE, n_rois=len(masks))


def test_clinicadl_default_counts_without_data() -> None:
    cfg = ExtractionConfig()
    assert n_parts(ExtractionMode.PATCH, cfg, (169, 208, 179)) == 36
    assert n_parts(ExtractionMode.SLICE, cfg, (169, 208, 179)) == 169 - 40
    assert n_parts(ExtractionMode.IMAGE, cfg, (169, 208, 179)) == 1
    two_rois = dataclasses.replace(cfg, roi_masks=(("a", Path("a.nii")), ("b", Path("b.nii"))))
    assert n_parts(ExtractionMode.ROI, two_rois, (169, 208, 179)) == 2


def test_image_mode_is_a_copy_of_the_volume() -> None:
    volume = _volume()
    tensor = extract_tensor(volume, ExtractionMode.IMAGE, _cfg())
    np.testing.assert_array_equal(tensor[0], volume)
    assert not np.shares_memory(tensor, volume)


# --- patches ----------------------------------------------------------------------------------------------


def test_patches_tile_the_volume_exactly_when_stride_equals_size() -> None:
    volume = _volume((8, 12, 4))
    patches = extract_patches(volume, 4, 4)
    assert patches.shape == (2 * 3 * 1, 1, 4, 4, 4)
    rebuilt = np.full(volume.shape, np.nan, dtype=np.float32)
    for patch, origin in zip(patches, patch_origins(volume.shape, 4, 4), strict=True):
        box = tuple(slice(int(o), int(o) + 4) for o in origin)
        assert np.isnan(rebuilt[box]).all()  # no overlap
        rebuilt[box] = patch[0]
    np.testing.assert_array_equal(rebuilt, volume)


def test_overlapping_patches_drop_the_border_and_match_their_origin() -> None:
    volume = _volume((10, 9, 7))
    patches = extract_patches(volume, 4, 3)
    grid = ((10 - 4) // 3 + 1, (9 - 4) // 3 + 1, (7 - 4) // 3 + 1)
    assert patches.shape == (int(np.prod(grid)), 1, 4, 4, 4)
    origins = patch_origins(volume.shape, 4, 3)
    assert origins.max(axis=0).tolist() == [6, 3, 3]  # last patch ends inside the volume
    for patch, (x, y, z) in zip(patches, origins, strict=True):
        np.testing.assert_array_equal(patch[0], volume[x : x + 4, y : y + 4, z : z + 4])
    assert patches.flags.c_contiguous and not np.shares_memory(patches, volume)


# --- slices -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "axis"),
    [(SliceDirection.SAGITTAL, 0), (SliceDirection.CORONAL, 1), (SliceDirection.AXIAL, 2)],
)
def test_slice_content_is_the_volume_slice_at_the_right_index(direction: SliceDirection, axis: int) -> None:
    volume = _volume()
    slices = extract_slices(volume, direction, 3)
    other_axes = [SHAPE[a] for a in range(3) if a != axis]
    assert slices.shape == (SHAPE[axis] - 6, 1, *other_axes)
    for i in range(slices.shape[0]):
        np.testing.assert_array_equal(slices[i, 0], volume.take(3 + i, axis=axis))


# --- regions ----------------------------------------------------------------------------------------------


def test_roi_box_contains_the_mask_and_zeroes_outside() -> None:
    volume = _volume() + 1.0  # strictly positive, so a zero can only come from masking
    sphere = np.zeros(SHAPE, dtype=bool)
    grid = np.indices(SHAPE)
    sphere[((grid - np.array([6, 7, 5])[:, None, None, None]) ** 2).sum(axis=0) <= 6] = True
    corner = _box_mask(SHAPE, (0, 0, 0), (2, 2, 2))  # forces the common box to be shifted inside the volume
    masks = {"sphere": sphere, "corner": corner}
    rois = extract_rois(volume, masks, crop=True)
    boxes = roi_boxes(list(masks.values()))
    extents = {tuple(s.stop - s.start for s in box) for box in boxes}
    assert len(extents) == 1 and rois.shape == (2, 1, *extents.pop())
    for index, (mask, box) in enumerate(zip(masks.values(), boxes, strict=True)):
        assert all(s.start >= 0 and s.stop <= n for s, n in zip(box, SHAPE, strict=True))
        assert mask[box].sum() == mask.sum()  # the whole region is inside its box
        inside = mask[box]
        np.testing.assert_array_equal(rois[index, 0][inside], volume[box][inside])
        assert (rois[index, 0][~inside] == 0).all()
        assert (rois[index, 0][inside] > 0).all()


def test_roi_boxes_are_centred_on_each_mask() -> None:
    large = _box_mask(SHAPE, (1, 1, 1), (9, 3, 3))  # extent 8, 2, 2
    dot = _box_mask(SHAPE, (6, 7, 5), (7, 8, 6))
    boxes = roi_boxes([large, dot])
    assert boxes[0] == (slice(1, 9), slice(1, 3), slice(1, 3))
    for box_slice, voxel in zip(boxes[1], (6, 7, 5), strict=True):
        assert box_slice.stop - box_slice.start in (8, 2)
        assert abs((box_slice.start + box_slice.stop) / 2 - (voxel + 0.5)) <= 0.5


def test_roi_without_crop_keeps_the_full_frame_masked() -> None:
    volume = _volume() + 1.0
    mask = _box_mask(SHAPE, (2, 3, 4), (5, 6, 7))
    rois = extract_rois(volume, {"box": mask}, crop=False)
    assert rois.shape == (1, 1, *SHAPE)
    np.testing.assert_array_equal(rois[0, 0], np.where(mask, volume, 0))


def test_roi_errors() -> None:
    with pytest.raises(ConfigError, match="roi_masks"):
        extract_tensor(_volume(), ExtractionMode.ROI, _cfg(), None)
    with pytest.raises(DataError, match="'empty' is empty"):
        extract_rois(_volume(), {"empty": np.zeros(SHAPE, dtype=bool)}, crop=True)
    with pytest.raises(DataError, match=r"'small' has shape \(2, 2, 2\)"):
        extract_rois(_volume(), {"small": np.ones((2, 2, 2), dtype=bool)}, crop=True)


# --- mask alignment ---------------------------------------------------------------------------------------


def _template_mask() -> nib.Nifti1Image:
    """A 20x22x18 'template grid' mask at 2 mm with a region at voxels 8..12, 9..14, 5..9."""
    data = np.zeros((20, 22, 18), dtype=np.uint8)
    data[8:12, 9:14, 5:9] = 1
    affine = AFFINE.copy()
    affine[:3, 3] = [-20.0, -22.0, -10.0]
    return nib.Nifti1Image(data, affine)


def _crop(img: nib.Nifti1Image, start: tuple[int, int, int], shape: tuple[int, int, int]) -> nib.Nifti1Image:
    """An image on a crop of ``img``'s grid (as the preprocessing's crop produces)."""
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array(start, dtype=float) + img.affine[:3, 3]
    return nib.Nifti1Image(np.zeros(shape, dtype=np.float32), affine)


def test_align_mask_cuts_the_crop_box_from_the_template_grid() -> None:
    mask_img = _template_mask()
    image_img = _crop(mask_img, (3, 4, 2), SHAPE)
    aligned = align_mask(mask_img, image_img, "hippocampus")
    assert aligned.dtype == np.bool_ and aligned.shape == SHAPE
    expected = np.asanyarray(mask_img.dataobj)[3 : 3 + 12, 4 : 4 + 14, 2 : 2 + 10] > 0.5
    np.testing.assert_array_equal(aligned, expected)
    assert aligned.sum() == 4 * 5 * 4
    rounded = _shifted(image_img, (-1e-4, 1e-4, 0.0))  # float32 header rounding, far below a voxel
    np.testing.assert_array_equal(align_mask(mask_img, rounded, "hippocampus"), expected)
    same_grid = align_mask(mask_img, mask_img, "hippocampus")
    np.testing.assert_array_equal(same_grid, np.asanyarray(mask_img.dataobj) > 0.5)


def test_align_mask_thresholds_at_one_half() -> None:
    mask_img = _template_mask()
    data = np.asanyarray(mask_img.dataobj).astype(np.float32) * 0.9
    data[0, 0, 0] = 0.5  # not above 0.5
    aligned = align_mask(nib.Nifti1Image(data, mask_img.affine), mask_img, "soft")
    assert aligned.sum() == 4 * 5 * 4 and not aligned[0, 0, 0]


def _shifted(img: nib.Nifti1Image, shift_mm: tuple[float, float, float]) -> nib.Nifti1Image:
    affine = img.affine.copy()
    affine[:3, 3] += shift_mm
    return nib.Nifti1Image(np.zeros(img.shape, dtype=np.float32), affine)


@pytest.mark.parametrize(
    ("make_image", "message"),
    [
        (lambda m: nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), "Voxel size"),
        (lambda m: nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([-2.0, 2.0, 2.0, 1.0])), "Orientation"),
        (lambda m: _shifted(_crop(m, (3, 4, 2), SHAPE), (1.0, 0.0, 0.0)), "not a whole number"),
        (lambda m: _crop(m, (10, 4, 2), SHAPE), "not inside the mask grid"),
        (lambda m: _crop(m, (-1, 0, 0), SHAPE), "not inside the mask grid"),
        (lambda m: _crop(m, (0, 0, 0), (6, 6, 4)), "no voxel above 0.5"),
    ],
    ids=["voxel-size", "orientation", "subvoxel-offset", "past-far-edge", "before-origin", "empty-in-box"],
)
def test_align_mask_mismatches_raise_data_error(
    make_image: Callable[[SpatialImage], SpatialImage], message: str, tmp_path: Path
) -> None:
    mask_path = tmp_path / "hippocampus_mask.nii.gz"
    nib.save(_template_mask(), mask_path)
    mask_img = nib.load(mask_path)
    assert isinstance(mask_img, SpatialImage)
    with pytest.raises(DataError) as caught:
        align_mask(mask_img, make_image(mask_img), "hippocampus")
    text = str(caught.value)
    assert message in text
    assert str(mask_path) in text and "(20, 22, 18)" in text
    if message != "no voxel above 0.5":
        assert "Resample the mask to the template grid" in text and "voxel size (2.0, 2.0, 2.0) mm" in text


def test_load_roi_masks_reads_aligns_and_reorients(tmp_path: Path) -> None:
    mask_img = _template_mask()
    image_img = _crop(mask_img, (3, 4, 2), SHAPE)
    ras_path = tmp_path / "ras.nii.gz"
    nib.save(mask_img, ras_path)
    # The same mask stored left-to-right (LAS): reorienting must give back the same voxels.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = mask_img.shape[0] - 1
    las_path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(mask_img.dataobj)[::-1].copy(), mask_img.affine @ flip), las_path)
    masks = load_roi_masks((("ras", ras_path), ("las", las_path)), image_img)
    assert list(masks) == ["ras", "las"]
    np.testing.assert_array_equal(masks["ras"], masks["las"])
    np.testing.assert_array_equal(masks["ras"], align_mask(mask_img, image_img, "ras"))


def test_load_roi_masks_errors(tmp_path: Path) -> None:
    image_img = _template_mask()
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(InputMissingError, match=r"missing\.nii\.gz"):
        load_roi_masks((("gone", missing),), image_img)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=r"garbage\.nii\.gz"):
        load_roi_masks((("garbage", garbage),), image_img)
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 22, 18, 2), np.uint8), image_img.affine), four_d)
    with pytest.raises(DataError, match=r"four_d.nii.gz.*shape \(20, 22, 18, 2\)"):
        load_roi_masks((("four_d", four_d),), image_img)
    ok = tmp_path / "ok.nii.gz"
    nib.save(image_img, ok)
    with pytest.raises(ConfigError, match="'twice' is given twice"):
        load_roi_masks((("twice", ok), ("twice", ok)), image_img)


# --- normalisation and loading ----------------------------------------------------------------------------


def test_minmax_maps_to_exactly_zero_one() -> None:
    volume = _volume().astype(np.float64) * 700 - 50
    out = normalize_volume(volume, Normalization.MINMAX)
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, (volume - volume.min()) / np.ptp(volume), atol=1e-6)


def test_zscore_uses_brain_voxels_and_keeps_background() -> None:
    volume = _volume() * 100 + 20
    volume[:3] = 0
    out = normalize_volume(volume, Normalization.ZSCORE)
    brain = out[3:]
    assert abs(float(brain.mean())) < 1e-5 and abs(float(brain.std()) - 1) < 1e-5
    assert (out[:3] == 0).all()


def test_none_only_converts_and_copies() -> None:
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    out = normalize_volume(volume, Normalization.NONE)
    assert out.dtype == np.float32 and not np.shares_memory(out, volume)
    np.testing.assert_array_equal(out, volume)


@pytest.mark.parametrize("method", list(Normalization))
def test_non_finite_voxels_raise_with_the_source(method: Normalization) -> None:
    volume = _volume()
    volume[1, 2, 3] = np.nan
    volume[0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"sub-01_T1w.nii.gz has 2 non-finite"):
        normalize_volume(volume, method, source="sub-01_T1w.nii.gz")


def test_finite_voxels_whose_sum_overflows_are_accepted_and_a_lone_inf_is_refused() -> None:
    """The finiteness check sums the volume first: a sum that overflows float32 must not refuse finite voxels."""
    volume = np.where(_volume() > 0.5, 3e38, 1e38).astype(np.float32)  # each finite, their sum is inf
    out = normalize_volume(volume, Normalization.MINMAX)
    assert np.isfinite(out).all() and float(out.max()) == 1.0
    volume[2, 2, 2] = -np.inf
    with pytest.raises(DataError, match="has 1 non-finite"):
        normalize_volume(volume, Normalization.NONE)


def test_degenerate_volumes_raise() -> None:
    with pytest.raises(DataError, match="constant"):
        normalize_volume(np.full(SHAPE, 3.0), Normalization.MINMAX, source="x.nii")
    with pytest.raises(DataError, match="no non-zero voxel"):
        normalize_volume(np.zeros(SHAPE), Normalization.ZSCORE)
    with pytest.raises(DataError, match="constant non-zero"):
        normalize_volume(np.where(_volume() > 0.5, 4.0, 0.0), Normalization.ZSCORE)


def test_load_volume_puts_voxels_in_ras_order(tmp_path: Path) -> None:
    volume = _volume() * 10
    ras_path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), ras_path)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1
    las_path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(volume[::-1].copy(), AFFINE @ flip), las_path)
    ras_img, ras = load_volume(ras_path, Normalization.MINMAX)
    las_img, las = load_volume(las_path, Normalization.MINMAX)
    np.testing.assert_array_equal(ras, las)
    np.testing.assert_allclose(las_img.affine, ras_img.affine)
    with pytest.raises(InputMissingError):
        load_volume(tmp_path / "nothing.nii.gz", Normalization.MINMAX)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(ras_path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"Cannot read preprocessed image .*truncated\.nii\.gz"):
        load_volume(truncated, Normalization.MINMAX)


# --- storage ----------------------------------------------------------------------------------------------


def test_write_load_round_trip_without_pickle(tmp_path: Path) -> None:
    tensor = extract_tensor(_volume(), ExtractionMode.PATCH, _cfg())
    path = tmp_path / "deeplearning" / "sub-01_desc-patch_T1w.npy"
    write_tensor(path, tensor, {"Mode": "patch", "Complete": False, "Shape": "stale"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["sub-01_desc-patch_T1w.json", path.name]
    sidecar = read_sidecar(path)
    assert sidecar["Shape"] == list(tensor.shape) and sidecar["Dtype"] == "float32"
    assert sidecar["Mode"] == "patch" and sidecar["Complete"] is True
    assert list(json.loads(sidecar_path(path).read_text()))[-1] == "Complete"
    plain = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(plain, tensor)
    mapped = load_tensor(path)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped[5], tensor[5])
    assert not isinstance(load_tensor(path, mmap=False), np.memmap)
    assert is_tensor_complete(path, {"Mode": "patch"}) and not is_tensor_complete(path, {"Mode": "slice"})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_load_part_reads_one_part(dtype: type, tmp_path: Path) -> None:
    tensor: np.ndarray = extract_tensor(_volume(), ExtractionMode.SLICE, _cfg()).astype(dtype)
    path = tmp_path / "slices.npy"
    write_tensor(path, tensor, {"Mode": "slice"})
    for index in (0, 3, tensor.shape[0] - 1):
        part = load_part(path, index)
        assert part.shape == tensor.shape[1:] and part.dtype == tensor.dtype and part.flags.writeable
        np.testing.assert_array_equal(part, tensor[index])
    with pytest.raises(IndexError, match="out of range"):
        load_part(path, tensor.shape[0])
    path.write_bytes(path.read_bytes()[:-10])  # a torn write of the last part
    np.testing.assert_array_equal(load_part(path, 0), tensor[0])
    with pytest.raises(DataError, match="truncated"):
        load_part(path, tensor.shape[0] - 1)
    sidecar_path(path).unlink()
    with pytest.raises(DataError, match="has no sidecar"):
        load_part(path, 0)


def test_float16_storage_option(tmp_path: Path) -> None:
    volume = _volume()
    tensor = extract_tensor(volume, ExtractionMode.SLICE, _cfg(dtype=TensorDtype.FLOAT16))
    assert tensor.dtype == np.float16
    np.testing.assert_allclose(tensor[0, 0], volume[2], atol=1e-3)
    path = tmp_path / "half.npy"
    write_tensor(path, tensor, {})
    assert read_sidecar(path)["Dtype"] == "float16"
    loaded = load_tensor(path)
    assert loaded.dtype == np.float16 and path.stat().st_size < tensor.size * 2 + 200


def test_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    sidecar_path(path).write_text(json.dumps({"Shape": [2], "Dtype": "object", "Complete": True}))
    with pytest.raises(DataError, match=r"not a readable numeric \.npy"):
        load_tensor(path)
    with pytest.raises(ValueError, match="float32 or float16"):
        write_tensor(tmp_path / "obj.npy", np.array([None], dtype=object), {})


def test_tensor_without_complete_sidecar_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.npy"
    write_tensor(path, np.zeros((2, 1, 3, 3), np.float32), {"Mode": "slice"})

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies after the tensor is in place, before the sidecar

    monkeypatch.setattr(extraction.storage, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_tensor(path, np.ones((4, 1, 3, 3), np.float32), {"Mode": "slice"})
    assert path.is_file() and not sidecar_path(path).exists()
    with pytest.raises(DataError, match="has no sidecar"):
        load_tensor(path)
    assert not is_tensor_complete(path)
    monkeypatch.undo()

    sidecar_path(path).write_text(json.dumps({"Shape": [4, 1, 3, 3], "Dtype": "float32", "Complete": False}))
    with pytest.raises(DataError, match="not marked Complete"):
        load_tensor(path)
    sidecar_path(path).write_text(json.dumps({"Shape": [2, 1, 3, 3], "Dtype": "float32", "Complete": True}))
    with pytest.raises(DataError, match=r"has shape \[4, 1, 3, 3\].*sidecar says \[2, 1, 3, 3\]"):
        load_tensor(path)
    with pytest.raises(InputMissingError):
        load_tensor(tmp_path / "absent.npy")


# --- parameters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "changes", "message"),
    [
        (ExtractionMode.PATCH, {"patch_size": 13}, r"patch_size 13 is larger .* \(12, 14, 10\)"),
        (ExtractionMode.PATCH, {"patch_size": 0}, "patch_size must be a positive"),
        (ExtractionMode.PATCH, {"stride": 0}, "stride must be a positive number of voxels, got 0"),
        (ExtractionMode.PATCH, {"stride": -2}, "got -2"),
        (ExtractionMode.SLICE, {"discarded_slices": 6}, r"discarded_slices 6 .* \(12, 14, 10\)"),
        (ExtractionMode.SLICE, {"discarded_slices": 5, "slice_direction": SliceDirection.AXIAL}, "axis 2"),
        (ExtractionMode.SLICE, {"discarded_slices": -1}, "must be >= 0"),
        (ExtractionMode.ROI, {}, "needs ROI masks"),
    ],
)
def test_invalid_parameters_raise_config_error(mode: ExtractionMode, changes: dict[str, object], message: str) -> None:
    cfg = _cfg(**changes)
    with pytest.raises(ConfigError, match=message):
        n_parts(mode, cfg, SHAPE)
    with pytest.raises(ConfigError, match=message):
        extract_tensor(_volume(), mode, cfg)


def test_largest_valid_parameters_still_extract() -> None:
    assert extract_tensor(_volume(), ExtractionMode.PATCH, _cfg(patch_size=10, stride=100)).shape[0] == 1
    assert extract_tensor(_volume(), ExtractionMode.SLICE, _cfg(discarded_slices=5)).shape[0] == 2


def test_mode_parameters_for_the_sidecar() -> None:
    cfg = _cfg(roi_masks=(("hippocampus", Path("/m/h.nii.gz")), ("amygdala", Path("/m/a.nii.gz"))))
    assert mode_parameters(ExtractionMode.IMAGE, cfg) == {}
    assert mode_parameters(ExtractionMode.PATCH, cfg) == {"PatchSize": 4, "Stride": 4}
    assert mode_parameters(ExtractionMode.SLICE, cfg) == {
        "SliceDirection": "sagittal",
        "SliceAxis": 0,
        "DiscardedSlices": 2,
    }
    assert mode_parameters(ExtractionMode.ROI, cfg)["RoiNames"] == ["hippocampus", "amygdala"]
    assert mode_parameters(ExtractionMode.ROI, cfg, ["x"]) == {"RoiNames": ["x"], "RoiCrop": True}
    for mode in ExtractionMode:
        json.dumps(mode_parameters(mode, cfg))


# --- realistic 1 mm ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_template_crop_with_full_grid_masks(tmp_path: Path) -> None:
    """The 1 mm MNI template cropped to 169x208x179; masks on the full template grid."""
    from bids_app.template import default_template_path, default_tissue_path

    template = nib.load(default_template_path())
    assert isinstance(template, SpatialImage)
    start = ((197 - 169) // 2, (233 - 208) // 2, (189 - 179) // 2)
    cropped = template.slicer[start[0] : start[0] + 169, start[1] : start[1] + 208, start[2] : start[2] + 179]
    image_path = tmp_path / "preproc.nii.gz"
    nib.save(cropped, image_path)
    gm = nib.load(default_tissue_path("gm")).get_fdata() > 0.5  # type: ignore[attr-defined]
    masks_on_grid = {
        "left_gm": gm & (np.arange(197)[:, None, None] < 98),
        "deep": _box_mask(gm.shape, (80, 100, 60), (110, 140, 90)),
    }
    mask_paths = []
    for name, data in masks_on_grid.items():
        mask_paths.append((name, tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(data.astype(np.uint8), template.affine), mask_paths[-1][1])
    cfg = ExtractionConfig(roi_masks=tuple(mask_paths))
    img, volume = load_volume(image_path, cfg.normalization)
    masks = load_roi_masks(cfg.roi_masks, img)
    for name, data in masks_on_grid.items():
        cut = data[start[0] : start[0] + 169, start[1] : start[1] + 208, start[2] : start[2] + 179]
        np.testing.assert_array_equal(masks[name], cut)
    expected = {
        ExtractionMode.IMAGE: (1, 169, 208, 179),
        ExtractionMode.PATCH: (36, 1, 50, 50, 50),
        ExtractionMode.SLICE: (129, 1, 208, 179),
    }
    for mode in ExtractionMode:
        tensor = extract_tensor(volume, mode, cfg, masks)
        assert tensor.shape[0] == n_parts(mode, cfg, volume.shape)
        if mode in expected:
            assert tensor.shape == expected[mode]
        path = tmp_path / f"{mode.value}.npy"
        write_tensor(path, tensor, {"Mode": mode.value})
        np.testing.assert_array_equal(load_tensor(path)[-1], tensor[-1])
