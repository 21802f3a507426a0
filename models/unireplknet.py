"""UniRepLKNet (Ding et al. 2024): a dilated re-parameterized depthwise large kernel.

Included: the Dilated Reparam Block, the batch norm after it, a channels-last GELU FFN (linear
layers) and layer scale. Left out: SE block, GRN and drop path.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .reparam import (
    ConvBN,
    conv2d_from,
    dilate_kernel,
    fuse_conv_bn,
    linear_from,
    pad_kernel,
    reparameterize,
)


class DilatedReparamBlock(nn.Module):
    """dw k x k conv-BN + dw conv-BN branches at dilations, summed; deploys as one dw k x k conv.

    A k' x k' kernel at dilation r covers r(k' - 1) + 1 pixels; every branch is centred and fits
    inside the large kernel, so it merges as a dense kernel with zeros between its taps.
    """

    def __init__(
        self,
        channels: int,
        kernel: int = 13,
        branch_kernels: tuple[int, ...] = (5, 7, 3, 3, 3),
        dilations: tuple[int, ...] = (1, 2, 3, 4, 5),
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.origin = ConvBN(channels, channels, kernel, 1, kernel // 2, channels)
        self.branches = nn.ModuleList(
            ConvBN(channels, channels, k, 1, (r * (k - 1) + 1) // 2, channels, dilation=r)
            for k, r in zip(branch_kernels, dilations, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x)
        for branch in self.branches:
            out = out + branch(x)
        return out

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one dw k x k conv that sums every branch."""
        weight, bias = self.origin.fused()
        for branch in self.branches:
            branch_weight, branch_bias = branch.fused()
            dense = dilate_kernel(branch_weight, branch.conv.dilation[0])
            weight, bias = weight + pad_kernel(dense, self.kernel), bias + branch_bias
        return weight, bias

    def reparameterized(self) -> nn.Conv2d:
        return conv2d_from(self.fused(), 1, self.kernel // 2, self.origin.conv.groups)


class UniRepLKNetBlock(nn.Module):
    """Dilated reparam dw conv -> BN -> Linear 4x -> GELU -> Linear -> layer scale, plus input."""

    def __init__(self, dim: int, kernel: int = 13, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = DilatedReparamBlock(dim, kernel)
        self.norm = nn.BatchNorm2d(dim)
        self.ffn = FFN(nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ffn(self.norm(self.dwconv(x)))
        return x + out * self.gamma.reshape(1, -1, 1, 1)

    def reparameterized(self) -> nn.Module:
        # The norm follows the merged conv directly, and layer scale the last linear.
        dwconv = self.dwconv.reparameterized()
        weight, bias = fuse_conv_bn(dwconv.weight, dwconv.bias, self.norm)
        dwconv = conv2d_from((weight, bias), 1, dwconv.padding, dwconv.groups)
        fc2 = self.ffn.fc2
        fc2 = linear_from((fc2.weight * self.gamma[:, None], fc2.bias * self.gamma))
        return DeployBlock(dwconv, FFN(self.ffn.fc1, fc2))


class FFN(nn.Module):
    """Channels-last Linear -> GELU -> Linear on an NCHW tensor."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, nn.GELU(), fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1))))
        return out.permute(0, 3, 1, 2)


class DeployBlock(nn.Module):
    """``x + ffn(dwconv(x))``: the deploy form of a UniRepLKNet block."""

    def __init__(self, dwconv: nn.Conv2d, ffn: FFN) -> None:
        super().__init__()
        self.dwconv, self.ffn = dwconv, ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.dwconv(x))


class UniRepLKNet(nn.Module):
    """Conv-BN stem (4x down), stages of UniRepLKNet blocks, 3x3/2 conv-BN downsampling, head."""

    def __init__(
        self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10
    ) -> None:
        super().__init__()
        half = dims[0] // 2
        layers = [ConvBN(3, half, 3, 2, 1), nn.GELU(), ConvBN(half, dims[0], 3, 2, 1)]
        for index, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if index > 0:
                layers.append(ConvBN(dims[index - 1], dim, 3, 2, 1))
            layers += [UniRepLKNetBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("unireplknet_like", input_shape=(3, 64, 64), deploy=reparameterize)
def unireplknet_like() -> nn.Module:
    """UniRepLKNet blocks (dw 13x13 + dilated 5,7,3,3,3 at 1-5), dims 32 and 64, depths 2 and 2."""
    return UniRepLKNet(dims=(32, 64), depths=(2, 2))
