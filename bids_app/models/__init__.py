"""Model architectures by name: the registry, compatibility checks, construction and transfer learning.

Registry keys are what users type (``--architecture conv5_fc3``). Group-level training calls
``check_compatibility`` before any work, then ``build_model``; ``transfer_weights`` and ``freeze_all_but_last``
implement transfer learning; ``grad_cam_layer`` names the layer saliency maps hook into.

Input conventions: ``input_shape = (C, *spatial)`` for one sample, e.g. ``(1, 169, 208, 179)`` for an image,
``(1, 50, 50, 50)`` for a patch, ``(1, 208, 179)`` for a sagittal slice; batches are ``(N, *input_shape)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from bids_app.config import ExtractionMode, Task
from bids_app.errors import ConfigError
from bids_app.models.autoencoder import ConvAutoencoder, SmallAutoencoder
from bids_app.models.cnn import Conv3FC3Image3mm, Conv4FC3, Conv4FC3Image2mm, Conv5FC3, ConvNet, SmallCNN
from bids_app.models.resnet import ResNet3D
from bids_app.models.transfer import copy_conv_weights, freeze_all_but_last, grad_cam_layer

__all__ = [
    "ArchitectureInfo",
    "build_model",
    "check_architecture",
    "check_compatibility",
    "freeze_all_but_last",
    "grad_cam_layer",
    "list_architectures",
    "transfer_weights",
]

logger = logging.getLogger(__name__)

MODE_DIMS = {
    ExtractionMode.IMAGE: 3,
    ExtractionMode.PATCH: 3,
    ExtractionMode.ROI: 3,
    ExtractionMode.SLICE: 2,
}


@dataclasses.dataclass(frozen=True)
class ArchitectureInfo:
    """What ``--architecture <name>`` accepts.

    Attributes:
        name: registry key, e.g. ``"conv5_fc3"``.
        dims: supported spatial dimensions, ``(2, 3)`` or ``(3,)``.
        tasks: supported tasks.
        description: one line for listings.
        min_spatial_size: smallest usable length of every spatial axis, in voxels.
    """

    name: str
    dims: tuple[int, ...]
    tasks: tuple[Task, ...]
    description: str
    min_spatial_size: int


@dataclasses.dataclass(frozen=True)
class _Entry:
    info: ArchitectureInfo
    model_class: type[ConvNet]


_PREDICTION = (Task.CLASSIFICATION, Task.REGRESSION)


def _entry(
    name: str, model_class: type[ConvNet], dims: tuple[int, ...], tasks: tuple[Task, ...], description: str
) -> _Entry:
    info = ArchitectureInfo(name, dims, tasks, description, model_class.min_spatial_size())
    return _Entry(info, model_class)


_REGISTRY: dict[str, _Entry] = {
    entry.info.name: entry
    for entry in (
        _entry("conv4_fc3", Conv4FC3, (2, 3), _PREDICTION, "4 conv blocks (8-64 channels), 3 fc layers; patches"),
        _entry("conv5_fc3", Conv5FC3, (2, 3), _PREDICTION, "5 conv blocks (8-128 channels), 3 fc layers; images"),
        _entry(
            "conv4_fc3_2mm",
            Conv4FC3Image2mm,
            (3,),
            _PREDICTION,
            "4 conv blocks (16-128 channels), 3 fc layers; whole images at 2 mm (--image-voxel-size 2)",
        ),
        _entry(
            "conv3_fc3_3mm",
            Conv3FC3Image3mm,
            (3,),
            _PREDICTION,
            "3 conv blocks (16-64 channels), 3 fc layers; whole images at 3 mm (--image-voxel-size 3)",
        ),
        _entry("resnet3d", ResNet3D, (3,), _PREDICTION, "ResNet-18-style 3D network (16-128 channels), any input size"),
        _entry("small_cnn", SmallCNN, (2, 3), _PREDICTION, "tiny 2-block CNN for tests and demos"),
        _entry(
            "conv_autoencoder",
            ConvAutoencoder,
            (2, 3),
            (Task.RECONSTRUCTION,),
            "autoencoder whose encoder is conv5_fc3's conv part (pretraining for transfer learning)",
        ),
        _entry(
            "small_autoencoder",
            SmallAutoencoder,
            (2, 3),
            (Task.RECONSTRUCTION,),
            "tiny autoencoder whose encoder is small_cnn's conv part, for tests and demos",
        ),
    )
}


def list_architectures() -> list[ArchitectureInfo]:
    """Every registered architecture, sorted by name."""
    return [_REGISTRY[name].info for name in sorted(_REGISTRY)]


def _lookup(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"Unknown architecture '{name}'.{hint} Available: {', '.join(sorted(_REGISTRY))}.")


def _names(predicate: Callable[[ArchitectureInfo], bool]) -> str:
    """Comma-separated names of the architectures satisfying ``predicate`` (``none`` when empty)."""
    names = [info.name for info in list_architectures() if predicate(info)]
    return ", ".join(names) if names else "none"


def _check_task(info: ArchitectureInfo, task: Task) -> None:
    if task not in info.tasks:
        supported = ", ".join(t.value for t in info.tasks)
        raise ConfigError(
            f"Architecture '{info.name}' does not support the {task.value} task (it supports: {supported}). "
            f"Choose an architecture for {task.value}: {_names(lambda i: task in i.tasks)}."
        )


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as plain ints (numpy and torch sizes accepted), checked to be ``(C, *spatial)``."""
    shape = tuple(input_shape)
    valid = all(isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0 for size in shape)
    if len(shape) not in (3, 4) or not valid:
        raise ConfigError(
            f"Input shape {shape} is not (C, H, W) or (C, D, H, W) with positive sizes. "
            "Check the extracted tensors' shape."
        )
    return tuple(int(size) for size in shape)


def _check_dims(info: ArchitectureInfo, task: Task, spatial: tuple[int, ...], source: str) -> None:
    n_dims = len(spatial)
    if n_dims not in info.dims:
        takes = " or ".join(f"{d}D" for d in info.dims)
        alternatives = _names(lambda i: n_dims in i.dims and task in i.tasks)
        raise ConfigError(
            f"Architecture '{info.name}' takes {takes} inputs but {source} gives {n_dims}D inputs. "
            f"Choose a {n_dims}D architecture for {task.value} ({alternatives}) or another extraction mode."
        )


def _check_size(info: ArchitectureInfo, task: Task, spatial: tuple[int, ...]) -> None:
    needed = info.min_spatial_size
    if min(spatial) < needed:
        smallest = min(spatial)
        alternatives = _names(lambda i: len(spatial) in i.dims and task in i.tasks and i.min_spatial_size <= smallest)
        raise ConfigError(
            f"Input spatial shape {spatial} is too small for architecture '{info.name}': its downsamplings need "
            f"at least {needed} voxels along every axis. Use larger inputs (e.g. a larger patch_size) or an "
            f"architecture that fits {smallest} voxels: {alternatives}."
        )


def check_architecture(name: str, task: Task, mode: ExtractionMode) -> None:
    """What can be checked before any tensor is read: the name, the task, and 2D/3D against the mode.

    Raises:
        ConfigError: unknown name (with a did-you-mean), unsupported task, or a 2D/3D mismatch with the mode.
    """
    info = _lookup(name).info
    _check_task(info, task)
    _check_dims(info, task, (1,) * MODE_DIMS[mode], f"{mode.value} mode")


def check_compatibility(name: str, task: Task, mode: ExtractionMode, input_shape: tuple[int, ...]) -> None:
    """Raise ConfigError unless ``name`` can be trained for ``task`` on ``mode`` inputs of shape ``input_shape``.

    Args:
        name: registry key.
        task: the training task.
        mode: extraction mode of the tensors (slice → 2D; image, patch, roi → 3D).
        input_shape: one sample, ``(C, *spatial)``.

    Raises:
        ConfigError: unknown name (with a did-you-mean), unsupported task, 2D/3D mismatch between the mode, the
            shape and the architecture, or an input smaller than the architecture's minimum.
    """
    info = _lookup(name).info
    _check_task(info, task)
    shape = _sample_shape(input_shape)
    spatial = shape[1:]
    mode_dims = MODE_DIMS[mode]
    if len(spatial) != mode_dims:
        raise ConfigError(
            f"Input shape {shape} has {len(spatial)} spatial dimensions but {mode.value} mode "
            f"produces {mode_dims}D samples. Check that the tensors were extracted in {mode.value} mode."
        )
    _check_dims(info, task, spatial, f"{mode.value} mode")
    _check_size(info, task, spatial)


def build_model(
    name: str, *, task: Task, input_shape: tuple[int, ...], n_outputs: int, dropout: float = 0.5
) -> nn.Module:
    """Build architecture ``name`` for samples of shape ``input_shape``, initialised from torch's global RNG.

    Args:
        name: registry key.
        task: classification and regression models map ``(N, *input_shape)`` to ``(N, n_outputs)``;
            reconstruction models map it to the same shape.
        input_shape: one sample, ``(C, *spatial)``, e.g. ``(1, 169, 208, 179)`` or ``(1, 208, 179)``.
        n_outputs: number of classes (classification), of targets (regression, usually 1); ignored for
            reconstruction.
        dropout: dropout probability before the first fully connected layer, in ``[0, 1)``.

    Raises:
        ConfigError: the same checks as ``check_compatibility`` (without the mode), or invalid
            ``n_outputs``/``dropout``.
    """
    entry = _lookup(name)
    _check_task(entry.info, task)
    shape = _sample_shape(input_shape)
    spatial = shape[1:]
    _check_dims(entry.info, task, spatial, f"input shape {shape}")
    _check_size(entry.info, task, spatial)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"Dropout is {dropout}; use a probability in [0, 1).")
    model: nn.Module
    if task is Task.RECONSTRUCTION:
        model = entry.model_class(shape)
    else:
        if n_outputs < 1:
            raise ConfigError(f"n_outputs is {n_outputs} for {task.value}; a model needs at least one output.")
        model = entry.model_class(shape, n_outputs, dropout)
    n_parameters = sum(p.numel() for p in model.parameters())
    logger.info("Built %s for %s inputs %s: %d parameters", name, task.value, shape, n_parameters)
    return model


def transfer_weights(target: nn.Module, source_state: Mapping[str, torch.Tensor], source_arch: str) -> list[str]:
    """Copy the convolutional weights of a ``source_arch`` state dict into ``target``'s convolutional part.

    A classifier or regressor takes ``features`` from one of the same family (``conv5_fc3`` from ``conv5_fc3``
    or ``conv4_fc3``'s first blocks) or ``encoder`` from an autoencoder (``conv5_fc3`` from
    ``conv_autoencoder``, ``small_cnn`` from ``small_autoencoder``). Heads are never copied.

    Returns:
        The target state-dict keys copied (parameters and batch-norm buffers).

    Raises:
        ConfigError: unknown ``source_arch``, or no / mismatched convolutional weights.
    """
    model_class = _lookup(source_arch).model_class
    return copy_conv_weights(target, source_state, model_class.CONV_PART, source_arch)
