"""InceptionNeXt (Yu et al. 2024): identity, square and band depthwise convs on channel groups.

The four groups are one depthwise conv whose per-channel kernels are zero-padded to the band
length, a delta on the identity channels; the deploy form is that conv, which may run slower
than the split form (Yu et al. 2024, InceptionNeXt, arXiv:2303.16900).
"""

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
    identity_kernel,
    pad_kernel,
    reparameterize,
)


class InceptionDWConv2d(nn.Module):
    """cat(identity, dw square, dw 1 x band, dw band x 1) on channel groups."""

    def __init__(self, dim: int, square: int = 3, band: int = 11, branch_ratio: float = 0.125):
        super().__init__()
        group = int(dim * branch_ratio)
        self.band = band
        self.dwconv_hw = nn.Conv2d(group, group, square, padding=square // 2, groups=group)
        self.dwconv_w = nn.Conv2d(group, group, (1, band), padding=(0, band // 2), groups=group)
        self.dwconv_h = nn.Conv2d(group, group, (band, 1), padding=(band // 2, 0), groups=group)
        self.split_sizes = (dim - 3 * group, group, group, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), 1)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one dw band x band conv over all channels."""
        identity = self.split_sizes[0]
        convs = (self.dwconv_hw, self.dwconv_w, self.dwconv_h)
        delta = identity_kernel(identity, identity, self.band, self.dwconv_hw.weight.dtype)
        weight = torch.cat([delta, *(pad_kernel(conv.weight, self.band) for conv in convs)])
        bias = torch.cat([weight.new_zeros(identity), *(conv.bias for conv in convs)])
        return weight, bias


class MetaNeXtBlock(nn.Module):
    """Inception dw mixer -> BN -> 1x1 conv MLP with GELU -> layer scale, plus the input."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.token_mixer = InceptionDWConv2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, mlp_ratio * dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(mlp_ratio * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.norm(self.token_mixer(x)))))
        return x + out * self.gamma.reshape(1, -1, 1, 1)

    def reparameterized(self) -> nn.Module:
        # The norm follows the merged dw conv directly, and layer scale the last conv.
        kernel = fuse_conv_bn(*self.token_mixer.fused(), self.norm)
        dwconv = conv2d_from(kernel, 1, self.token_mixer.band // 2, self.gamma.numel())
        scale = self.gamma
        fc2 = conv2d_from((self.fc2.weight * scale.reshape(-1, 1, 1, 1), self.fc2.bias * scale))
        return Residual(nn.Sequential(dwconv, self.fc1, self.act, fc2))


class NormDownsample(nn.Module):
    """BN -> 2x2/2 conv; unpadded, so the norm folds into the conv exactly."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))

    def reparameterized(self) -> nn.Conv2d:
        return conv2d_from(fuse_bn_conv(self.conv.weight, self.conv.bias, self.norm), 2)


class InceptionNeXt(nn.Module):
    """4x4/4 conv-BN stem, stages of MetaNeXt blocks with BN + 2x2/2 conv downsampling, head."""

    def __init__(
        self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBN(3, dims[0], 4, 4)]
        for index, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if index > 0:
                layers.append(NormDownsample(dims[index - 1], dim))
            layers += [MetaNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("inceptionnext_atto_like", input_shape=(3, 64, 64), deploy=reparameterize)
def inceptionnext_atto_like() -> nn.Module:
    """InceptionNeXt blocks (id / dw 3x3 / dw 1x11 / dw 11x1 on 5/8, 1/8, 1/8, 1/8 of channels)."""
    return InceptionNeXt(dims=(32, 64), depths=(2, 2))
