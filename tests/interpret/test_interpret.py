"""Saliency maps: the methods' mathematics, the stitching of part maps, and the interpret stage's NIfTI files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from bids_app.config import (
    AnalysisLevel,
    ExtractionConfig,
    ExtractionMode,
    InterpretConfig,
    RunConfig,
    RuntimeConfig,
    Task,
    TrainConfig,
)
from bids_app.errors import ConfigError, DataError
from bids_app.interpret.saliency import (
    SaliencyMethod,
    grad_cam,
    grad_cam_from_activations,
    integrated_gradients,
    stitch_parts,
    vanilla_gradients,
)
from bids_app.interpret.stage import check_interpret_config, run_interpret_stage
from bids_app.interpret.volumes import map_name
from bids_app.maps import Maps
from tests.conftest import make_cohort, run_cli

CROP = (40, 48, 40)
PATCH, STRIDE, DISCARDED = 16, 12, 4


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# -- Grad-CAM weights ---------------------------------------------------------------------------------


def test_grad_cam_weights_average_over_all_three_spatial_axes() -> None:
    """Gradients +1 in the first depth slice and -3 in the second: the channel weight is -1 everywhere.

    Averaging over two axes only (ClinicaDL) would give the first slice weight +1 and a positive map there.
    """
    activations = torch.ones(1, 1, 2, 3, 3)
    gradients = torch.ones(1, 1, 2, 3, 3)
    gradients[:, :, 1] = -3.0
    cam = grad_cam_from_activations(activations, gradients, (2, 3, 3))
    assert cam.shape == (1, 2, 3, 3)
    assert torch.equal(cam, torch.zeros(1, 2, 3, 3))
    two_axes = torch.relu((gradients.mean(dim=(3, 4), keepdim=True) * activations).sum(dim=1))
    assert two_axes[0, 0].min() == 1.0  # what the two-axis average would have shown


def test_grad_cam_is_the_relu_of_the_channel_weighted_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    activations = torch.rand(2, 3, 4, 5, 6, generator=generator)
    gradients = torch.randn(2, 3, 4, 5, 6, generator=generator)
    weights = gradients.mean(dim=(2, 3, 4))  # (N, K): one scalar per channel and sample
    expected = torch.relu(torch.einsum("nk,nkdhw->ndhw", weights, activations))
    cam = grad_cam_from_activations(activations, gradients, (4, 5, 6))  # same size: interpolation is identity
    torch.testing.assert_close(cam, expected)
    permuted = grad_cam_from_activations(
        activations.permute(0, 1, 4, 2, 3), gradients.permute(0, 1, 4, 2, 3), (6, 4, 5)
    )
    torch.testing.assert_close(permuted, cam.permute(0, 3, 1, 2))  # no axis is special


def test_grad_cam_upsamples_2d_and_3d_maps_to_the_input_size() -> None:
    assert grad_cam_from_activations(torch.rand(2, 4, 3, 5), torch.rand(2, 4, 3, 5), (12, 20)).shape == (2, 12, 20)
    assert grad_cam_from_activations(torch.rand(1, 4, 2, 3, 2), torch.rand(1, 4, 2, 3, 2), (9, 10, 11)).shape == (
        1, 9, 10, 11)  # fmt: skip


def test_vanilla_gradients_of_a_linear_model_are_its_absolute_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 4, 2)).eval()
    x = torch.rand(2, 2, 3, 4)  # two channels: the map is the channel maximum
    maps = vanilla_gradients(model, x, torch.tensor([0, 1]))
    weights = model[1].weight.detach().reshape(2, 2, 3, 4).abs()
    torch.testing.assert_close(maps, torch.stack([weights[0].amax(dim=0), weights[1].amax(dim=0)]))


# -- a model with a known discriminative region ---------------------------------------------------------

SIDE = 12
CUBE = (slice(2, 6), slice(6, 10), slice(4, 8))


def cube_volumes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise volumes ``(n, 1, 12, 12, 12)``; odd samples (class 1) have a bright 4³ cube at ``CUBE``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 0.1, (n, 1, SIDE, SIDE, SIDE)).astype(np.float32)
    y = np.arange(n) % 2
    x[(y == 1).nonzero()[0][:, None], 0, CUBE[0], CUBE[1], CUBE[2]] += 0.6
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def cube_model() -> torch.nn.Module:
    from bids_app.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=(1, SIDE, SIDE, SIDE), n_outputs=2,
                        dropout=0.0)  # fmt: skip
    x, y = cube_volumes(32, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(25):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_cube_model_separates_the_classes(cube_model) -> None:
    x, y = cube_volumes(16, seed=1)
    with torch.no_grad():
        assert torch.equal(cube_model(x).argmax(dim=1), y)


@pytest.mark.parametrize("method", list(SaliencyMethod))
def test_saliency_peaks_in_the_discriminative_cube(cube_model, method: SaliencyMethod) -> None:
    from bids_app.models import grad_cam_layer

    x, y = cube_volumes(16, seed=1)
    positives = x[y == 1]
    targets = torch.ones(len(positives), dtype=torch.int64)
    if method is SaliencyMethod.GRAD_CAM:
        maps = grad_cam(cube_model, grad_cam_layer(cube_model), positives, targets)
    elif method is SaliencyMethod.GRADIENTS:
        maps = vanilla_gradients(cube_model, positives, targets)
    else:
        maps = integrated_gradients(cube_model, positives, targets, n_steps=8)
    assert maps.shape == (len(positives), SIDE, SIDE, SIDE)
    inside = torch.zeros(SIDE, SIDE, SIDE, dtype=torch.bool)
    inside[CUBE] = True
    n_cube = int(inside.sum())
    chance = n_cube / inside.numel()  # 64 / 1728 = 0.037
    for single in maps:
        assert inside.flatten()[single.argmax()], "the strongest voxel lies outside the cube"
        top = torch.topk(single.flatten(), n_cube).indices
        assert inside.flatten()[top].float().mean() > 10 * chance  # >= 37 % of the top voxels vs 3.7 % by chance


def test_integrated_gradients_sum_to_the_logit_difference(cube_model) -> None:
    """Completeness: attributions add up to f(x) - f(0) for the explained class."""
    x, _ = cube_volumes(4, seed=2)
    targets = torch.tensor([0, 1, 1, 0])
    attributions = integrated_gradients(cube_model, x, targets, n_steps=24)
    with torch.no_grad():
        difference = cube_model(x) - cube_model(torch.zeros_like(x))
    expected = difference.gather(1, targets.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), expected, rtol=0.05, atol=0.05)


def test_the_target_class_changes_the_map(cube_model) -> None:
    x, _ = cube_volumes(2, seed=3)
    for explain in (vanilla_gradients, lambda m, v, t: integrated_gradients(m, v, t, 4)):
        first, second = explain(cube_model, x, torch.tensor([0, 0])), explain(cube_model, x, torch.tensor([1, 1]))
        assert not torch.allclose(first, second)


# -- stitching ----------------------------------------------------------------------------------------


def test_patch_maps_overlapping_parts_are_averaged() -> None:
    from bids_app.extraction import extract_patches

    shape = (10, 8, 8)
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    patches = extract_patches(volume, 4, 3)[:, 0]  # origins 0, 3, 6 along axis 0; 0, 3 along the others
    stitched = stitch_parts(patches, ExtractionMode.PATCH, {"PatchSize": 4, "Stride": 3}, shape)
    np.testing.assert_array_equal(stitched[:, :7, :7], volume[:, :7, :7])  # the volume, read back
    assert not stitched[:, 7:, :].any() and not stitched[:, :, 7:].any()  # in no patch
    ones = stitch_parts(np.arange(1, 13, dtype=np.float32)[:, None, None, None] * np.ones((12, 4, 4, 4)),
                        ExtractionMode.PATCH, {"PatchSize": 4, "Stride": 3}, shape)  # fmt: skip
    assert ones[3, 0, 0] == pytest.approx((1 + 5) / 2)  # patches 0 (origin 0,0,0) and 4 (origin 3,0,0)
    assert ones[3, 3, 3] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8)


def test_slice_maps_go_back_to_their_axis_with_discarded_slices_empty() -> None:
    from bids_app.config import SliceDirection
    from bids_app.extraction import extract_slices

    shape = (5, 8, 6)
    volume = np.random.default_rng(0).random(shape).astype(np.float32) + 1
    slices = extract_slices(volume, SliceDirection.CORONAL, 2)[:, 0]
    stitched = stitch_parts(slices, ExtractionMode.SLICE, {"SliceAxis": 1, "DiscardedSlices": 2}, shape)
    np.testing.assert_array_equal(stitched[:, 2:6], volume[:, 2:6])
    assert not stitched[:, :2].any() and not stitched[:, 6:].any()
    with pytest.raises(DataError, match="do not fit axis 0"):
        stitch_parts(slices, ExtractionMode.SLICE, {"SliceAxis": 0, "DiscardedSlices": 2}, shape)


def test_roi_maps_fill_their_masks_and_average_overlaps() -> None:
    from bids_app.extraction import extract_rois

    shape = (8, 8, 8)
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    first[1:4, 1:4, 1:4] = True
    second[2:6, 2:5, 2:4] = True
    volume = np.random.default_rng(1).random(shape).astype(np.float32) + 1
    for crop in (True, False):
        rois = extract_rois(volume, {"a": first, "b": second}, crop)[:, 0]
        stitched = stitch_parts(rois, ExtractionMode.ROI, {"RoiCrop": crop}, shape, [first, second])
        np.testing.assert_allclose(stitched[first | second], volume[first | second])
        assert not stitched[~(first | second)].any()
    constant = np.stack([np.full(rois.shape[1:], 1.0), np.full(rois.shape[1:], 3.0)])
    stitched = stitch_parts(constant, ExtractionMode.ROI, {"RoiCrop": False}, shape, [first, second])
    assert stitched[3, 3, 3] == 2.0 and stitched[1, 1, 1] == 1.0 and stitched[5, 4, 3] == 3.0


def test_image_map_of_another_shape_is_refused() -> None:
    with pytest.raises(DataError, match="does not fit the image grid"):
        stitch_parts(np.zeros((1, 4, 4, 4)), ExtractionMode.IMAGE, {}, (4, 4, 5))


# -- options ------------------------------------------------------------------------------------------


def test_interpret_options_are_checked() -> None:
    methods, target = check_interpret_config(InterpretConfig(methods=("grad_cam", "gradients", "grad_cam")))
    assert methods == (SaliencyMethod.GRAD_CAM, SaliencyMethod.GRADIENTS) and target == "predicted"
    with pytest.raises(ConfigError, match="Did you mean 'grad_cam'"):
        check_interpret_config(InterpretConfig(methods=("gradcam",)))
    with pytest.raises(ConfigError, match="predicted or true"):
        check_interpret_config(InterpretConfig(target="both"))
    with pytest.raises(ConfigError, match="n_steps >= 1"):
        check_interpret_config(InterpretConfig(n_steps=0))
    assert (
        map_name("sub-01", "n/a", SaliencyMethod.INTEGRATED_GRADIENTS)
        == "sub-01_desc-integratedgradients_saliency.nii.gz"
    )


# -- the stage on real participant-level outputs --------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    """8 participants at 4 mm (template space, non-identity affine): image, patch, slice and roi tensors."""
    root = tmp_path_factory.mktemp("interpret")
    mask = root / "bids" / "code" / "template" / "roi-hippocampus_mask.nii.gz"  # written by the generator
    return make_cohort(root, 8, 1, "--modes", "image", "patch", "slice", "roi", "--patch-size", str(PATCH),
                       "--stride", str(STRIDE), "--discarded-slices", str(DISCARDED),
                       "--roi-mask", f"hippocampus={mask}", "--skip-bids-validation")  # fmt: skip


@pytest.fixture(scope="module")
def trained(cohort):
    """A small_cnn trained for one epoch on images (one train/validation split), through the CLI."""
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "--stages", "split", "train"))
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out, out / "models" / "cnn"


def group_args(dataset, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "1", "--test-size", "0.25",
            "--model-name", "cnn", "--seed", "5", *extra]  # fmt: skip


def source_image(out: Path, tensor_json: Path) -> nib.Nifti1Image:
    return nib.load(out / json.loads(tensor_json.read_text())["Source"])


def assert_on_source_grid(map_path: Path, source: nib.Nifti1Image) -> np.ndarray:
    saliency = nib.load(map_path)
    assert saliency.shape == source.shape
    np.testing.assert_allclose(saliency.affine, source.affine, atol=1e-5)
    assert saliency.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    return np.asarray(saliency.dataobj)


def test_cli_interpret_writes_maps_in_template_space(trained, tmp_path: Path) -> None:
    dataset, out, maps = trained
    config = tmp_path / "interpret.toml"
    config.write_text("[interpret]\nn_steps = 2\n")
    result = run_cli(*group_args(dataset, out, "--stages", "interpret", "--config", str(config)))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = maps / "split-0/best-loss/test/interpret"
    targets = read_tsv(folder / "targets.tsv")
    test = read_tsv(maps / "groups/test/data.tsv")
    assert list(targets["participant_id"]) == list(test["participant_id"])
    assert (targets["target_label"] == targets["predicted_label"]).all()
    model_sha = hashlib.sha256((maps / "split-0/best-loss/model.safetensors").read_bytes()).hexdigest()
    for method in SaliencyMethod:
        expected = {"interpretation.json"}
        expected |= {map_name(p, s, method) for p, s in zip(test["participant_id"], test["session_id"], strict=True)}
        expected |= {f"class-{c}_desc-{method.label}_mean_saliency.nii.gz" for c in set(targets["target_label"])}
        assert {p.name for p in (folder / method.value).iterdir()} == expected
        metadata = json.loads((folder / method.value / "interpretation.json").read_text())
        assert metadata["ModelSHA256"] == model_sha and metadata["Method"] == method.value
        assert metadata["Target"] == "predicted" and metadata["Mode"] == "image"
        for participant, session in zip(test["participant_id"], test["session_id"], strict=True):
            tensor_json = next((out / participant).rglob("*desc-image_T1w.json"))
            source = source_image(out, tensor_json)
            assert not np.allclose(source.affine, np.eye(4))  # a real template-space affine
            data = assert_on_source_grid(folder / method.value / map_name(participant, session, method), source)
            assert np.isfinite(data).all() and np.abs(data).max() > 0
    metadata = json.loads((folder / "integrated_gradients/interpretation.json").read_text())
    assert metadata["NSteps"] == 2 and metadata["Baseline"] == "zeros"
    assert json.loads((folder / "grad_cam/interpretation.json").read_text())["Layer"] == "features.1.conv"


def part_mode_maps(out: Path, dataset, source_maps: Path, mode: ExtractionMode, name: str) -> tuple[RunConfig, Path]:
    """A MAPS for ``mode`` with a small_cnn whose output bias always predicts AD (same split as ``source_maps``)."""
    from bids_app.data.tables import index_tensors, sample_shape
    from bids_app.derivatives import atomic_write_json
    from bids_app.levels import group_table
    from bids_app.maps.folder import MapsLayout, read_maps_json, write_maps_json
    from bids_app.maps.weights import save_model
    from bids_app.models import build_model

    cfg = RunConfig(dataset.bids_dir, out, AnalysisLevel.GROUP,
                    extraction=ExtractionConfig(roi_masks=(("hippocampus", dataset.roi_mask_path),)),
                    train=TrainConfig(model_name=name, architecture="small_cnn", mode=mode),
                    runtime=RuntimeConfig(device="cpu"),
                    interpret=InterpretConfig(methods=("gradients", "grad_cam")))  # fmt: skip
    table = group_table(cfg, index_tensors(out, mode), cfg.labels, mode)
    shape = sample_shape(table, mode)
    maps_dir = out / "models" / name
    shutil.copytree(source_maps / "groups", maps_dir / "groups")
    shutil.copy(source_maps / "environment.json", maps_dir / "environment.json")
    encoding = read_maps_json(source_maps).label_encoding
    assert encoding == {"AD": 0, "CN": 1}
    torch.manual_seed(0)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=shape, n_outputs=2)
    with torch.no_grad():
        model.classifier.fc2.bias.copy_(torch.tensor([8.0, -8.0]))
    layout = MapsLayout(maps_dir)
    save_model(layout.model_path(0, "loss"), model)
    write_maps_json(maps_dir, cfg, {"input_shape": list(shape), "n_outputs": 2, "label_encoding": encoding})
    atomic_write_json(layout.summary_json(0), {"split": 0})
    run_interpret_stage(cfg, Maps.open(maps_dir), table)
    return cfg, maps_dir


@pytest.mark.parametrize("mode", [ExtractionMode.PATCH, ExtractionMode.SLICE, ExtractionMode.ROI])
def test_part_maps_are_stitched_on_the_preprocessed_grid(trained, mode: ExtractionMode) -> None:
    dataset, out, maps = trained
    _, maps_dir = part_mode_maps(out, dataset, maps, mode, f"fake{mode.value}")
    folder = maps_dir / "split-0/best-loss/test/interpret"
    test = read_tsv(maps / "groups/test/data.tsv")
    mask = None
    for participant, session in zip(test["participant_id"], test["session_id"], strict=True):
        tensor_json = next((out / participant).rglob(f"*desc-{mode.value}_T1w.json"))
        source = source_image(out, tensor_json)
        assert source.shape == CROP
        for method in (SaliencyMethod.GRADIENTS, SaliencyMethod.GRAD_CAM):
            data = assert_on_source_grid(folder / method.value / map_name(participant, session, method), source)
            covered = method is SaliencyMethod.GRADIENTS  # Grad-CAM's ReLU may blank whole parts
            if mode is ExtractionMode.PATCH:  # patches start at 0, 12, 24: voxels 40-47 of axis 1 are in none
                assert not data[:, 40:, :].any() and (not covered or (data[:, :40, :] != 0).mean() > 0.5)
            elif mode is ExtractionMode.SLICE:  # sagittal: axis 0, 4 slices discarded at each end
                assert not data[:DISCARDED].any() and not data[-DISCARDED:].any()
                assert not covered or all(data[i].any() for i in range(DISCARDED, CROP[0] - DISCARDED))
            else:
                from bids_app.extraction import load_roi_masks

                mask = load_roi_masks([("hippocampus", dataset.roi_mask_path)], source)["hippocampus"]
                assert not data[~mask].any() and (not covered or (data[mask] != 0).mean() > 0.5)
    assert mode is not ExtractionMode.ROI or mask is not None


def test_target_true_explains_the_true_class_when_the_prediction_is_wrong(trained) -> None:
    dataset, out, maps = trained
    cfg, maps_dir = part_mode_maps(out, dataset, maps, ExtractionMode.IMAGE, "biased")
    folder = maps_dir / "split-0/best-loss/test/interpret"
    predicted = read_tsv(folder / "targets.tsv")
    assert (predicted["predicted_label"] == "AD").all() and (predicted["target_label"] == "AD").all()
    wrong = predicted["true_label"] != predicted["predicted_label"]
    assert wrong.any() and not wrong.all(), "the test group should hold both classes"
    paths = [folder / "gradients" / map_name(p, s, SaliencyMethod.GRADIENTS)
             for p, s in zip(predicted["participant_id"], predicted["session_id"], strict=True)]  # fmt: skip
    before = [np.asarray(nib.load(p).dataobj) for p in paths]
    run_interpret_stage(dataclasses.replace(cfg, interpret=dataclasses.replace(cfg.interpret, target="true")),
                        Maps.open(maps_dir), table_for(cfg))  # fmt: skip
    true = read_tsv(folder / "targets.tsv")
    assert (true["target_label"] == true["true_label"]).all()
    for is_wrong, path, old in zip(wrong, paths, before, strict=True):
        new = np.asarray(nib.load(path).dataobj)
        assert np.allclose(new, old) != is_wrong
    assert {p.name for p in (folder / "gradients").glob("class-*")} == {
        f"class-{c}_desc-gradients_mean_saliency.nii.gz" for c in set(true["true_label"])}  # fmt: skip
    assert json.loads((folder / "gradients/interpretation.json").read_text())["Target"] == "true"


def table_for(cfg: RunConfig) -> pd.DataFrame:
    from bids_app.data.tables import index_tensors
    from bids_app.levels import group_table

    return group_table(cfg, index_tensors(cfg.output_dir, cfg.train.mode), cfg.labels, cfg.train.mode)


def test_a_mode_other_than_the_models_gives_way_to_the_models_mode(trained) -> None:
    """--mode slice with an image model: the model folder decides, so its image tensors are explained."""
    dataset, out, maps = trained
    args = group_args(dataset, out, "--stages", "interpret", "--interpret-methods", "gradients",
                      "--interpret-group", "validation")  # fmt: skip
    args[args.index("--mode") + 1] = "slice"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained on image tensors" in result.stderr and "not --mode slice" in result.stderr
    folder = maps / "split-0/best-loss/validation/interpret"
    assert json.loads((folder / "gradients/interpretation.json").read_text())["Mode"] == "image"
    validation = read_tsv(maps / "groups/split-0/validation.tsv")
    assert list(read_tsv(folder / "targets.tsv")["participant_id"]) == list(validation["participant_id"])
    for participant, session in zip(validation["participant_id"], validation["session_id"], strict=True):
        source = source_image(out, next((out / participant).rglob("*desc-image_T1w.json")))
        assert_on_source_grid(folder / "gradients" / map_name(participant, session, SaliencyMethod.GRADIENTS), source)
    assert not list(maps.rglob("*slice*"))
