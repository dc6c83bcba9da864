"""Plain convolutional networks: conv blocks, then fully connected layers (the Conv4/Conv5-FC3 family).

A conv block is conv(3, padding 1) → batch norm → ReLU → max pool(2, stride 2, ceil mode). Ceil-mode pooling
keeps the last voxel of an odd axis: floor mode would silently ignore up to ``2**k - 1`` voxels at the far border
of every axis (16 voxels of the 208 of a t1-linear crop for five blocks). An axis of ``n`` voxels is therefore
``ceil(n / 2**k)`` voxels long after ``k`` blocks.

Every model takes ``input_shape = (C, *spatial)`` and picks 2D or 3D layers from ``len(spatial)``; the input
batch is ``(N, C, *spatial)`` and the output ``(N, n_outputs)`` logits (classification) or values (regression).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM: dict[int, type[nn.BatchNorm2d] | type[nn.BatchNorm3d]] = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOL: dict[int, type[nn.MaxPool2d] | type[nn.MaxPool3d]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def halved_shape(spatial: Sequence[int], n_halvings: int) -> tuple[int, ...]:
    """Spatial shape after ``n_halvings`` ceil-mode halvings (``ceil(ceil(n/2)/2) == ceil(n/4)``)."""
    return tuple(math.ceil(size / 2**n_halvings) for size in spatial)


def min_spatial_size(n_halvings: int) -> int:
    """Smallest axis length for which every one of ``n_halvings`` halvings still sees at least 2 voxels.

    Below it the deepest downsamplings pool a single voxel and do nothing: the network is deeper than the input.
    """
    return 2 ** (n_halvings - 1) + 1 if n_halvings > 0 else 1


class ConvNet(nn.Module):
    """Base of every registered model.

    Subclasses hold their convolutional part in the attribute named ``CONV_PART`` (``features`` for
    classifiers and regressors, ``encoder`` for autoencoders), built from layers with identical state-dict
    names wherever the structure matches, so weights move between them (see ``bids_app.models.transfer``).
    """

    N_DOWNSAMPLINGS: ClassVar[int]
    CONV_PART: ClassVar[str] = "features"

    @classmethod
    def min_spatial_size(cls) -> int:
        """Smallest usable length of every spatial axis, in voxels."""
        return min_spatial_size(cls.N_DOWNSAMPLINGS)


class ConvBlock(nn.Sequential):
    """conv(3, padding 1) → batch norm → ReLU → max pool(2, ceil mode): ``(N, C_in, *S) → (N, C_out, *ceil(S/2))``."""

    def __init__(self, in_channels: int, out_channels: int, n_dims: int) -> None:
        super().__init__(
            OrderedDict(
                conv=CONV[n_dims](in_channels, out_channels, kernel_size=3, padding=1),
                norm=BATCH_NORM[n_dims](out_channels),
                act=nn.ReLU(inplace=True),
                pool=MAX_POOL[n_dims](kernel_size=2, stride=2, ceil_mode=True),
            )
        )


def make_conv_blocks(in_channels: int, channels: Sequence[int], n_dims: int) -> nn.Sequential:
    """A stack of ``ConvBlock`` with output channels ``channels``; state-dict keys ``<i>.conv.weight`` etc."""
    widths = (in_channels, *channels)
    return nn.Sequential(*(ConvBlock(widths[i], widths[i + 1], n_dims) for i in range(len(channels))))


class ConvFC(ConvNet):
    """Conv blocks, flatten, then three fully connected layers with dropout before the first.

    ``features``: ``len(CHANNELS)`` conv blocks; ``classifier``: flatten → dropout → fc1 → ReLU → fc2 → ReLU → fc3.
    The flattened size is computed from the input shape, so the input shape is fixed at construction.
    """

    CHANNELS: ClassVar[tuple[int, ...]]
    HIDDEN: ClassVar[tuple[int, int]]

    def __init__(self, input_shape: Sequence[int], n_outputs: int, dropout: float = 0.5) -> None:
        super().__init__()
        n_dims = len(input_shape) - 1
        self.features = make_conv_blocks(input_shape[0], self.CHANNELS, n_dims)
        hidden_1, hidden_2 = self.HIDDEN
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc1=nn.Linear(self.flattened_size(input_shape), hidden_1),
                act1=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden_1, hidden_2),
                act2=nn.ReLU(inplace=True),
                fc3=nn.Linear(hidden_2, n_outputs),
            )
        )

    @classmethod
    def feature_shape(cls, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape ``(C, *spatial)`` of one sample's ``features`` output, computed without a forward pass."""
        return (cls.CHANNELS[-1], *halved_shape(input_shape[1:], len(cls.CHANNELS)))

    @classmethod
    def flattened_size(cls, input_shape: Sequence[int]) -> int:
        """Number of inputs of ``fc1`` for samples of shape ``input_shape = (C, *spatial)``."""
        return math.prod(cls.feature_shape(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` → ``(N, n_outputs)``."""
        return self.classifier(self.features(x))


class Conv5FC3(ConvFC):
    """Five conv blocks (8, 16, 32, 64, 128 channels) and fc layers of 256 and 64 units.

    On a 169×208×179 t1-linear image the features are 128×6×7×6 (32 256 values); the hidden widths are kept
    narrower than the 1300/50 of the original papers so the model stays near 8.6 M parameters instead of 42 M.
    """

    N_DOWNSAMPLINGS = 5
    CHANNELS = (8, 16, 32, 64, 128)
    HIDDEN = (256, 64)


class Conv4FC3(ConvFC):
    """Four conv blocks (8, 16, 32, 64 channels) and fc layers of 50 and 40 units.

    Meant for patches and ROIs (a 50³ patch gives 64×4×4×4 features). The narrow first fc layer keeps a
    169×208×179 image (64×11×13×12 = 109 824 features) near 5.5 M parameters.
    """

    N_DOWNSAMPLINGS = 4
    CHANNELS = (8, 16, 32, 64)
    HIDDEN = (50, 40)


class Conv4FC3Image2mm(ConvFC):
    """Four conv blocks (16, 32, 64, 128 channels) and fc layers of 256 and 64 units, for whole images at 2 mm.

    A 2 mm image (``--image-voxel-size 2``: 85×104×90) is an eighth of the 1 mm voxels, so the first blocks can
    afford twice conv5_fc3's channels. Four halvings leave 128×6×7×6 features (32 256 values, conv5_fc3's count
    on a 1 mm image; a feature voxel spans 32 mm, as there), about 8.5 M parameters. conv5_fc3 on the same input
    ends at 128×3×4×3 (64 mm per feature voxel), and conv4_fc3's 50-unit fc layer was sized for patches.
    """

    N_DOWNSAMPLINGS = 4
    CHANNELS = (16, 32, 64, 128)
    HIDDEN = (256, 64)


class Conv3FC3Image3mm(ConvFC):
    """Three conv blocks (16, 32, 64 channels) and fc layers of 128 and 64 units, for whole images at 3 mm.

    A 3 mm image (``--image-voxel-size 3``: 57×70×60) after three halvings is 64×8×9×8 (36 864 values; a feature
    voxel spans 24 mm), about 4.8 M parameters. Five halvings (conv5_fc3) would leave 2×3×2 voxels of 96 mm, too
    coarse to keep where in the brain a local effect is.
    """

    N_DOWNSAMPLINGS = 3
    CHANNELS = (16, 32, 64)
    HIDDEN = (128, 64)


class SmallCNN(ConvNet):
    """Two conv blocks (4, 8 channels), global average pooling, two small fc layers: for tests and demos.

    Any input of at least 3 voxels per axis works; the parameter count does not depend on the input size.
    """

    N_DOWNSAMPLINGS = 2
    CHANNELS: ClassVar[tuple[int, ...]] = (4, 8)
    HIDDEN = 16

    def __init__(self, input_shape: Sequence[int], n_outputs: int, dropout: float = 0.5) -> None:
        super().__init__()
        n_dims = len(input_shape) - 1
        pool = nn.AdaptiveAvgPool2d(1) if n_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.features = make_conv_blocks(input_shape[0], self.CHANNELS, n_dims)
        self.classifier = nn.Sequential(
            OrderedDict(
                pool=pool,
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc1=nn.Linear(self.CHANNELS[-1], self.HIDDEN),
                act1=nn.ReLU(inplace=True),
                fc2=nn.Linear(self.HIDDEN, n_outputs),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` → ``(N, n_outputs)``."""
        return self.classifier(self.features(x))
