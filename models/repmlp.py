"""RepMLP (Ding et al. 2022): conv branches next to a fully connected layer on fixed-size patches.

Included: the partition perceptron (one linear over each flattened C x h x w patch, i.e. RepMLP's
fc3 with one group, then BN) and its 1x1 and 3x3 conv-BN branches. Left out: the global
perceptron. On a fixed patch size a conv is a linear map, so the branches merge into the FC.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import (
    ConvBN,
    Residual,
    conv_as_linear,
    fuse_conv_bn,
    linear_from,
    reparameterize,
)


def _partition(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/h * W/w, C, h, w) patches."""
    _, channels, height, width = x.shape
    x = x.reshape(-1, channels, height // h, h, width // w, w)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, h, w)


def _unpartition(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `_partition` for an (height, width) image."""
    _, channels, h, w = x.shape
    x = x.reshape(-1, height // h, width // w, channels, h, w)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, channels, height, width)


class PatchFC(nn.Module):
    """One linear over every flattened C x h x w patch: the deploy form of a RepMLP unit."""

    def __init__(self, fc: nn.Linear, patch: tuple[int, int]) -> None:
        super().__init__()
        self.fc, self.patch = fc, patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.patch
        patches = _partition(x, h, w)
        out = self.fc(patches.flatten(1)).reshape(patches.shape[0], -1, h, w)
        return _unpartition(out, x.shape[2], x.shape[3])


class RepMLPUnit(nn.Module):
    """Linear-BN over flattened h x w patches plus conv-BN branches on the same patches, summed."""

    def __init__(
        self, channels: int, patch: tuple[int, int], conv_kernels: tuple[int, ...] = (1, 3)
    ) -> None:
        super().__init__()
        self.channels, self.patch = channels, patch
        features = channels * patch[0] * patch[1]
        self.fc = nn.Linear(features, features, bias=False)
        self.fc_bn = nn.BatchNorm1d(features)
        self.convs = nn.ModuleList(ConvBN(channels, channels, k, 1, k // 2) for k in conv_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.patch
        patches = _partition(x, h, w)
        out = self.fc_bn(self.fc(patches.flatten(1))).reshape(patches.shape[0], -1, h, w)
        for conv in self.convs:
            out = out + conv(patches)
        return _unpartition(out, x.shape[2], x.shape[3])

    def reparameterized(self) -> PatchFC:
        weight, bias = fuse_conv_bn(self.fc.weight, None, self.fc_bn)
        in_shape = (self.channels, *self.patch)
        for conv in self.convs:
            conv_weight, conv_bias = conv_as_linear(*conv.fused(), in_shape, conv.conv.padding)
            weight, bias = weight + conv_weight, bias + conv_bias
        return PatchFC(linear_from((weight, bias)), self.patch)


class RepMLPNet(nn.Module):
    """Conv-BN stem (2x down), residual RepMLP units each followed by ReLU, pool and classifier."""

    def __init__(self, channels: int, patch: tuple[int, int], depth: int, num_classes: int = 10):
        super().__init__()
        layers = [ConvBN(3, channels, 3, 2, 1), nn.ReLU()]
        for _ in range(depth):
            layers += [Residual(RepMLPUnit(channels, patch)), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("repmlp_net", input_shape=(3, 16, 16), deploy=reparameterize)
def repmlp_net() -> nn.Module:
    """Two RepMLP units (8 channels, 8x8 map in 4x4 patches, 1x1 + 3x3 branches) after a stem."""
    return RepMLPNet(channels=8, patch=(4, 4), depth=2)
