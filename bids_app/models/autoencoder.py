"""Convolutional autoencoders for the reconstruction task, and the encoders transfer learning reuses.

The ``encoder`` of ``ConvAutoencoder`` is built exactly like ``Conv5FC3.features`` (same blocks, same state-dict
names), so a trained encoder initialises a classifier. The decoder mirrors it block by block: upsample ×2 (nearest
neighbour), crop to the size the matching encoder block received (ceil-mode pooling rounds odd sizes up, so
doubling overshoots by at most one voxel), then a 3×3 convolution with the encoder block's channels swapped. The
output therefore has the input's shape for any input size, without padding the input, and each decoder
convolution costs what its encoder mirror costs: the full-resolution one maps 8 channels to C, never 8 to 8.
Resize-then-convolve also avoids the checkerboard artefacts of strided transposed convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from bids_app.models.cnn import BATCH_NORM, CONV, Conv5FC3, ConvNet, SmallCNN, halved_shape, make_conv_blocks


class DecoderBlock(nn.Module):
    """Upsample ×2 (nearest) → crop to ``size`` → conv(3, padding 1) → batch norm → ReLU.

    ``(N, C_in, *S) → (N, C_out, *size)`` with ``size <= 2 * S`` per axis. With ``activate=False`` (the output
    block) the convolution is linear: no batch norm, no ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, n_dims: int, activate: bool = True) -> None:
        super().__init__()
        self.conv = CONV[n_dims](in_channels, out_channels, kernel_size=3, padding=1)
        self.norm: nn.Module = BATCH_NORM[n_dims](out_channels) if activate else nn.Identity()
        self.act: nn.Module = nn.ReLU(inplace=True) if activate else nn.Identity()

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        for dim, length in enumerate(size, start=2):
            x = x.narrow(dim, 0, length)
        return self.act(self.norm(self.conv(x)))


class ConvAutoencoder(ConvNet):
    """Encoder = the conv blocks of ``Conv5FC3``; decoder = one mirrored ``DecoderBlock`` per encoder block.

    Input ``(N, C, *spatial)`` → output of the same shape, linear (no final activation, so it suits min-max as well
    as z-score normalised inputs).
    """

    CONV_PART = "encoder"
    CHANNELS: ClassVar[tuple[int, ...]] = Conv5FC3.CHANNELS
    N_DOWNSAMPLINGS = len(Conv5FC3.CHANNELS)

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        n_dims = len(input_shape) - 1
        channels = self.CHANNELS
        self.encoder = make_conv_blocks(input_shape[0], channels, n_dims)
        # Decoder block i mirrors encoder block j = k-1-i: channels[j] → channels[j-1], the last one → C (linear).
        widths_out = (input_shape[0], *channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(channels[j], widths_out[j], n_dims, activate=j > 0) for j in reversed(range(len(channels)))
        )

    @classmethod
    def feature_shape(cls, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape ``(C, *spatial)`` of one sample's code (the ``encoder`` output), computed without a forward pass."""
        return (cls.CHANNELS[-1], *halved_shape(input_shape[1:], len(cls.CHANNELS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` → ``(N, C, *spatial)``."""
        sizes = []
        for block in self.encoder:
            sizes.append(tuple(x.shape[2:]))
            x = block(x)
        for block, size in zip(self.decoder, reversed(sizes), strict=True):
            x = block(x, size)
        return x


class SmallAutoencoder(ConvAutoencoder):
    """The tiny counterpart of ``SmallCNN`` (encoder = its ``features``): for tests and demos."""

    CHANNELS = SmallCNN.CHANNELS
    N_DOWNSAMPLINGS = len(SmallCNN.CHANNELS)
