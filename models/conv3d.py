"""A small 3D conv net with batch norm, shaped like one level of a 3D U-Net (Cicek et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


def _conv3d_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
    )


class Conv3dBNNet(nn.Module):
    """Encoder block, strided block, 1x1x1 block, ConvTranspose3d + BN upsampling, skip, head."""

    def __init__(self, in_channels: int = 2, width: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.encode = _conv3d_bn_relu(in_channels, width)
        self.down = _conv3d_bn_relu(width, 2 * width, stride=2)
        self.mix = _conv3d_bn_relu(2 * width, 2 * width, kernel=1)
        self.up = nn.Sequential(
            nn.ConvTranspose3d(2 * width, width, 2, stride=2, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(),
        )
        self.decode = _conv3d_bn_relu(2 * width, width)
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encode(x)
        x = self.up(self.mix(self.down(skip)))
        return self.head(self.decode(torch.cat([x, skip], dim=1)))


@register_model("conv3d_bn_net", input_shape=(2, 8, 16, 16))
def conv3d_bn_net() -> nn.Module:
    """3D conv net with Conv3d/ConvTranspose3d + BatchNorm3d blocks, per-voxel 3-class output."""
    return Conv3dBNNet(in_channels=2, width=8, num_classes=3)
