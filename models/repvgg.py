"""RepVGG (Ding et al. 2021): 3x3 + 1x1 + identity branches that deploy as one 3x3 conv."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import ConvBN, conv2d_from, fuse_conv_bn, identity_kernel, pad_kernel, reparameterize


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), summed, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = ConvBN(in_channels, out_channels, 3, stride, 1, groups)
        self.pointwise = ConvBN(in_channels, out_channels, 1, stride, 0, groups)
        self.identity = None
        if in_channels == out_channels and stride == 1:
            self.identity = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def reparameterized(self) -> nn.Module:
        weight, bias = self.dense.fused()
        weight_1x1, bias_1x1 = self.pointwise.fused()
        weight, bias = weight + pad_kernel(weight_1x1, 3), bias + bias_1x1
        conv = self.dense.conv
        if self.identity is not None:
            delta = identity_kernel(conv.in_channels, conv.groups, 3, weight.dtype)
            weight_id, bias_id = fuse_conv_bn(delta, None, self.identity)
            weight, bias = weight + weight_id, bias + bias_id
        return nn.Sequential(conv2d_from((weight, bias), conv.stride, 1, conv.groups), self.act)


class RepVGG(nn.Module):
    """Stages of RepVGG blocks, each opening with a stride-2 block; global pool and classifier."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for width, depth in zip(widths, depths, strict=True):
            for index in range(depth):
                blocks.append(RepVGGBlock(channels, width, stride=2 if index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


@register_model("repvgg_a0_like", input_shape=(3, 64, 64), deploy=reparameterize)
def repvgg_a0_like() -> nn.Module:
    """RepVGG-A0 layout (depths 1, 2, 4, 8, 1) at widths 16-128; deploys as 3x3 conv + ReLU."""
    # Narrow enough that the branches and norms, not the 3x3 convs, dominate the train form.
    return RepVGG(widths=(16, 32, 48, 64, 128), depths=(1, 2, 4, 8, 1))
