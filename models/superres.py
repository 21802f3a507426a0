"""Image restoration models: ESPCN super-resolution and DnCNN denoising."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class ESPCN(nn.Module):
    """Feature convs on the low-resolution image, then a sub-pixel conv (Shi et al. 2016)."""

    def __init__(self, channels: int = 1, scale: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 64, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(32, channels * scale**2, 3, padding=1),
            nn.PixelShuffle(scale),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DnCNN(nn.Module):
    """Residual denoiser: predicts the noise and subtracts it (Zhang et al. 2017)."""

    def __init__(self, channels: int = 1, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


@register_model("espcn", input_shape=(1, 32, 32))
def espcn() -> nn.Module:
    """ESPCN, 3x super-resolution of a one-channel image (no batch norm)."""
    return ESPCN(channels=1, scale=3)


@register_model("dncnn", input_shape=(1, 40, 40))
def dncnn() -> nn.Module:
    """DnCNN of depth 8 and width 32 with conv-BN-ReLU layers, one-channel input."""
    return DnCNN(channels=1, depth=8, width=32)
