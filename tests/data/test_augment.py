"""Augmentation (TorchIO and hand-written transforms): shapes, seeding, torch's generator, left-right flips,
bitwise-identical training with one seed, and names refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bids_app.config import ExtractionMode, SliceDirection, Task
from bids_app.data.augment import AFFINE_SHIFT, AUGMENTATIONS, MAX_NOISE_SD, MAX_SCALE_CHANGE, build_augmentation
from bids_app.errors import ConfigError
from tests.conftest import run_cli

SHAPES = {
    "image": (1, 16, 18, 14),  # (C, X, Y, Z): image, patch, region
    "two channels": (2, 12, 14, 10),
    "slice": (1, 20, 24),  # (C, H, W)
}
SEEDS = [int(s) for s in np.random.default_rng(0).integers(0, 2**62, 8)]  # like the sampler's seeds


def blob(shape: tuple[int, ...]) -> np.ndarray:
    """A bright asymmetric blob on a ramp: every transform has something to move, blur or darken."""
    rng = np.random.default_rng(0)
    spatial = shape[1:]
    grid = np.indices(spatial, dtype=np.float32)
    centre = [(n - 1) / 2 for n in spatial]
    radius2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    x = np.exp(-radius2 / (2 * (min(spatial) / 5) ** 2)) + 0.05 * grid[0]
    x[(slice(2, 5),) * len(spatial)] += 1.0  # breaks the left-right symmetry
    return np.stack([x * (c + 1) + 0.01 * rng.random(spatial) for c in range(shape[0])]).astype(np.float32)


def augment_with(name: str, shape: tuple[int, ...]):
    mode = ExtractionMode.SLICE if len(shape) == 3 else ExtractionMode.IMAGE
    augment = build_augmentation((name,), mode, SliceDirection.CORONAL)
    assert augment is not None
    return augment


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_each_transform_keeps_shape_and_dtype_and_follows_its_seed(shape: tuple[int, ...]) -> None:
    x = blob(shape)
    original = x.copy()
    for name in AUGMENTATIONS:
        augment = augment_with(name, shape)
        outputs = [augment(x, seed) for seed in SEEDS]
        assert all(o.shape == x.shape and o.dtype == np.float32 and o.flags.c_contiguous for o in outputs), name
        assert all(np.isfinite(o).all() for o in outputs), name
        assert np.array_equal(augment(x, SEEDS[3]), outputs[3]), f"{name}: one seed twice differs"
        changed = [not np.allclose(o, x, atol=1e-4) for o in outputs]
        assert sum(changed) >= 2, f"{name} changed {sum(changed)} of {len(outputs)} samples"
        if name != "flip":  # a flip has a single way to change a sample
            moved = [o.tobytes() for o, c in zip(outputs, changed, strict=True) if c]
            assert len(set(moved)) == len(moved), f"{name}: different seeds give the same output"
    assert np.array_equal(x, original)  # a transform never modifies its input


def test_the_callers_torch_generator_is_untouched_and_irrelevant() -> None:
    x = blob(SHAPES["image"])
    augment = build_augmentation(AUGMENTATIONS, ExtractionMode.IMAGE)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    first = augment(x, 5)
    assert torch.equal(torch.get_rng_state(), before)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), expected_draw)  # the next draw is what it would have been without augmenting
    torch.manual_seed(99)  # another state of the caller's generator: the same augmentation
    assert np.array_equal(augment(x, 5), first)
    assert not np.array_equal(augment(x, 6), first)


@pytest.mark.parametrize(
    ("shape", "direction"), [(SHAPES["image"], None), (SHAPES["slice"], SliceDirection.CORONAL)], ids=["3d", "2d"]
)
def test_flip_mirrors_the_left_right_axis_only(shape: tuple[int, ...], direction: SliceDirection | None) -> None:
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    mode = ExtractionMode.IMAGE if direction is None else ExtractionMode.SLICE
    flip = build_augmentation(("flip",), mode, direction or SliceDirection.SAGITTAL)
    outputs = [flip(x, seed) for seed in range(12)]
    mirrored = x[:, ::-1]
    assert all(np.array_equal(o, x) or np.array_equal(o, mirrored) for o in outputs)
    assert any(np.array_equal(o, mirrored) for o in outputs) and any(np.array_equal(o, x) for o in outputs)


def test_amounts_stay_within_their_documented_bounds() -> None:
    shape = SHAPES["image"]
    x = blob(shape)
    span = float(x.max() - x.min())
    for seed in SEEDS:
        scaled = augment_with("intensity_scaling", shape)(x, seed)
        factor = float(scaled.sum() / x.sum())
        assert 1 - MAX_SCALE_CHANGE - 1e-5 <= factor <= 1 + MAX_SCALE_CHANGE + 1e-5
        np.testing.assert_allclose(scaled, x * factor, rtol=1e-5)
        noisy = augment_with("gaussian_noise", shape)(x, seed)
        assert np.std(noisy - x) <= MAX_NOISE_SD * span * 1.1


def centred_blob(shape: tuple[int, ...]) -> np.ndarray:
    spatial = shape[1:]
    grid = np.indices(spatial, dtype=np.float32)
    radius2 = sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, spatial, strict=True))
    return np.exp(-radius2 / 8.0)[np.newaxis].astype(np.float32)


def centre_of_mass(volume: np.ndarray) -> np.ndarray:
    grid = np.indices(volume.shape).reshape(volume.ndim, -1)
    return (grid * volume.reshape(-1)).sum(axis=1) / volume.sum()


@pytest.mark.parametrize("shape", [SHAPES["image"], SHAPES["slice"]], ids=["3d", "2d"])
def test_affine_shifts_by_at_most_its_bound(shape: tuple[int, ...]) -> None:
    """A centred blob moves by the shift alone (rotations are about the centre): at most 3 voxels per axis."""
    x = centred_blob(shape)
    n_axes = len(shape) - 1
    shifts = [
        np.linalg.norm(centre_of_mass(augment_with("affine", shape)(x, s)[0]) - centre_of_mass(x[0])) for s in SEEDS
    ]
    assert max(shifts) <= AFFINE_SHIFT * np.sqrt(n_axes) + 0.3
    assert max(shifts) > 0.5


def test_slices_deform_in_plane_only() -> None:
    """A slice is a (C, H, W, 1) TorchIO image: a movement across its single plane would leave only the fill
    value, so every geometric transform must keep the slice's content."""
    x = centred_blob(SHAPES["slice"])
    for name in ("affine", "elastic", "motion", "blur"):
        augment = augment_with(name, SHAPES["slice"])
        for seed in SEEDS:
            out = augment(x, seed)
            assert out.max() > 0.5 and out.std() > 0.5 * x.std(), (name, seed)


def test_unknown_names_and_flip_without_a_left_right_axis_are_refused() -> None:
    with pytest.raises(ConfigError) as error:
        build_augmentation(("flip", "wobble"), ExtractionMode.IMAGE)
    assert "'wobble'" in str(error.value) and all(name in str(error.value) for name in AUGMENTATIONS)
    with pytest.raises(ConfigError, match="sagittal"):
        build_augmentation(("flip",), ExtractionMode.SLICE, SliceDirection.SAGITTAL)
    assert build_augmentation(("flip",), ExtractionMode.SLICE, SliceDirection.AXIAL).lr_axis == 0
    assert build_augmentation((), ExtractionMode.IMAGE) is None
    # the order of application is AUGMENTATIONS', whatever order the names come in; repeats count once
    assert build_augmentation(("gamma", "affine", "gamma"), ExtractionMode.IMAGE).names == ("affine", "gamma")


def test_training_twice_with_one_seed_gives_identical_weights(tmp_path: Path) -> None:
    """Two epochs of a small model with TorchIO transforms: the same seed gives byte-identical weight files,
    with or without a loader worker; another seed gives other weights."""
    from tests.training.test_train import make_config, make_data, train

    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    options = {"epochs": 2, "augmentations": ("bias_field", "affine", "flip", "gamma"), "linear_baseline": False}

    def weight_bytes(model_name: str, seed: int = 1, **extra: object) -> dict[str, bytes]:
        maps_dir = train(make_config(tmp_path, seed=seed, model_name=model_name, **options, **extra), table, splits)
        files = sorted(maps_dir.glob("split-0/best-*/model.safetensors"))
        assert files
        return {f.parent.name: f.read_bytes() for f in files}

    first = weight_bytes("first")
    assert weight_bytes("again") == first
    assert weight_bytes("worker", num_workers=1) == first
    assert weight_bytes("other", seed=2) != first


def test_an_unknown_augmentation_exits_64_before_anything_is_written(tmp_path: Path) -> None:
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    result = run_cli(str(bids), str(out), "group", "--skip-bids-validation", "--augmentations", "flip", "wobble")
    assert result.returncode == 64, result.stderr
    assert "'wobble'" in result.stderr and "bias_field" in result.stderr and "elastic" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("shape", [(2, 7, 8, 9), (1, 21, 25, 1)], ids=["3d", "2d"])
def test_the_fast_bias_field_is_torchios_to_the_bit(shape: tuple[int, ...]) -> None:
    """bias_field evaluates TorchIO's polynomial axis by axis (TorchIO's own takes seconds per 1 mm image): the
    same draws give the same field."""
    import torchio as tio

    from bids_app.data.augment import _BiasField

    x = torch.from_numpy(np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    reference = tio.RandomBiasField(coefficients=0.3, order=3, p=0.5)
    n_applied = 0
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected = reference(x)
        torch.manual_seed(seed)
        assert torch.equal(_BiasField(reference)(x), expected)
        n_applied += not torch.equal(expected, x)
    assert 0 < n_applied < len(SEEDS)
