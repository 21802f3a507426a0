"""FastViT (Vasu et al. 2023): RepMixer token mixing and ConvFFN, MobileOne stem.

As in FastViT, the RepMixer's mixer is a MobileOne block without activation (dw k x k conv-BN +
dw 1x1 conv-BN + identity BN) and its norm an identity BN. Left out: attention stages, the
final conv expansion and drop path.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobileone import MobileOneBlock
from .registry import register_model
from .reparam import (
    ConvBN,
    Residual,
    conv2d_from,
    fuse_conv_bn,
    identity_kernel,
    reparameterize,
)
from .replknet import ReparamLargeKernelConv


class RepMixer(nn.Module):
    """``x + gamma * (mixer(x) - norm(x))``; deploys as one dw k x k conv, identity included."""

    def __init__(self, dim: int, kernel: int = 3, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.kernel = kernel
        self.norm = nn.BatchNorm2d(dim)
        self.mixer = MobileOneBlock(dim, dim, kernel, groups=dim, act=nn.Identity())
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma.reshape(1, -1, 1, 1) * (self.mixer(x) - self.norm(x))

    def reparameterized(self) -> nn.Conv2d:
        dim = self.gamma.numel()
        delta = identity_kernel(dim, dim, self.kernel, self.gamma.dtype)
        mixer_weight, mixer_bias = self.mixer.fused()
        norm_weight, norm_bias = fuse_conv_bn(delta, None, self.norm)
        weight = delta + self.gamma.reshape(-1, 1, 1, 1) * (mixer_weight - norm_weight)
        bias = self.gamma * (mixer_bias - norm_bias)
        return conv2d_from((weight, bias), 1, self.kernel // 2, dim)


class ConvFFN(nn.Module):
    """dw 7x7 conv-BN -> 1x1 conv -> GELU -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, 1, 3, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """RepMixer, then ``x + layer_scale * ConvFFN(x)``."""

    def __init__(self, dim: int, mlp_ratio: int = 3, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.ffn = ConvFFN(dim, mlp_ratio * dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale.reshape(1, -1, 1, 1) * self.ffn(x)

    def reparameterized(self) -> nn.Module:
        fc2, scale = self.ffn.fc2, self.layer_scale
        fc2 = conv2d_from((fc2.weight * scale.reshape(-1, 1, 1, 1), fc2.bias * scale))
        ffn = nn.Sequential(self.ffn.conv.reparameterized(), self.ffn.fc1, self.ffn.act, fc2)
        return nn.Sequential(self.token_mixer.reparameterized(), Residual(ffn))


class FastViT(nn.Module):
    """MobileOne stem (4x down), stages of RepMixer blocks, large-kernel patch embeddings, head."""

    def __init__(
        self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10
    ) -> None:
        super().__init__()
        dim = dims[0]
        layers = [
            MobileOneBlock(3, dim, 3, 2, act=nn.GELU()),
            MobileOneBlock(dim, dim, 3, 2, groups=dim, act=nn.GELU()),
            MobileOneBlock(dim, dim, 1, act=nn.GELU()),
        ]
        for index, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if index > 0:
                previous = dims[index - 1]
                layers += [ReparamLargeKernelConv(previous, dim, 7, 3, 2, previous), nn.GELU()]
                layers.append(MobileOneBlock(dim, dim, 1, act=nn.GELU()))
            layers += [RepMixerBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("fastvit_repmixer_net", input_shape=(3, 64, 64), deploy=reparameterize)
def fastvit_repmixer_net() -> nn.Module:
    """FastViT-style net: MobileOne stem, RepMixer + ConvFFN blocks (dims 16, 32; depths 2, 2)."""
    return FastViT(dims=(16, 32), depths=(2, 2))
