"""MobileOne (Vasu et al. 2023): over-parameterized conv-BN branches that deploy as one conv."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import ConvBN, conv2d_from, fuse_conv_bn, identity_kernel, pad_kernel, reparameterize


class MobileOneBlock(nn.Module):
    """`branches` k x k conv-BN + a 1x1 conv-BN scale branch + an identity BN, summed, then `act`.

    The scale branch exists when k > 1 and `scale_branch`; the identity when the shapes allow.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        branches: int = 1,
        scale_branch: bool = True,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.groups = kernel, stride, groups
        self.convs = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel, stride, kernel // 2, groups)
            for _ in range(branches)
        )
        self.scale = None
        if kernel > 1 and scale_branch:
            self.scale = ConvBN(in_channels, out_channels, 1, stride, 0, groups)
        self.skip = None
        if in_channels == out_channels and stride == 1:
            self.skip = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [*self.convs, *(m for m in (self.scale, self.skip) if m is not None)]
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return self.act(out)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one k x k conv that sums every branch."""
        kernels = [conv.fused() for conv in self.convs]
        if self.scale is not None:
            weight, bias = self.scale.fused()
            kernels.append((pad_kernel(weight, self.kernel), bias))
        if self.skip is not None:
            channels = self.skip.num_features
            delta = identity_kernel(channels, self.groups, self.kernel, kernels[0][0].dtype)
            kernels.append(fuse_conv_bn(delta, None, self.skip))
        return sum(w for w, _ in kernels), sum(b for _, b in kernels)

    def reparameterized(self) -> nn.Module:
        conv = conv2d_from(self.fused(), self.stride, self.kernel // 2, self.groups)
        return nn.Sequential(conv, self.act)


def _depthwise_separable(in_channels: int, out_channels: int, stride: int, branches: int):
    return [
        MobileOneBlock(in_channels, in_channels, 3, stride, in_channels, branches),
        MobileOneBlock(in_channels, out_channels, 1, 1, 1, branches),
    ]


class MobileOne(nn.Module):
    """MobileOne stem block, stages of (dw 3x3, pw 1x1) block pairs, global pool and classifier."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        branches: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        channels = widths[0]
        blocks = [MobileOneBlock(in_channels, channels, 3, 2, 1, branches)]
        for width, depth in zip(widths[1:], depths, strict=True):
            for index in range(depth):
                blocks += _depthwise_separable(channels, width, 2 if index == 0 else 1, branches)
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


@register_model("mobileone_s0_like", input_shape=(3, 64, 64), deploy=reparameterize)
def mobileone_s0_like() -> nn.Module:
    """MobileOne-S0 layout (4 branches per block; depths 2, 3, 3, 1) at widths 16-128."""
    return MobileOne(widths=(16, 32, 64, 96, 128), depths=(2, 3, 3, 1))
