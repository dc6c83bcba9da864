"""A small 3D residual network (ResNet-18 layout with narrow widths) for whole images, patches and ROIs.

Global average pooling before the single fc layer makes the parameter count independent of the input size,
so one model accepts any input of at least 17 voxels per axis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from bids_app.models.cnn import ConvNet, halved_shape


class BasicBlock3d(nn.Module):
    """Two 3×3×3 convolutions with a residual connection: ``(N, C_in, *S) → (N, C_out, *ceil(S/stride))``.

    The shortcut is a strided 1×1×1 convolution + batch norm when the shape changes, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                    norm=nn.BatchNorm3d(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet3D(ConvNet):
    """ResNet-18-style 3D network: stem, four stages of two basic blocks (16, 32, 64, 128 channels), head.

    ``features``: ``stem`` (7×7×7 conv stride 2 → batch norm → ReLU → 3×3×3 max pool stride 2) then
    ``layer1``..``layer4`` (stages 2-4 halve the size); every downsampling maps ``n`` voxels to ``ceil(n/2)``.
    ``classifier``: global average pool → flatten → dropout → fc. Input ``(N, C, D, H, W)`` → ``(N, n_outputs)``.
    """

    N_DOWNSAMPLINGS = 5
    WIDTHS: ClassVar[tuple[int, ...]] = (16, 32, 64, 128)
    BLOCKS_PER_STAGE = 2

    def __init__(self, input_shape: Sequence[int], n_outputs: int, dropout: float = 0.5) -> None:
        super().__init__()
        first = self.WIDTHS[0]
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Sequential(
                OrderedDict(
                    conv=nn.Conv3d(input_shape[0], first, kernel_size=7, stride=2, padding=3, bias=False),
                    norm=nn.BatchNorm3d(first),
                    act=nn.ReLU(inplace=True),
                    pool=nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
                )
            )
        )
        in_channels = first
        for index, width in enumerate(self.WIDTHS):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock3d(in_channels, width, stride)]
            blocks += [BasicBlock3d(width, width, 1) for _ in range(self.BLOCKS_PER_STAGE - 1)]
            layers[f"layer{index + 1}"] = nn.Sequential(*blocks)
            in_channels = width
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool3d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(in_channels, n_outputs),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def feature_shape(cls, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape ``(C, D', H', W')`` of one sample's ``features`` output, computed without a forward pass."""
        return (cls.WIDTHS[-1], *halved_shape(input_shape[1:], cls.N_DOWNSAMPLINGS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, D, H, W)`` → ``(N, n_outputs)``."""
        return self.classifier(self.features(x))
