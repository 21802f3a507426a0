"""Diverse Branch Block (Ding et al. 2021): four branches that deploy as one k x k conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .reparam import (
    ConvBN,
    avg_pool_kernel,
    batch_norm_affine,
    conv2d_from,
    fuse_conv_bn,
    merge_1x1_kxk,
    pad_kernel,
    reparameterize,
)


class BNAndPad(nn.Module):
    """Batch norm, then padding with the values the norm gives a zero input (DBB's BNAndPadLayer).

    Between a bias-free 1x1 conv and an unpadded k x k conv this makes the pair see exactly what
    it would on a zero-padded input, so the pair merges into one padded k x k conv.
    """

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # In eval mode the norm is per-channel affine, so normalizing a zero-padded input
            # writes exactly the border values; one norm, one pad, and no rounding in between.
            return self.bn(F.pad(x, [self.pad] * 4))
        # Training statistics must come from the unpadded input, as in DBB.
        _, shift = batch_norm_affine(self.bn)
        shift = shift.reshape(1, -1, 1, 1)
        return F.pad(self.bn(x) - shift, [self.pad] * 4) + shift


class DiverseBranchBlock(nn.Module):
    """Sum of k x k conv-BN, 1x1 conv-BN, 1x1 conv-BN -> k x k conv-BN, 1x1 conv-BN -> avg-pool-BN.

    As in DBB for `groups=1`, except that the 1x1 conv of the 1x1 -> k x k branch is a plain conv
    (DBB parameterizes it as identity + learned weight, which computes the same function).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        pad = kernel // 2
        self.kernel, self.stride, self.pad = kernel, stride, pad
        self.origin = ConvBN(in_channels, out_channels, kernel, stride, pad)
        self.pointwise = ConvBN(in_channels, out_channels, 1, stride)
        self.seq_1x1 = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        self.seq_bn = BNAndPad(in_channels, pad)
        self.seq_kxk = ConvBN(in_channels, out_channels, kernel, stride)
        self.avg_1x1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.avg_bn = BNAndPad(out_channels, pad)
        self.avg = nn.AvgPool2d(kernel, stride)
        self.avg_out_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x) + self.pointwise(x)
        out = out + self.seq_kxk(self.seq_bn(self.seq_1x1(x)))
        return out + self.avg_out_bn(self.avg(self.avg_bn(self.avg_1x1(x))))

    def reparameterized(self) -> nn.Conv2d:
        weight, bias = self.origin.fused()
        weight_1x1, bias_1x1 = self.pointwise.fused()
        weight, bias = weight + pad_kernel(weight_1x1, self.kernel), bias + bias_1x1
        first = fuse_conv_bn(self.seq_1x1.weight, None, self.seq_bn.bn)
        weight_seq, bias_seq = merge_1x1_kxk(first, self.seq_kxk.fused())
        weight, bias = weight + weight_seq, bias + bias_seq
        first = fuse_conv_bn(self.avg_1x1.weight, None, self.avg_bn.bn)
        channels = self.avg_out_bn.num_features
        pool = avg_pool_kernel(channels, 1, self.kernel, weight.dtype)
        weight_avg, bias_avg = merge_1x1_kxk(first, fuse_conv_bn(pool, None, self.avg_out_bn))
        return conv2d_from((weight + weight_avg, bias + bias_avg), self.stride, self.pad)


class DBBNet(nn.Module):
    """A stack of DBB + ReLU layers, global pool and classifier."""

    def __init__(self, layers: tuple[tuple[int, int, int], ...], num_classes: int = 10) -> None:
        super().__init__()
        blocks = []
        channels = 3
        for width, kernel, stride in layers:
            blocks += [DiverseBranchBlock(channels, width, kernel, stride), nn.ReLU()]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


@register_model("dbb_net", input_shape=(3, 32, 32), deploy=reparameterize)
def dbb_net() -> nn.Module:
    """Four Diverse Branch Blocks (3x3 and 5x5, widths 16-64) with ReLU; each deploys as a conv."""
    return DBBNet(layers=((16, 3, 2), (32, 3, 1), (32, 5, 2), (64, 3, 2)))
