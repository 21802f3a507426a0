"""RepLKNet (Ding et al. 2022): a large depthwise kernel trained next to a small one."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import (
    ConvBN,
    Residual,
    conv2d_from,
    fuse_bn_conv,
    fuse_conv_bn,
    pad_kernel,
    reparameterize,
)


class ReparamLargeKernelConv(nn.Module):
    """k x k conv-BN + small x small conv-BN on one input, summed; deploys as one k x k conv."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, small: int, stride: int, groups: int
    ) -> None:
        super().__init__()
        self.large = ConvBN(in_channels, out_channels, kernel, stride, kernel // 2, groups)
        self.small = ConvBN(in_channels, out_channels, small, stride, small // 2, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(x) + self.small(x)

    def reparameterized(self) -> nn.Conv2d:
        conv = self.large.conv
        weight, bias = self.large.fused()
        small_weight, small_bias = self.small.fused()
        weight, bias = weight + pad_kernel(small_weight, conv.kernel_size), bias + small_bias
        return conv2d_from((weight, bias), conv.stride, conv.padding, conv.groups)


def _prenorm_pointwise(norm: nn.BatchNorm2d, pointwise: ConvBN) -> nn.Conv2d:
    # A norm in front of a 1x1 conv has no padding to break, so it folds into the conv exactly.
    kernel = fuse_conv_bn(*fuse_bn_conv(pointwise.conv.weight, None, norm), pointwise.bn)
    return conv2d_from(kernel)


class RepLKBlock(nn.Module):
    """BN -> 1x1 conv-BN -> ReLU -> dw large-kernel conv -> ReLU -> 1x1 conv-BN, plus the input."""

    def __init__(self, channels: int, kernel: int, small: int = 5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = ConvBN(channels, channels, 1)
        self.large_kernel = ReparamLargeKernelConv(channels, channels, kernel, small, 1, channels)
        self.pw2 = ConvBN(channels, channels, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.pw1(self.norm(x)))
        return x + self.pw2(self.act(self.large_kernel(out)))

    def reparameterized(self) -> nn.Module:
        pw1 = _prenorm_pointwise(self.norm, self.pw1)
        large_kernel = self.large_kernel.reparameterized()
        pw2 = self.pw2.reparameterized()
        return Residual(nn.Sequential(pw1, self.act, large_kernel, self.act, pw2))


class ConvFFN(nn.Module):
    """BN -> 1x1 conv-BN -> GELU -> 1x1 conv-BN, plus the input (RepLKNet's ConvFFN)."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = ConvBN(channels, ratio * channels, 1)
        self.act = nn.GELU()
        self.pw2 = ConvBN(ratio * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(x))))

    def reparameterized(self) -> nn.Module:
        pw1 = _prenorm_pointwise(self.norm, self.pw1)
        return Residual(nn.Sequential(pw1, self.act, self.pw2.reparameterized()))


class RepLKNet(nn.Module):
    """RepLKNet stem (4x down), stages of (RepLKBlock, ConvFFN), 1x1 + dw 3x3/2 transitions."""

    def __init__(
        self, widths: tuple[int, ...], kernels: tuple[int, ...], num_classes: int = 10
    ) -> None:
        super().__init__()
        width = widths[0]
        layers = [
            ConvBN(3, width, 3, 2, 1),
            nn.ReLU(),
            ConvBN(width, width, 3, 1, 1, width),
            nn.ReLU(),
            ConvBN(width, width, 1),
            nn.ReLU(),
            ConvBN(width, width, 3, 2, 1, width),
            nn.ReLU(),
        ]
        for index, (width, kernel) in enumerate(zip(widths, kernels, strict=True)):
            if index > 0:
                previous = widths[index - 1]
                layers += [ConvBN(previous, width, 1), nn.ReLU()]
                layers += [ConvBN(width, width, 3, 2, 1, width), nn.ReLU()]
            layers += [RepLKBlock(width, kernel), ConvFFN(width)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("replknet_like", input_shape=(3, 64, 64), deploy=reparameterize)
def replknet_like() -> nn.Module:
    """RepLKNet with dw 31x31 (+5x5) at 16x16 and 13x13 (+5x5) at 8x8, widths 16 and 32."""
    return RepLKNet(widths=(16, 32), kernels=(31, 13))
