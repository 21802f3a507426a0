"""ResNet-18 topology at reduced width (He et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv_bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv_bn2 = _conv_bn(out_channels, out_channels, 3)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _conv_bn(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv_bn1(x))
        return self.relu(self.conv_bn2(out) + shortcut)


class ResNet(nn.Module):
    """Stem conv7x7/2 + maxpool, stages of BasicBlocks, global average pool, classifier."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(in_channels, widths[0], 7, stride=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks = []
        channels = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@register_model("resnet18_like", input_shape=(3, 64, 64))
def resnet18_like() -> nn.Module:
    """ResNet-18 topology (4 stages x 2 BasicBlocks) at widths 16-128, 10 classes."""
    return ResNet(widths=(16, 32, 64, 128), depths=(2, 2, 2, 2))
