"""Saliency methods on a batch, and part maps put back on the image grid: pure functions.

Every method maps a batch ``x`` of shape ``(N, C, *spatial)`` (2D slices or 3D volumes) and one target
output index per sample ``(N,)`` to one map per sample ``(N, *spatial)`` on the input grid (float32):

| method                 | map                                                                           |
|------------------------|-------------------------------------------------------------------------------|
| ``gradients``          | ``max_c |d y_t / d x_c|`` (Simonyan et al. 2014), >= 0                        |
| ``grad_cam``           | ``ReLU(sum_k w_k A_k)``, ``w_k`` = mean of ``d y_t / d A_k`` over *every*     |
|                        | spatial axis, upsampled to the input size (Selvaraju et al. 2017), >= 0       |
| ``integrated_gradients`` | ``sum_c (x - 0) * mean_s d y_t / d x (s / n_steps * x)`` with a zero      |
|                        | baseline and ``n_steps`` midpoint steps (Sundararajan et al. 2017), signed     |

A sample of several channels (``--channels T1w FLAIR``) gets one map, not one per channel: ``gradients`` keeps
the largest absolute gradient over the channels, ``integrated_gradients`` sums the channels' attributions (so
completeness still holds for the whole sample), and Grad-CAM's last convolution has already mixed them
(``SaliencyMethod.channel_combination``, recorded in each map's ``interpretation.json``).

``y_t`` is the raw output (logit) of the target class, not its softmax probability, so the maps do not vanish
for confident predictions. ClinicaDL's 3D Grad-CAM averaged the gradients over two of the three spatial axes,
giving each depth slice its own channel weights; here the weights are one scalar per channel and sample.

Models must be in eval mode (batch norm on running statistics, no dropout) so that each sample's output
depends on that sample only; the functions do not change the mode.

:func:`stitch_parts` turns the maps of one image's patches, slices or regions into one map of the whole
preprocessed image, the inverse of the cutters in ``bids_app.extraction`` (overlaps averaged).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional

from bids_app.config import ExtractionMode
from bids_app.errors import DataError

if TYPE_CHECKING:
    from torch import nn


class SaliencyMethod(enum.StrEnum):
    """Saliency methods by the name users type (``--interpret-methods``)."""

    GRADIENTS = "gradients"
    GRAD_CAM = "grad_cam"
    INTEGRATED_GRADIENTS = "integrated_gradients"

    @property
    def label(self) -> str:
        """The BIDS ``desc`` label of its maps: alphanumeric only (``grad_cam`` → ``gradcam``)."""
        return self.value.replace("_", "")

    @property
    def description(self) -> str:
        """One sentence for the maps' JSON."""
        return {
            SaliencyMethod.GRADIENTS: "absolute gradient of the target logit with respect to the input",
            SaliencyMethod.GRAD_CAM: "ReLU of the gradient-weighted sum of the last convolution's channels "
            "(weights averaged over every spatial axis), upsampled linearly to the input",
            SaliencyMethod.INTEGRATED_GRADIENTS: "integrated gradients of the target logit from a zero baseline",
        }[self]

    @property
    def channel_combination(self) -> str:
        """How the input channels of a sample make its one map (``ChannelCombination`` of the maps' JSON)."""
        return {
            SaliencyMethod.GRADIENTS: "maximum over the channels of the absolute gradient",
            SaliencyMethod.GRAD_CAM: "one map for every channel: the last convolution has already combined them",
            SaliencyMethod.INTEGRATED_GRADIENTS: "sum over the channels of the attributions",
        }[self]


def target_scores(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The output of each sample's target class: ``(N, K)`` logits and ``(N,)`` indices → ``(N,)``."""
    return outputs.gather(1, targets.to(outputs.device).long().view(-1, 1)).squeeze(1)


def vanilla_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``max_c |d y_t / d x_c|`` for each sample.

    Args:
        model: a classifier in eval mode, ``(N, C, *spatial) → (N, K)`` logits.
        x: inputs ``(N, C, *spatial)`` on the model's device.
        targets: class index to explain per sample, ``(N,)``.

    Returns:
        ``(N, *spatial)`` float32, non-negative.
    """
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(target_scores(model(inputs), targets).sum(), inputs)
    return gradient.abs().amax(dim=1).float()


def grad_cam_from_activations(
    activations: torch.Tensor, gradients: torch.Tensor, output_size: tuple[int, ...]
) -> torch.Tensor:
    """Grad-CAM from a layer's activations and the gradients of the target output with respect to them.

    Args:
        activations: ``A``, shape ``(N, K, *feature_spatial)`` (2 or 3 spatial axes).
        gradients: ``d y_t / d A``, same shape.
        output_size: the input's spatial shape to upsample to (linear interpolation, ``align_corners=False``).

    Returns:
        ``(N, *output_size)`` float32: ``ReLU(sum_k w_k A_k)`` with ``w_k`` the mean of ``d y_t / d A_k`` over
        all spatial axes of the layer, upsampled.
    """
    if activations.shape != gradients.shape or activations.ndim not in (4, 5):
        raise ValueError(
            f"activations {tuple(activations.shape)} and gradients {tuple(gradients.shape)} must share a "
            "(N, K, *spatial) shape with 2 or 3 spatial axes"
        )
    spatial_axes = tuple(range(2, activations.ndim))
    weights = gradients.float().mean(dim=spatial_axes, keepdim=True)  # (N, K, 1, 1[, 1])
    cam = functional.relu((weights * activations.float()).sum(dim=1, keepdim=True))
    mode = "bilinear" if activations.ndim == 4 else "trilinear"
    return functional.interpolate(cam, size=tuple(output_size), mode=mode, align_corners=False)[:, 0]


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of ``layer``'s output (``models.grad_cam_layer(model)``: the last convolution).

    Args:
        model: a classifier in eval mode.
        layer: a module of ``model`` whose output is ``(N, K, *feature_spatial)``.
        x: inputs ``(N, C, *spatial)`` on the model's device.
        targets: class index to explain per sample, ``(N,)``.

    Returns:
        ``(N, *spatial)`` float32, non-negative (see :func:`grad_cam_from_activations`).
    """
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            scores = target_scores(model(x.detach()), targets)
            if len(captured) != 1:
                raise RuntimeError(f"Grad-CAM layer {layer} ran {len(captured)} times in one forward pass, not once")
            (gradients,) = torch.autograd.grad(scores.sum(), captured[0])
    finally:
        handle.remove()
    return grad_cam_from_activations(captured[0].detach(), gradients, tuple(x.shape[2:]))


def integrated_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Integrated gradients from a zero baseline, summed over channels.

    The path integral is the midpoint Riemann sum over ``n_steps`` points ``(s + 0.5) / n_steps * x``; the
    attributions of one sample sum to about ``y_t(x) - y_t(0)`` (completeness), more closely as
    ``n_steps`` grows.

    Args:
        model: a classifier in eval mode.
        x: inputs ``(N, C, *spatial)`` on the model's device.
        targets: class index to explain per sample, ``(N,)``.
        n_steps: points on the path from the baseline to ``x`` (one forward and backward pass each).

    Returns:
        ``(N, *spatial)`` float32 signed attributions.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    x = x.detach()
    total = torch.zeros_like(x, dtype=torch.float32)
    for step in range(n_steps):
        point = (x * ((step + 0.5) / n_steps)).requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(target_scores(model(point), targets).sum(), point)
        total += gradient.float()
    return (x.float() * total / n_steps).sum(dim=1)


SaliencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def saliency_function(method: SaliencyMethod, model: nn.Module, *, n_steps: int) -> SaliencyFn:
    """``(x, targets) → (N, *spatial)`` maps of ``method`` for ``model`` (Grad-CAM on its last convolution)."""
    if method is SaliencyMethod.GRADIENTS:
        return lambda x, targets: vanilla_gradients(model, x, targets)
    if method is SaliencyMethod.GRAD_CAM:
        from bids_app.models import grad_cam_layer

        layer = grad_cam_layer(model)
        return lambda x, targets: grad_cam(model, layer, x, targets)
    return lambda x, targets: integrated_gradients(model, x, targets, n_steps)


# -- part maps back onto the image grid -------------------------------------------------------------


def _mean_where_covered(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def stitch_parts(
    part_maps: np.ndarray,
    mode: ExtractionMode,
    parameters: Mapping[str, Any],
    volume_shape: tuple[int, int, int],
    roi_masks: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Put the maps of one image's parts back on the image grid.

    Args:
        part_maps: ``(n_parts, *part_spatial)`` maps in tensor order: ``(1, D, H, W)`` image,
            ``(n, P, P, P)`` patches, ``(n, A, B)`` slices, ``(n, d, h, w)`` regions.
        mode: the extraction mode of the tensor.
        parameters: the tensor sidecar's ``ModeParameters`` (``PatchSize``/``Stride``; ``SliceAxis``/
            ``DiscardedSlices``; ``RoiCrop``).
        volume_shape: the preprocessed image's ``(D, H, W)``.
        roi_masks: roi mode only: the ``(D, H, W)`` bool masks aligned to the image, in ``RoiNames`` order.

    Returns:
        ``(D, H, W)`` float32: overlapping parts averaged; voxels no part covers (patch borders, discarded
        slices, outside every region's mask) are 0.

    Raises:
        DataError: the parts do not fit the parameters and the volume (a tensor cut from another image).
    """
    maps = np.asarray(part_maps, dtype=np.float32)
    shape = tuple(int(v) for v in volume_shape)
    fix = "The tensor does not match its Source image; re-run the participant level for this image."
    if mode is ExtractionMode.IMAGE:
        if maps.shape != (1, *shape):
            raise DataError(f"Image map of shape {maps.shape[1:]} does not fit the image grid {shape}. {fix}")
        return maps[0].copy()
    total = np.zeros(shape, dtype=np.float32)
    count = np.zeros(shape, dtype=np.float32)
    if mode is ExtractionMode.PATCH:
        from bids_app.extraction.patch import patch_origins

        size = int(parameters["PatchSize"])
        origins = patch_origins(shape, size, int(parameters["Stride"]))
        if maps.shape != (len(origins), size, size, size):
            raise DataError(f"{maps.shape[0]} patch maps of shape {maps.shape[1:]} do not fit {len(origins)} "
                            f"patches of size {size} on the grid {shape}. {fix}")  # fmt: skip
        for origin, part in zip(origins, maps, strict=True):
            box = tuple(slice(int(o), int(o) + size) for o in origin)
            total[box] += part
            count[box] += 1
        return _mean_where_covered(total, count)
    if mode is ExtractionMode.SLICE:
        axis, discarded = int(parameters["SliceAxis"]), int(parameters["DiscardedSlices"])
        plane = tuple(s for a, s in enumerate(shape) if a != axis)
        if maps.shape != (shape[axis] - 2 * discarded, *plane):
            raise DataError(f"{maps.shape[0]} slice maps of shape {maps.shape[1:]} do not fit axis {axis} of the "
                            f"grid {shape} with {discarded} discarded slices at each end. {fix}")  # fmt: skip
        np.moveaxis(total, axis, 0)[discarded : shape[axis] - discarded] = maps
        return total
    masks = [np.asarray(m, dtype=bool) for m in roi_masks]
    if len(masks) != maps.shape[0] or any(m.shape != shape for m in masks):
        raise DataError(f"{maps.shape[0]} region maps but {len(masks)} masks on the grid {shape}. {fix}")
    if parameters.get("RoiCrop", True):
        from bids_app.extraction.roi import roi_boxes

        boxes = roi_boxes(masks)
    else:
        boxes = [(slice(None), slice(None), slice(None))] * len(masks)
    for part, mask, box in zip(maps, masks, boxes, strict=True):
        if part.shape != total[box].shape:
            raise DataError(f"Region map of shape {part.shape} does not fit its box {total[box].shape}. {fix}")
        inside = mask[box]
        total[box] += np.where(inside, part, 0)
        count[box] += inside
    return _mean_where_covered(total, count)
