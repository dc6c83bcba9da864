"""On-the-fly data augmentation of training samples: MRI-specific transforms from TorchIO, seeded per sample.

The data loader's sampler hands every sample its own seed (drawn from the run's seed and the epoch). TorchIO
draws its random numbers from torch's global generator, so each sample is augmented inside
``torch.random.fork_rng`` after ``torch.manual_seed(sample seed)``: the augmentation of a sample follows from its
seed alone, whatever the number of loader workers and whether or not the run was resumed, and the caller's
generator (the one that draws dropout masks and initial weights) is left exactly as it was.

Samples are ``(C, X, Y, Z)`` (image, patch, region) or ``(C, H, W)`` (a slice, given to TorchIO as
``(C, H, W, 1)``). Amounts are in voxels of the stored tensor (TorchIO's millimetres on a unit grid: 1 mm on the
default template grid, larger in mm on a coarser grid). Every channel of a multi-channel sample gets the same
geometry (the channels are co-registered). The transforms, applied in this fixed order whatever order the names
are given in, each with its own probability:

========================  ====  ================================================================================
name                      p     what (TorchIO class and parameters)
========================  ====  ================================================================================
``affine``                1     ``RandomAffine``: rotation uniform in ±``AFFINE_DEGREES`` about each axis and
                                shift in ±``AFFINE_SHIFT`` voxels along each, no scaling, linear interpolation,
                                the sample's minimum outside the field of view (2D: in-plane only)
``elastic``               0.5   ``RandomElasticDeformation``: ``ELASTIC_CONTROL_POINTS`` B-spline control points
                                per axis, displacement at most ``ELASTIC_MAX_DISPLACEMENT`` voxels (less on small
                                samples, so that the deformation cannot fold; 2D: in-plane only)
``flip``                  0.5   ``RandomFlip`` along the left-right axis only (axis 0 of an image, patch or
                                region and of coronal or axial slices; refused for sagittal slices)
``motion``                0.5   ``RandomMotion``: ``MOTION_N_MOVEMENTS`` movements during the acquisition, each
                                rotating by up to ``MOTION_DEGREES`` and shifting by up to ``MOTION_SHIFT``
                                voxels, mixed in k-space (2D: in-plane)
``ghosting``              0.5   ``RandomGhosting``: ``GHOSTING_N_GHOSTS`` ghosts along one random axis, k-space
                                planes attenuated by ``GHOSTING_INTENSITY`` (2D: in-plane axes)
``spike``                 0.5   ``RandomSpike``: one k-space spike (herringbone stripes) of ``SPIKE_INTENSITY``
                                times the spectrum's maximum
``bias_field``            0.5   ``RandomBiasField``: a smooth multiplicative field, exp of a polynomial of order
                                ``BIAS_FIELD_ORDER`` with coefficients in ±``BIAS_FIELD_COEFFICIENT`` (TorchIO's
                                draws and field, evaluated axis by axis: ``_BiasField``)
``blur``                  1     ``RandomBlur``: Gaussian with standard deviation uniform in
                                ``[0, MAX_BLUR_SD]`` voxels along each axis (2D: in-plane)
``gamma``                 1     ``RandomGamma``: ``sign(x) |x| ** gamma`` per channel, ``log(gamma)`` uniform in
                                ±``GAMMA_LOG``
``intensity_scaling``     1     multiply by a factor uniform in ``[1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE]``
                                (hand-written: TorchIO has no random global gain; ``RescaleIntensity`` maps to a
                                fixed range and ``RandomGamma`` changes the contrast, not the gain)
``gaussian_noise``        1     ``RandomNoise``: zero-mean Gaussian noise whose standard deviation is uniform in
                                ``[0, MAX_NOISE_SD]`` times the sample's intensity range
========================  ====  ================================================================================

Probabilities below 1 leave part of the samples free of that artefact, so that the network also sees images
like those it will be asked to predict. Every amount is conservative for brain MRI on purpose (the defaults of
TorchIO are for heavier augmentation). Speed per sample is in docs/performance.md: on a 1 mm whole image
``elastic`` and ``motion`` cost seconds each (more than a CPU training step), the others well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from bids_app.config import ExtractionMode, SliceDirection
from bids_app.errors import ConfigError

if TYPE_CHECKING:
    import torch
    import torchio as tio

AUGMENTATIONS = (
    "affine",
    "elastic",
    "flip",
    "motion",
    "ghosting",
    "spike",
    "bias_field",
    "blur",
    "gamma",
    "intensity_scaling",
    "gaussian_noise",
)
PROBABILITY = {"elastic": 0.5, "flip": 0.5, "motion": 0.5, "ghosting": 0.5, "spike": 0.5, "bias_field": 0.5}
AFFINE_DEGREES = 5.0
AFFINE_SHIFT = 3.0  # voxels
ELASTIC_CONTROL_POINTS = 7
ELASTIC_MAX_DISPLACEMENT = 3.0  # voxels
MOTION_N_MOVEMENTS = 2
MOTION_DEGREES = 3.0
MOTION_SHIFT = 3.0  # voxels
GHOSTING_N_GHOSTS = (2, 5)
GHOSTING_INTENSITY = (0.1, 0.4)
SPIKE_INTENSITY = (0.1, 0.3)
BIAS_FIELD_ORDER = 3
BIAS_FIELD_COEFFICIENT = 0.3
MAX_BLUR_SD = 1.0  # voxels
GAMMA_LOG = 0.2
MAX_SCALE_CHANGE = 0.1
MAX_NOISE_SD = 0.05  # fraction of the sample's intensity range

Sextet = tuple[float, float, float, float, float, float]
Step = Callable[["torch.Tensor"], "torch.Tensor"]  # one transform of a (C, X, Y, Z) float32 tensor


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """A seeded composition of transforms for samples ``(C, X, Y, Z)`` or ``(C, H, W)``.

    Holds only names, so it pickles small into loader workers and is checked without importing TorchIO; the
    TorchIO transforms are built on first use, once per process and sample shape.

    Attributes:
        names: the enabled transforms, in the order of ``AUGMENTATIONS``.
        lr_axis: index in the spatial axes of the left-right axis; None when the samples have none.
    """

    names: tuple[str, ...]
    lr_axis: int | None

    def __call__(self, x: np.ndarray, seed: int) -> np.ndarray:
        """Augment one float32 sample ``(C, *spatial)`` with the random numbers that ``seed`` gives.

        Torch's global generator is seeded with ``seed`` inside ``torch.random.fork_rng``, so it is the same
        after the call as before. ``x`` is not modified.

        Returns:
            A new C-contiguous float32 array of the shape of ``x``.
        """
        import torch

        tensor = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        flat = tensor.ndim == 3  # a slice: TorchIO wants a depth axis
        if flat:
            tensor = tensor.unsqueeze(-1)
        steps = _steps(self.names, self.lr_axis, tuple(tensor.shape[1:]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in steps:
                tensor = step(tensor)
        if flat:
            tensor = tensor.squeeze(-1)
        return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _steps(names: tuple[str, ...], lr_axis: int | None, shape: tuple[int, int, int]) -> tuple[Step, ...]:
    """The transforms for samples of spatial ``shape`` (a depth of 1 marks a 2D slice), in application order."""
    return tuple(_build_step(name, lr_axis, shape) for name in names)


def _build_step(name: str, lr_axis: int | None, shape: tuple[int, int, int]) -> Step:
    """One transform of ``AUGMENTATIONS`` for samples of spatial ``shape``, with the module's parameters."""
    import torchio as tio

    flat = shape[2] == 1
    moving = (1.0, 1.0, 0.0) if flat else (1.0, 1.0, 1.0)  # nothing moves across a single slice

    def ranges(low: float, high: float, axes: tuple[float, float, float] = moving) -> Sextet:
        """TorchIO's (low, high) per axis: the range along the axes that move, (0, 0) along the others."""
        x, y, z = axes
        return (low * x, high * x, low * y, high * y, low * z, high * z)

    p = PROBABILITY.get(name, 1.0)
    match name:
        case "affine":
            return tio.RandomAffine(
                scales=0,
                degrees=ranges(-AFFINE_DEGREES, AFFINE_DEGREES, (0.0, 0.0, 1.0) if flat else moving),
                translation=ranges(-AFFINE_SHIFT, AFFINE_SHIFT),
                default_pad_value="minimum",
                image_interpolation="linear",
                p=p,
            )
        case "elastic":
            return tio.RandomElasticDeformation(
                num_control_points=ELASTIC_CONTROL_POINTS,
                max_displacement=_elastic_displacement(shape),
                locked_borders=2,
                image_interpolation="linear",
                p=p,
            )
        case "flip":
            assert lr_axis is not None  # build_augmentation refuses flip without a left-right axis
            return tio.RandomFlip(axes=(lr_axis,), flip_probability=p)
        case "motion":
            return tio.RandomMotion(
                degrees=MOTION_DEGREES,
                translation=MOTION_SHIFT,
                num_transforms=MOTION_N_MOVEMENTS,
                image_interpolation="linear",
                p=p,
            )
        case "ghosting":
            axes = (0, 1) if flat else (0, 1, 2)
            return tio.RandomGhosting(num_ghosts=GHOSTING_N_GHOSTS, axes=axes, intensity=GHOSTING_INTENSITY, p=p)
        case "spike":
            return tio.RandomSpike(num_spikes=(1, 1), intensity=SPIKE_INTENSITY, p=p)  # a bare 1 means 0 or 1
        case "bias_field":
            return _BiasField(tio.RandomBiasField(coefficients=BIAS_FIELD_COEFFICIENT, order=BIAS_FIELD_ORDER, p=p))
        case "blur":
            return tio.RandomBlur(std=ranges(0.0, MAX_BLUR_SD), p=p)  # type: ignore[arg-type]  # a sextet is valid
        case "gamma":
            return tio.RandomGamma(log_gamma=GAMMA_LOG, p=p)
        case "intensity_scaling":
            return _scale_intensity
        case "gaussian_noise":
            return _add_noise
    raise ValueError(f"no transform named {name!r}")  # build_augmentation checked the names


def _elastic_displacement(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """Largest displacement per axis, in voxels: ``ELASTIC_MAX_DISPLACEMENT``, capped below half the spacing of
    the control points (TorchIO's bound beyond which the deformation can fold); 0 across a single slice."""
    n_intervals = ELASTIC_CONTROL_POINTS - 3  # cubic B-spline: the mesh has n - 3 intervals
    return tuple(  # type: ignore[return-value]
        0.0 if size == 1 else min(ELASTIC_MAX_DISPLACEMENT, 0.45 * (size - 1) / n_intervals) for size in shape
    )


class _BiasField:
    """TorchIO's ``RandomBiasField``, its polynomial evaluated axis by axis.

    The same random draws in the same order (TorchIO's probability test, then its ``get_params``) and the same
    field up to float rounding, about 100 times faster on a 1 mm image: TorchIO builds each of the 20 terms of an
    order-3 polynomial over the whole volume in float64 (seconds per image), while the polynomial is a sum of
    products of one-axis powers, contracted here one axis at a time.
    """

    def __init__(self, random: tio.RandomBiasField) -> None:
        self.random = random

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        if torch.rand(1).item() > self.random.probability:  # TorchIO's Transform.__call__ draws this first
            return tensor
        coefficients = self.random.get_params(self.random.order, self.random.coefficients_range)
        field = bias_field(tuple(tensor.shape[1:]), self.random.order, coefficients)
        return tensor * torch.from_numpy(field)


def bias_field(shape: tuple[int, ...], order: int, coefficients: list[float]) -> np.ndarray:
    """``exp`` of TorchIO's polynomial ``sum c_ijk x^i y^j z^k`` (``i + j + k <= order``, coefficients in TorchIO's
    loop order) on ``shape``; each coordinate runs over the voxel centres, centred and divided by its maximum.

    Returns:
        float32 array of ``shape``.
    """
    powers = []
    for n in shape:
        centred = np.arange(-n / 2, n / 2) + 0.5  # TorchIO's coordinates (0 alone across a single voxel)
        if centred.max() > 0:
            centred /= centred.max()
        powers.append(centred[np.newaxis, :] ** np.arange(order + 1)[:, np.newaxis])  # (order + 1, n)
    table = np.zeros((order + 1,) * 3)
    terms = [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]
    for (i, j, k), coefficient in zip(terms, coefficients, strict=True):
        table[i, j, k] = coefficient
    field = np.tensordot(table, powers[0], axes=(0, 0))  # (j, k, x)
    field = np.tensordot(field, powers[1], axes=(0, 0))  # (k, x, y)
    field = np.tensordot(field, powers[2], axes=(0, 0))  # (x, y, z)
    return np.exp(field).astype(np.float32)


def _scale_intensity(tensor: torch.Tensor) -> torch.Tensor:
    """Multiply by one factor uniform in ``1 ± MAX_SCALE_CHANGE`` drawn from torch's generator."""
    import torch

    factor = 1.0 + MAX_SCALE_CHANGE * (2.0 * float(torch.rand(())) - 1.0)
    return tensor * factor


def _add_noise(tensor: torch.Tensor) -> torch.Tensor:
    """TorchIO's ``RandomNoise`` with a standard deviation relative to this sample's intensity range."""
    import torchio as tio

    span = float(tensor.max() - tensor.min()) or 1.0
    return tio.RandomNoise(mean=0.0, std=(0.0, MAX_NOISE_SD * span))(tensor)


def build_augmentation(
    names: tuple[str, ...], mode: ExtractionMode, slice_direction: SliceDirection = SliceDirection.SAGITTAL
) -> Augmentation | None:
    """The augmentation for ``TrainConfig.augmentations``; None when ``names`` is empty.

    Checks the names only (TorchIO is imported on the first augmented sample), so it is cheap enough to run
    before anything is written.

    Args:
        names: transform names, see ``AUGMENTATIONS``.
        mode: extraction mode of the samples (decides which axis is left-right).
        slice_direction: direction of the slices in slice mode.

    Raises:
        ConfigError: an unknown name, or ``flip`` on sagittal slices (they have no left-right axis).
    """
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(
            f"Unknown augmentation(s) {', '.join(repr(u) for u in unknown)} in --augmentations (train.augmentations). "
            f"Available: {', '.join(AUGMENTATIONS)}."
        )
    if not names:
        return None
    lr_axis: int | None = 0
    if mode is ExtractionMode.SLICE and slice_direction is SliceDirection.SAGITTAL:
        if "flip" in names:
            raise ConfigError(
                "Augmentation 'flip' mirrors left-right, but sagittal slices have no left-right axis. "
                "Remove 'flip' from --augmentations (train.augmentations) or use --slice-direction coronal or axial."
            )
        lr_axis = None
    return Augmentation(names=tuple(name for name in AUGMENTATIONS if name in names), lr_axis=lr_axis)
