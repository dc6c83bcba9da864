"""Model registry, architectures and transfer learning (bids_app.models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bids_app.config import ExtractionMode, Task
from bids_app.errors import ConfigError
from bids_app.models import (
    build_model,
    check_compatibility,
    freeze_all_but_last,
    grad_cam_layer,
    list_architectures,
    transfer_weights,
)
from bids_app.models.autoencoder import ConvAutoencoder
from bids_app.models.cnn import Conv4FC3, Conv5FC3
from bids_app.models.resnet import ResNet3D
from bids_app.models.transfer import parameter_layers

SHAPES = {3: (1, 20, 23, 18), 2: (1, 23, 20)}
ODD_SHAPES = {3: [(1, 17, 19, 23), (1, 33, 18, 21)], 2: [(1, 17, 31), (2, 21, 20)]}
REALISTIC = (1, 169, 208, 179)
COARSE_INPUTS = {"conv4_fc3_2mm": (1, 85, 104, 90), "conv3_fc3_3mm": (1, 57, 70, 60)}  # 169x208x179 at 2 and 3 mm
N_OUTPUTS = {Task.CLASSIFICATION: 3, Task.REGRESSION: 1, Task.RECONSTRUCTION: 0}

CASES = [(info.name, dims, task) for info in list_architectures() for dims in info.dims for task in info.tasks]
PREDICTION_CASES = [(name, dims) for name, dims, task in CASES if task is Task.CLASSIFICATION]


def _build(name: str, task: Task, input_shape: tuple[int, ...], dropout: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, task=task, input_shape=input_shape, n_outputs=N_OUTPUTS[task], dropout=dropout)


def _expected_output_shape(task: Task, batch: torch.Tensor) -> tuple[int, ...]:
    if task is Task.RECONSTRUCTION:
        return tuple(batch.shape)
    return (batch.shape[0], N_OUTPUTS[task])


def _loss(task: Task, output: torch.Tensor, batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task is Task.CLASSIFICATION:
        return nn.functional.cross_entropy(output, target)
    if task is Task.REGRESSION:
        return nn.functional.mse_loss(output[:, 0], target.float())
    return nn.functional.mse_loss(output, batch)


# --- registry -------------------------------------------------------------------------------------------------


def test_registry_lists_required_architectures_sorted() -> None:
    names = [info.name for info in list_architectures()]
    assert names == sorted(names)
    assert {"conv4_fc3", "conv5_fc3", "resnet3d", "small_cnn", "conv_autoencoder"} <= set(names)
    infos = {info.name: info for info in list_architectures()}
    assert infos["resnet3d"].dims == (3,)
    assert infos["conv5_fc3"].dims == (2, 3)
    assert infos["conv_autoencoder"].tasks == (Task.RECONSTRUCTION,)
    assert Task.RECONSTRUCTION not in infos["conv5_fc3"].tasks
    # 5 ceil-mode halvings need 2 voxels at the 5th: 2**4 + 1.
    assert infos["conv5_fc3"].min_spatial_size == 17
    assert infos["conv4_fc3"].min_spatial_size == 9
    assert all(info.description for info in infos.values())


@pytest.mark.parametrize(("name", "dims", "task"), CASES)
def test_forward_shape_every_architecture_dims_task(name: str, dims: int, task: Task) -> None:
    model = _build(name, task, SHAPES[dims]).eval()
    batch = torch.randn(2, *SHAPES[dims])
    with torch.no_grad():
        output = model(batch)
    assert tuple(output.shape) == _expected_output_shape(task, batch)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize(("name", "dims", "task"), CASES)
def test_forward_at_minimum_size(name: str, dims: int, task: Task) -> None:
    info = {i.name: i for i in list_architectures()}[name]
    shape = (1, *[info.min_spatial_size] * dims)
    check_compatibility(name, task, ExtractionMode.SLICE if dims == 2 else ExtractionMode.PATCH, shape)
    model = _build(name, task, shape).eval()
    batch = torch.randn(2, *shape)
    with torch.no_grad():
        assert tuple(model(batch).shape) == _expected_output_shape(task, batch)


@pytest.mark.parametrize("name", ["conv_autoencoder", "small_autoencoder"])
@pytest.mark.parametrize("shape", [*ODD_SHAPES[3], *ODD_SHAPES[2]])
def test_autoencoder_output_has_input_shape_for_odd_sizes(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, Task.RECONSTRUCTION, shape).eval()
    batch = torch.randn(2, *shape)
    with torch.no_grad():
        assert model(batch).shape == batch.shape


@pytest.mark.parametrize("model_class", [Conv5FC3, Conv4FC3])
@pytest.mark.parametrize("shape", [SHAPES[3], *ODD_SHAPES[3], SHAPES[2], *ODD_SHAPES[2]])
def test_flattened_size_matches_forward(model_class: type[Conv5FC3], shape: tuple[int, ...]) -> None:
    model = model_class(shape, n_outputs=2).eval()
    with torch.no_grad():
        features = model.features(torch.zeros(1, *shape))
    assert tuple(features.shape[1:]) == model_class.feature_shape(shape)
    assert model_class.flattened_size(shape) == features[0].numel() == model.classifier.fc1.in_features


@pytest.mark.parametrize("shape", [SHAPES[3], *ODD_SHAPES[3]])
def test_feature_shape_of_resnet_and_encoder_matches_forward(shape: tuple[int, ...]) -> None:
    resnet = ResNet3D(shape, n_outputs=2).eval()
    autoencoder = ConvAutoencoder(shape).eval()
    with torch.no_grad():
        assert tuple(resnet.features(torch.zeros(1, *shape)).shape[1:]) == ResNet3D.feature_shape(shape)
        assert tuple(autoencoder.encoder(torch.zeros(1, *shape)).shape[1:]) == ConvAutoencoder.feature_shape(shape)


def test_realistic_shape_computation_without_forward() -> None:
    # ceil chains: 169→85→43→22→11→6, 208→104→52→26→13→7, 179→90→45→23→12→6
    assert Conv5FC3.feature_shape(REALISTIC) == (128, 6, 7, 6)
    assert Conv5FC3.flattened_size(REALISTIC) == 32256
    assert Conv4FC3.feature_shape(REALISTIC) == (64, 11, 13, 12)
    assert ResNet3D.feature_shape(REALISTIC) == (128, 6, 7, 6)
    assert Conv5FC3.feature_shape((1, 208, 179)) == (128, 7, 6)


def test_parameter_counts_are_sane_at_1mm() -> None:
    counts = {}
    for info in list_architectures():  # building is cheap (~0.1 s in all); only a forward pass would be slow
        if 3 in info.dims:  # the coarse-image entries at the grid they are made for (--image-voxel-size 2 or 3)
            shape = COARSE_INPUTS.get(info.name, REALISTIC)
            model = build_model(info.name, task=info.tasks[0], input_shape=shape, n_outputs=2)
            counts[info.name] = sum(p.numel() for p in model.parameters())
    assert all(0 < count < 10_000_000 for count in counts.values()), counts
    fc1_weights = 32256 * 256
    assert counts["conv5_fc3"] > fc1_weights  # the input-dependent fc1 is really sized from 169×208×179
    assert counts["small_cnn"] < 2_000


# --- check_compatibility / build_model errors -----------------------------------------------------------------


def test_unknown_architecture_suggests_close_name() -> None:
    with pytest.raises(ConfigError, match=r"Unknown architecture 'conv5fc3'\. Did you mean 'conv5_fc3'\?") as info:
        check_compatibility("conv5fc3", Task.CLASSIFICATION, ExtractionMode.IMAGE, SHAPES[3])
    available = "Available: conv3_fc3_3mm, conv4_fc3, conv4_fc3_2mm, conv5_fc3, conv_autoencoder, resnet3d"
    assert available in str(info.value)
    with pytest.raises(ConfigError, match=r"Unknown architecture 'zzz'\. Available:"):
        build_model("zzz", task=Task.CLASSIFICATION, input_shape=SHAPES[3], n_outputs=2)


def test_3d_architecture_on_slices_is_refused_with_2d_alternatives() -> None:
    with pytest.raises(ConfigError) as info:
        check_compatibility("resnet3d", Task.CLASSIFICATION, ExtractionMode.SLICE, SHAPES[2])
    message = str(info.value)
    assert "'resnet3d' takes 3D inputs but slice mode gives 2D inputs" in message
    assert "conv5_fc3" in message and "small_cnn" in message
    assert "conv_autoencoder" not in message  # not a classification model
    with pytest.raises(ConfigError, match="'resnet3d' takes 3D inputs"):
        build_model("resnet3d", task=Task.CLASSIFICATION, input_shape=SHAPES[2], n_outputs=2)


def test_mode_and_shape_dimensions_must_agree() -> None:
    with pytest.raises(ConfigError, match="has 2 spatial dimensions but image mode produces 3D samples"):
        check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.IMAGE, SHAPES[2])
    with pytest.raises(ConfigError, match="is not \\(C, H, W\\) or \\(C, D, H, W\\)"):
        check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.IMAGE, (1, 0, 40, 36))


def test_unsupported_task_names_architectures_for_it() -> None:
    with pytest.raises(ConfigError) as info:
        check_compatibility("conv5_fc3", Task.RECONSTRUCTION, ExtractionMode.IMAGE, SHAPES[3])
    assert "'conv5_fc3' does not support the reconstruction task" in str(info.value)
    assert "conv_autoencoder" in str(info.value)
    with pytest.raises(ConfigError, match="'conv_autoencoder' does not support the classification task"):
        build_model("conv_autoencoder", task=Task.CLASSIFICATION, input_shape=SHAPES[3], n_outputs=2)


def test_too_small_input_states_minimum_and_fitting_architectures() -> None:
    with pytest.raises(ConfigError) as info:
        check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.PATCH, (1, 16, 16, 16))
    message = str(info.value)
    assert "(16, 16, 16) is too small for architecture 'conv5_fc3'" in message
    assert "at least 17 voxels" in message
    assert "conv4_fc3" in message and "small_cnn" in message and "resnet3d" not in message
    check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.PATCH, (1, 17, 17, 17))
    with pytest.raises(ConfigError, match="at least 17 voxels"):
        build_model("conv_autoencoder", task=Task.RECONSTRUCTION, input_shape=(1, 40, 16), n_outputs=0)


def test_valid_combinations_pass() -> None:
    check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.IMAGE, REALISTIC)
    check_compatibility("conv4_fc3", Task.REGRESSION, ExtractionMode.PATCH, (1, 50, 50, 50))
    check_compatibility("conv5_fc3", Task.CLASSIFICATION, ExtractionMode.SLICE, (1, 208, 179))
    check_compatibility("resnet3d", Task.REGRESSION, ExtractionMode.ROI, (1, 30, 41, 25))
    check_compatibility("conv_autoencoder", Task.RECONSTRUCTION, ExtractionMode.IMAGE, REALISTIC)
    numpy_shape = tuple(np.int64(size) for size in SHAPES[3])  # as read from a tensor file's header
    check_compatibility("small_cnn", Task.CLASSIFICATION, ExtractionMode.IMAGE, numpy_shape)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=torch.Size(SHAPES[3]), n_outputs=2)
    assert tuple(model(torch.zeros(1, *SHAPES[3])).shape) == (1, 2)


def test_build_model_rejects_bad_dropout_and_outputs() -> None:
    with pytest.raises(ConfigError, match=r"Dropout is 1\.0"):
        build_model("conv5_fc3", task=Task.CLASSIFICATION, input_shape=SHAPES[3], n_outputs=2, dropout=1.0)
    with pytest.raises(ConfigError, match="n_outputs is 0 for regression"):
        build_model("conv5_fc3", task=Task.REGRESSION, input_shape=SHAPES[3], n_outputs=0)


# --- determinism, memory format, mixed precision --------------------------------------------------------------


@pytest.mark.parametrize(("name", "dims", "task"), CASES)
def test_same_seed_gives_identical_initial_weights(name: str, dims: int, task: Task) -> None:
    first = _build(name, task, SHAPES[dims], seed=3).state_dict()
    second = _build(name, task, SHAPES[dims], seed=3).state_dict()
    other = _build(name, task, SHAPES[dims], seed=4).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize(("name", "dims", "task"), CASES)
def test_channels_last_gives_the_same_output(name: str, dims: int, task: Task) -> None:
    memory_format = torch.channels_last_3d if dims == 3 else torch.channels_last
    model = _build(name, task, SHAPES[dims]).eval()
    batch = torch.randn(2, *SHAPES[dims])
    with torch.no_grad():
        reference = model(batch)
        model = model.to(memory_format=memory_format)
        output = model(batch.contiguous(memory_format=memory_format))
    assert output.shape == reference.shape
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)


# --- transfer learning ----------------------------------------------------------------------------------------


def test_transfer_encoder_into_conv5_fc3_features() -> None:
    autoencoder = _build("conv_autoencoder", Task.RECONSTRUCTION, SHAPES[3], seed=1)
    with torch.no_grad():  # make the source distinguishable from any fresh initialisation, buffers included
        for tensor in autoencoder.state_dict().values():
            tensor.add_(7)
    classifier = _build("conv5_fc3", Task.CLASSIFICATION, SHAPES[3], seed=2)
    head_before = {k: v.clone() for k, v in classifier.classifier.state_dict().items()}

    copied = transfer_weights(classifier, autoencoder.state_dict(), "conv_autoencoder")

    feature_keys = [f"features.{key}" for key in classifier.features.state_dict()]
    assert copied == feature_keys
    assert any(key.endswith("running_var") for key in copied)  # batch-norm statistics travel too
    source = autoencoder.encoder.state_dict()
    target = classifier.features.state_dict()
    assert all(torch.equal(source[key], target[key]) for key in source)
    head_after = classifier.classifier.state_dict()
    assert all(torch.equal(head_before[key], head_after[key]) for key in head_before)


def test_transfer_cnn_from_cnn_and_wrapped_state() -> None:
    source = _build("conv4_fc3", Task.CLASSIFICATION, SHAPES[3], seed=1)
    target = _build("conv5_fc3", Task.REGRESSION, SHAPES[3], seed=2)
    wrapped = {f"module.{key}": value for key, value in source.state_dict().items()}  # as saved by DataParallel
    copied = transfer_weights(target, wrapped, "conv4_fc3")
    assert {key.split(".")[1] for key in copied} == {"0", "1", "2", "3"}  # conv5 has one block more
    assert torch.equal(target.features[3].conv.weight, source.features[3].conv.weight)
    assert not any(key.startswith("classifier") for key in copied)


def test_transfer_small_models_and_2d() -> None:
    source = _build("small_autoencoder", Task.RECONSTRUCTION, SHAPES[2], seed=1)
    target = _build("small_cnn", Task.CLASSIFICATION, SHAPES[2], seed=2)
    assert len(transfer_weights(target, source.state_dict(), "small_autoencoder")) == len(target.features.state_dict())


def test_transfer_refuses_mismatched_or_unrelated_weights() -> None:
    conv5 = _build("conv5_fc3", Task.CLASSIFICATION, SHAPES[3])
    resnet = _build("resnet3d", Task.CLASSIFICATION, SHAPES[3])
    with pytest.raises(ConfigError, match="No convolutional weight of the 'resnet3d' source matches Conv5FC3"):
        transfer_weights(conv5, resnet.state_dict(), "resnet3d")
    autoencoder_2d = _build("conv_autoencoder", Task.RECONSTRUCTION, SHAPES[2])
    with pytest.raises(ConfigError, match=r"features\.0\.conv\.weight has shape \(8, 1, 3, 3\) in the source"):
        transfer_weights(conv5, autoencoder_2d.state_dict(), "conv_autoencoder")
    with pytest.raises(ConfigError, match=r"no 'encoder\.\*' entries, so they are not a 'conv_autoencoder' model"):
        transfer_weights(conv5, resnet.state_dict(), "conv_autoencoder")
    with pytest.raises(ConfigError, match="Did you mean 'conv_autoencoder'"):
        transfer_weights(conv5, resnet.state_dict(), "conv_autoencodr")


@pytest.mark.parametrize("n_unfrozen", [1, 3, 4, 13])
def test_freeze_all_but_last_leaves_exactly_n_trainable_layers(n_unfrozen: int) -> None:
    model = _build("conv5_fc3", Task.CLASSIFICATION, SHAPES[3], dropout=0.0)
    freeze_all_but_last(model, 13)  # conv5_fc3: 5 conv + 5 batch norm + 3 fc
    freeze_all_but_last(model, n_unfrozen)
    layers = parameter_layers(model)
    assert len(layers) == 13
    trainable = [layer for layer in layers if all(p.requires_grad for p in layer.parameters(recurse=False))]
    frozen = [layer for layer in layers if not any(p.requires_grad for p in layer.parameters(recurse=False))]
    assert len(trainable) == n_unfrozen and len(frozen) == 13 - n_unfrozen
    assert trainable == layers[13 - n_unfrozen :]
    if n_unfrozen == 3:
        assert trainable == [model.classifier.fc1, model.classifier.fc2, model.classifier.fc3]
    model(torch.randn(2, *SHAPES[3])).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_freeze_all_but_last_rejects_out_of_range() -> None:
    model = _build("conv5_fc3", Task.CLASSIFICATION, SHAPES[3])
    for bad in (0, 14):
        with pytest.raises(ConfigError, match=f"n_unfrozen_layers is {bad} but Conv5FC3 has 13 layers"):
            freeze_all_but_last(model, bad)


def test_grad_cam_layer_is_last_convolution() -> None:
    conv5 = _build("conv5_fc3", Task.CLASSIFICATION, SHAPES[3])
    assert grad_cam_layer(conv5) is conv5.features[4].conv
    resnet = _build("resnet3d", Task.CLASSIFICATION, SHAPES[3])
    assert grad_cam_layer(resnet) is resnet.features.layer4[1].conv2
    autoencoder = _build("conv_autoencoder", Task.RECONSTRUCTION, SHAPES[2])
    layer = grad_cam_layer(autoencoder)
    assert layer is autoencoder.encoder[4].conv and isinstance(layer, nn.Conv2d)


# --- training behaviour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dims", "task"), CASES)
def test_one_sgd_step_reduces_the_loss_and_reaches_every_parameter(name: str, dims: int, task: Task) -> None:
    model = _build(name, task, SHAPES[dims], dropout=0.0).train()
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(4, *SHAPES[dims], generator=generator)
    target = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = _loss(task, model(batch), batch, target)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    assert _loss(task, model(batch), batch, target).item() < loss.item()


def test_small_cnn_learns_a_toy_problem() -> None:
    """Class 1 images hold a bright cube at a random place; after 40 Adam steps the batch is separated."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 12, 12, 12, generator=generator) * 0.5
    labels = torch.arange(16) % 2
    for index in range(1, 16, 2):
        x, y, z = torch.randint(0, 8, (3,), generator=generator).tolist()
        images[index, 0, x : x + 4, y : y + 4, z : z + 4] += 1.0
    torch.manual_seed(0)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=(1, 12, 12, 12), n_outputs=2, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert losses[-1] < 0.3 * losses[0]
    assert accuracy == 1.0


# --- realistic size -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_realistic_1mm_forward() -> None:
    image = torch.rand(1, *REALISTIC)
    conv5 = _build("conv5_fc3", Task.CLASSIFICATION, REALISTIC).eval()
    autoencoder = _build("conv_autoencoder", Task.RECONSTRUCTION, REALISTIC).eval()
    with torch.no_grad():
        features = conv5.features(image)
        assert tuple(features.shape[1:]) == (128, 6, 7, 6)
        assert tuple(conv5.classifier(features).shape) == (1, 3)
        assert autoencoder(image).shape == image.shape
    assert math.prod(features.shape[1:]) == conv5.classifier.fc1.in_features
