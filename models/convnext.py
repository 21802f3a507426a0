"""ConvNeXt at atto-like size (Liu et al. 2022), with layer scale."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .registry import register_model


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor, written out as in the ConvNeXt code.

    It computes its statistics at run time, so it must never be folded into a conv.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """dw 7x7 conv, channels-last LayerNorm, pw 4x MLP with GELU, layer scale, residual."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        # Layer scale as a plain multiply, the form a per-channel scale fold has to find.
        out = out * self.gamma
        return x + out.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem, stages of ConvNeXt blocks with LN + 2x2/2 conv downsampling, head."""

    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, stride=4), LayerNorm2d(dims[0]))]
        )
        for previous, dim in itertools.pairwise(dims):
            self.downsample.append(
                nn.Sequential(LayerNorm2d(previous), nn.Conv2d(previous, dim, 2, stride=2))
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))
            for depth, dim in zip(depths, dims, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample, self.stages, strict=True):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((2, 3))))


@register_model("convnext_atto_like", input_shape=(3, 64, 64))
def convnext_atto_like() -> nn.Module:
    """ConvNeXt with depths (2, 2, 2, 2) and dims 16-128, layer scale, 10 classes."""
    return ConvNeXt(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128))
