"""ACNet (Ding et al. 2019): asymmetric k x k + 1 x k + k x 1 branches that deploy as one conv."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import ConvBN, conv2d_from, pad_kernel, reparameterize


class ACBlock(nn.Module):
    """Square, horizontal and vertical conv-BN branches on one input, summed (no activation).

    All three are centred (padding k // 2 along each kernel dimension), so at any stride the band
    kernels sample the middle row and column of the square one and merge exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        pad = kernel // 2
        self.square = ConvBN(in_channels, out_channels, kernel, stride, pad)
        self.horizontal = ConvBN(in_channels, out_channels, (1, kernel), stride, (0, pad))
        self.vertical = ConvBN(in_channels, out_channels, (kernel, 1), stride, (pad, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.horizontal(x) + self.vertical(x)

    def reparameterized(self) -> nn.Conv2d:
        conv = self.square.conv
        weight, bias = self.square.fused()
        for band in (self.horizontal, self.vertical):
            band_weight, band_bias = band.fused()
            weight, bias = weight + pad_kernel(band_weight, conv.kernel_size), bias + band_bias
        return conv2d_from((weight, bias), conv.stride, conv.padding)


class ACBasicBlock(nn.Module):
    """ResNet BasicBlock whose two 3x3 conv-BN layers are ACBlocks."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.ac1 = ACBlock(in_channels, out_channels, 3, stride)
        self.ac2 = ACBlock(out_channels, out_channels, 3)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBN(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.ac2(self.relu(self.ac1(x))) + shortcut)


class ACResNet(nn.Module):
    """ACBlock stem (3x3/2), stages of ACBasicBlocks, global pool and classifier."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(ACBlock(in_channels, widths[0], 3, stride=2), nn.ReLU())
        blocks = []
        channels = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for index in range(depth):
                blocks.append(ACBasicBlock(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@register_model("acnet_resnet_like", input_shape=(3, 64, 64), deploy=reparameterize)
def acnet_resnet_like() -> nn.Module:
    """ResNet-like net (4 stages x 1 BasicBlock, widths 16-128) whose 3x3 convs are ACBlocks."""
    return ACResNet(widths=(16, 32, 64, 128), depths=(1, 1, 1, 1))
