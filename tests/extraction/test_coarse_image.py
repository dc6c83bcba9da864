"""Coarse image mode (``--image-voxel-size``): grid arithmetic, anti-aliasing, refusals, the settings guard and
saliency maps put back on the template grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from bids_app.config import ExtractionConfig, ExtractionMode, Task
from bids_app.data.origin import settings_differences, tensor_settings
from bids_app.errors import ConfigError
from bids_app.extraction import (
    check_image_voxel_size,
    coarse_grid,
    extract_tensor,
    mode_parameters,
    resample_to_voxel_size,
)
from bids_app.interpret.volumes import ImageGrid, TensorGrid, to_source_grid
from bids_app.models import build_model, check_compatibility
from tests.conftest import TINY_CROP, make_dataset, run_cli

AFFINE_4MM = np.array([[4.0, 0, 0, -96.0], [0, 4.0, 0, -132.0], [0, 0, 4.0, -78.0], [0, 0, 0, 1]])
CROP = tuple(int(v) for v in TINY_CROP)  # 40 x 48 x 40 voxels of 4 mm


def checkerboard(shape: tuple[int, int, int]) -> np.ndarray:
    return (np.indices(shape).sum(axis=0) % 2).astype(np.float32)


# -- the grid ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "voxel_mm", "expected"),
    [
        (CROP, 8.0, (20, 24, 20)),  # whole multiples: exactly half
        ((49, 58, 47), 8.0, (25, 29, 24)),  # the tiny template's full frame: ceil(49/2), ceil(58/2), ceil(47/2)
        (CROP, 12.0, (14, 16, 14)),  # ceil(40/3), 48/3, ceil(40/3)
        (CROP, 6.0, (27, 32, 27)),  # a non-integer ratio of 1.5: ceil(40/1.5), 48/1.5
        (CROP, 4.0, CROP),  # the template's own size: the same grid
    ],
)
def test_coarse_grid_covers_the_field_of_view(shape, voxel_mm: float, expected) -> None:
    coarse_shape, affine = coarse_grid(shape, AFFINE_4MM, voxel_mm)
    assert coarse_shape == expected
    np.testing.assert_allclose(np.diag(affine)[:3], [voxel_mm] * 3)
    # the outer face of the first voxel stays put: centre moves by half the difference of the voxel sizes
    np.testing.assert_allclose(affine[:3, 3], AFFINE_4MM[:3, 3] + (voxel_mm - 4.0) / 2.0)
    volume = np.zeros(shape, dtype=np.float32)
    resampled, resampled_affine = resample_to_voxel_size(volume, AFFINE_4MM, voxel_mm)
    assert resampled.shape == expected and resampled.dtype == np.float32
    np.testing.assert_array_equal(resampled_affine, affine)


def test_extract_tensor_uses_the_option_and_records_it() -> None:
    volume = np.random.default_rng(0).random(CROP, dtype=np.float32)
    cfg = ExtractionConfig(image_voxel_size=8.0)
    assert extract_tensor(volume, ExtractionMode.IMAGE, cfg, affine=AFFINE_4MM).shape == (1, 20, 24, 20)
    assert mode_parameters(ExtractionMode.IMAGE, cfg) == {"VoxelSize": 8.0}
    assert mode_parameters(ExtractionMode.IMAGE, ExtractionConfig()) == {}  # unchanged hash on the template grid
    assert extract_tensor(volume, ExtractionMode.IMAGE, ExtractionConfig()).shape == (1, *CROP)
    # the option is for image mode: a patch is still cut from the template grid
    patches = extract_tensor(volume, ExtractionMode.PATCH, dataclasses.replace(cfg, patch_size=8, stride=8))
    assert patches.shape == (5 * 6 * 5, 1, 8, 8, 8)


# -- anti-aliasing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("voxel_mm", [8.0, 12.0])
def test_a_one_voxel_checkerboard_averages_to_its_mean(voxel_mm: float) -> None:
    coarse, _ = resample_to_voxel_size(checkerboard(CROP), AFFINE_4MM, voxel_mm)
    # without the prefilter, sampling every third voxel (12 mm) would return the checkerboard itself (0 or 1)
    np.testing.assert_allclose(coarse, 0.5, atol=0.03)
    assert coarse.std() < 0.005


def test_a_block_keeps_its_intensity_and_its_mass() -> None:
    volume = np.zeros(CROP, dtype=np.float32)
    volume[8:32, 12:36, 8:32] = 3.0  # 24 voxels = 96 mm a side
    coarse, _ = resample_to_voxel_size(volume, AFFINE_4MM, 8.0)
    np.testing.assert_allclose(coarse[7:9, 9:11, 7:9], 3.0, atol=1e-4)  # the block's middle
    assert coarse.sum() * 8 == pytest.approx(volume.sum(), rel=1e-3)  # 8 fine voxels per coarse one
    assert coarse.min() >= 0 and coarse.max() <= 3.0 + 1e-5  # no ringing


def test_the_template_voxel_size_leaves_the_volume_unchanged() -> None:
    volume = np.random.default_rng(1).random(CROP, dtype=np.float32)
    same, affine = resample_to_voxel_size(volume, AFFINE_4MM, 4.0)
    np.testing.assert_array_equal(same, volume)
    np.testing.assert_array_equal(affine, AFFINE_4MM)


def test_a_voxel_size_finer_than_the_template_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--image-voxel-size .* is 3 mm, finer than the 4 mm voxels .* >= 4"):
        check_image_voxel_size(3.0, AFFINE_4MM, "template tpl-x.nii.gz")
    with pytest.raises(ConfigError, match="finer than the 4 mm"):
        resample_to_voxel_size(np.zeros(CROP, dtype=np.float32), AFFINE_4MM, 2.0)
    check_image_voxel_size(4.0, AFFINE_4MM)  # equal is allowed


# -- the guard and interpretation ----------------------------------------------------------------------------


def test_the_guard_compares_the_voxel_size_of_image_tensors() -> None:
    template_grid = tensor_settings({"Mode": "image", "ModeParameters": {}})
    coarse = tensor_settings({"Mode": "image", "ModeParameters": {"VoxelSize": 8}})
    assert template_grid["image_voxel_size"] is None and coarse["image_voxel_size"] == 8.0
    assert settings_differences(coarse, template_grid) == [("image_voxel_size", 8.0, None)]
    assert "image_voxel_size" not in tensor_settings({"Mode": "patch", "ModeParameters": {"PatchSize": 8}})


def test_maps_on_the_coarse_grid_land_at_their_world_position() -> None:
    shape, affine = coarse_grid(CROP, AFFINE_4MM, 8.0)
    centres = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape)) + affine[:3, 3, None, None, None]
    ramp = centres[0] + 2 * centres[1] - centres[2]  # linear in world mm: trilinear sampling is exact inside
    fine = to_source_grid(ramp.astype(np.float32), TensorGrid(affine, shape), ImageGrid(Path("x"), AFFINE_4MM, CROP,
                                                                                            1, 1))  # fmt: skip
    assert fine.shape == CROP
    world = np.einsum("ij,j...->i...", AFFINE_4MM[:3, :3], np.indices(CROP)) + AFFINE_4MM[:3, 3, None, None, None]
    expected = world[0] + 2 * world[1] - world[2]
    np.testing.assert_allclose(fine[1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], atol=1e-3)


# -- the coarse entries of the model registry ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "features"),
    [("conv4_fc3_2mm", (1, 85, 104, 90), (128, 6, 7, 6)), ("conv3_fc3_3mm", (1, 57, 70, 60), (64, 8, 9, 8))],
)
def test_coarse_architectures_fit_their_grids(name: str, shape, features) -> None:
    check_compatibility(name, Task.CLASSIFICATION, ExtractionMode.IMAGE, shape)
    model = build_model(name, task=Task.CLASSIFICATION, input_shape=shape, n_outputs=2)
    assert model.feature_shape(shape) == features  # type: ignore[operator]
    with torch.no_grad():  # the flattened size fc1 was built for is what the convolutions really give
        assert tuple(model.features(torch.zeros(1, *shape)).shape[1:]) == features  # type: ignore[operator]
    with pytest.raises(ConfigError, match="takes 3D inputs"):
        check_compatibility(name, Task.CLASSIFICATION, ExtractionMode.SLICE, (1, 85, 104))


# -- through the command line --------------------------------------------------------------------------------


def participant(dataset, out: Path, *extra: str):
    return run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir), "--template",
                   str(dataset.template_path), "--crop-shape", *TINY_CROP, "--skip-bids-validation", "--nprocs", "2",
                   *extra)  # fmt: skip


def group(dataset, out: Path, *extra: str):
    return run_cli(str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
                   "--mode", "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "1", "--test-size", "2",
                   "--model-name", "cnn", "--seed", "5", "--no-baseline", *extra)  # fmt: skip


def test_bad_values_are_refused_before_anything_is_written(tiny_dataset, tmp_path: Path) -> None:
    for extra, words in (
        (("--image-voxel-size", "2"), "finer than the 4 mm voxels of template"),
        (("--image-voxel-size", "0"), "--image-voxel-size (extraction.image_voxel_size) 0.0"),
        (("--image-voxel-size", "8", "--modes", "patch"), "resamples image-mode tensors only"),
    ):
        result = participant(tiny_dataset, tmp_path / "out", *extra)
        assert result.returncode == 64, result.stderr[-2000:]
        assert words in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def coarse(tmp_path_factory: pytest.TempPathFactory):
    """6 tiny participants' image tensors at 8 mm; a small_cnn trained on them for one epoch (2 tested, predicted)."""
    root = tmp_path_factory.mktemp("coarse")
    dataset = make_dataset(root, 6, 1, seed=61)
    out = root / "out"
    made = participant(dataset, out, "--modes", "image", "--image-voxel-size", "8")
    assert made.returncode == 0, made.stderr[-3000:]
    trained = group(dataset, out, "--stages", "split", "train", "predict")
    assert trained.returncode == 0, trained.stderr[-3000:]
    return dataset, out


def test_tensors_and_sidecars_are_on_the_coarse_grid(coarse) -> None:
    _, out = coarse
    sidecars = sorted(out.glob("sub-*/**/*desc-image_T1w.json"))
    assert len(sidecars) == 6
    for path in sidecars:
        sidecar = json.loads(path.read_text())
        source = nib.load(out / sidecar["Source"])
        assert source.shape == CROP
        assert sidecar["Shape"] == [1, 20, 24, 20] and sidecar["ModeParameters"] == {"VoxelSize": 8.0}
        _, expected = coarse_grid(CROP, source.affine, 8.0)
        np.testing.assert_allclose(sidecar["Grid"]["Affine"], expected, atol=1e-5)
        assert sidecar["Grid"]["VoxelSize"] == [8.0, 8.0, 8.0]
        assert np.load(path.with_suffix(".npy")).shape == (1, 20, 24, 20)


def test_saliency_maps_go_back_to_the_template_grid(coarse) -> None:
    dataset, out = coarse
    result = group(dataset, out, "--stages", "interpret", "--interpret-methods", "gradients", "grad_cam")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "models" / "cnn" / "split-0" / "best-loss" / "test" / "interpret"
    maps = sorted(folder.glob("*/sub-*_saliency.nii.gz"))
    n_test = len(pd.read_csv(out / "models" / "cnn" / "groups" / "test" / "data.tsv", sep="\t"))
    assert n_test >= 1 and len(maps) == 2 * n_test
    for path in maps:
        participant_id = path.name.split("_")[0]  # one session each
        tensor = next((out / participant_id).rglob("*desc-image_T1w.json"))
        source = nib.load(out / json.loads(tensor.read_text())["Source"])
        saliency = nib.load(path)
        assert saliency.shape == source.shape == CROP
        np.testing.assert_allclose(saliency.affine, source.affine, atol=1e-5)
        assert np.asarray(saliency.dataobj).any()


def test_a_model_trained_at_8_mm_refuses_template_grid_tensors_and_from_model_remakes_them(
    coarse, tmp_path: Path
) -> None:
    dataset, out = coarse
    other = tmp_path / "other"
    test_rows = pd.read_csv(out / "models" / "cnn" / "groups" / "test" / "data.tsv", sep="\t")
    label = str(test_rows["participant_id"].iloc[0]).removeprefix("sub-")  # never seen in training: no leak
    made = participant(dataset, other, "--modes", "image", "--participant-label", label)
    assert made.returncode == 0, made.stderr[-3000:]
    refused = group(dataset, out, "--stages", "predict", "--predict-from", str(other), "--group-name", "fine")
    assert refused.returncode == 65, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "image_voxel_size none (the template grid)" in line and "image_voxel_size 8 mm" in line
    assert "--from-model" in line
    maps = out / "models" / "cnn"
    contradicted = participant(dataset, other, "--from-model", str(maps), "--image-voxel-size", "4", "--overwrite")
    assert contradicted.returncode == 64, contradicted.stderr[-3000:]
    assert "--image-voxel-size 4.0 contradicts --from-model" in contradicted.stderr
    remade = participant(dataset, other, "--from-model", str(maps), "--participant-label", label, "--overwrite")
    assert remade.returncode == 0, remade.stderr[-3000:]
    (sidecar,) = other.glob(f"sub-{label}/**/*desc-image_T1w.json")
    assert json.loads(sidecar.read_text())["ModeParameters"] == {"VoxelSize": 8.0}
    predicted = group(dataset, out, "--stages", "predict", "--predict-from", str(other), "--group-name", "fine")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(pd.read_csv(maps / "split-0" / "best-loss" / "fine" / "fine_image_level_prediction.tsv", sep="\t")) == 1
