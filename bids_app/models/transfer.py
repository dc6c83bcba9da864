"""Reusing a model's parts: copying convolutional weights, freezing layers, and the layer Grad-CAM watches.

The convolutional part of a registered model is its ``features`` (classifiers, regressors) or ``encoder``
(autoencoders) attribute; models of the same family name their layers identically inside it, so
``encoder.3.conv.weight`` of an autoencoder is ``features.3.conv.weight`` of ``conv5_fc3``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from bids_app.errors import ConfigError

logger = logging.getLogger(__name__)

CONV_PARTS = ("features", "encoder")
# Prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile around a saved model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def conv_part_name(model: nn.Module) -> str:
    """``"features"`` or ``"encoder"``: the attribute holding ``model``'s convolutional part."""
    for name in CONV_PARTS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise TypeError(f"{type(model).__name__} has neither a 'features' nor an 'encoder' module")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def copy_conv_weights(
    target: nn.Module, source_state: Mapping[str, torch.Tensor], source_part: str, source_arch: str
) -> list[str]:
    """Copy the convolutional part of ``source_state`` into ``target``'s, in place.

    Args:
        target: the model to initialise (its head is left untouched).
        source_state: a state dict of a registered model (wrapper prefixes ``module.``/``_orig_mod.`` are ignored).
        source_part: ``"features"`` or ``"encoder"``, the source architecture's convolutional part.
        source_arch: the source's registry name, for messages.

    Returns:
        The target state-dict keys copied (parameters and batch-norm buffers), in target order.

    Raises:
        ConfigError: no key matches, or a matching key has another shape (different widths or 2D vs 3D).
    """
    target_part = conv_part_name(target)
    source_prefix = f"{source_part}."
    renamed = {
        f"{target_part}.{key[len(source_prefix) :]}": value
        for key, value in ((_strip_wrappers(k), v) for k, v in source_state.items())
        if key.startswith(source_prefix)
    }
    if not renamed:
        raise ConfigError(
            f"The source weights have no '{source_prefix}*' entries, so they are not a '{source_arch}' model. "
            "Check the source architecture given for transfer learning."
        )
    target_state = target.state_dict()
    copied = [key for key in target_state if key in renamed]
    mismatched = [key for key in copied if renamed[key].shape != target_state[key].shape]
    if mismatched:
        key = mismatched[0]
        raise ConfigError(
            f"Cannot transfer weights from '{source_arch}' into {type(target).__name__}: {key} has shape "
            f"{tuple(renamed[key].shape)} in the source but {tuple(target_state[key].shape)} in the target "
            f"({len(mismatched)} mismatched tensor(s)). Transfer needs the same convolutional structure and "
            "dimension, e.g. conv5_fc3 from conv_autoencoder or from another conv5_fc3."
        )
    if not copied:
        raise ConfigError(
            f"No convolutional weight of the '{source_arch}' source matches {type(target).__name__} "
            f"(source keys like {next(iter(renamed))!r}, target keys like {next(iter(target_state))!r}). "
            "Transfer needs the same convolutional structure, e.g. conv5_fc3 from conv_autoencoder."
        )
    target.load_state_dict({key: renamed[key] for key in copied}, strict=False)
    logger.info("Transferred %d tensors from the %s '%s' into %s", len(copied), source_part, source_arch, target_part)
    return copied


def parameter_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that own parameters directly (conv, batch norm, linear...), in registration (forward) order."""
    return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]


def freeze_all_but_last(model: nn.Module, n_unfrozen_layers: int) -> None:
    """Let only the last ``n_unfrozen_layers`` layers with parameters train; freeze every other parameter.

    Layers are counted from the end of ``parameter_layers(model)``: a batch norm counts as a layer, so the head
    of ``conv5_fc3`` is its last 3 layers. Frozen batch norms still update their running statistics in train
    mode; put them in eval mode to freeze those too.

    Raises:
        ConfigError: ``n_unfrozen_layers`` is below 1 or above the model's number of layers.
    """
    layers = parameter_layers(model)
    if not 1 <= n_unfrozen_layers <= len(layers):
        raise ConfigError(
            f"n_unfrozen_layers is {n_unfrozen_layers} but {type(model).__name__} has {len(layers)} layers with "
            f"parameters. Use a value from 1 to {len(layers)}, or leave it unset to fine-tune everything."
        )
    for index, layer in enumerate(layers):
        trainable = index >= len(layers) - n_unfrozen_layers
        for parameter in layer.parameters(recurse=False):
            parameter.requires_grad_(trainable)
    logger.info("Froze %d of %d layers", len(layers) - n_unfrozen_layers, len(layers))


def grad_cam_layer(model: nn.Module) -> nn.Module:
    """The last convolution (not transposed) of ``model``'s convolutional part: where Grad-CAM hooks in."""
    convolutions = [
        module
        for module in getattr(model, conv_part_name(model)).modules()
        if isinstance(module, nn.Conv2d | nn.Conv3d)
    ]
    if not convolutions:
        raise TypeError(f"{type(model).__name__} has no convolution in its {conv_part_name(model)}")
    return convolutions[-1]
