"""MobileNetV2 inverted residual blocks at reduced width (Sandler et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2.
_SMALL_SETTINGS = (
    (1, 8, 1, 1),
    (6, 16, 2, 2),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 48, 1, 1),
)


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """pw expand + BN + ReLU6, dw 3x3 + BN + ReLU6, pw project + BN (linear bottleneck)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = [] if expansion == 1 else [_conv_bn_act(in_channels, hidden, 1)]
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.layers = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv3x3/2, inverted residual stages, 1x1 conv head, pool, classifier."""

    def __init__(
        self,
        settings: tuple[tuple[int, int, int, int], ...],
        stem_channels: int = 16,
        head_channels: int = 128,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers = [_conv_bn_act(3, stem_channels, 3, stride=2)]
        channels = stem_channels
        for expansion, width, repeats, first_stride in settings:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(channels, width, stride, expansion))
                channels = width
        layers.append(_conv_bn_act(channels, head_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenetv2_like", input_shape=(3, 64, 64))
def mobilenetv2_like() -> nn.Module:
    """MobileNetV2 with 8 inverted residual blocks at widths 8-48, 10 classes."""
    return MobileNetV2(_SMALL_SETTINGS)
