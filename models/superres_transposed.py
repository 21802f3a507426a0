"""Models whose upsampler or token mixer has a second, exact form that fxopt may pick instead.

FSRCNN upsamples with a stride-r transposed conv, which is a conv followed by pixel_shuffle(r)
(swap_subpixel_conv). The masked InceptionNeXt block is InceptionNeXt's deploy form, one 11x11
depthwise conv whose kernel is zero outside each channel group's support, on maps large enough
for the split form to be faster (split_channel_kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class FSRCNN(nn.Module):
    """Feature extraction 5x5, shrink 1x1, m mapping 3x3 layers, expand 1x1, then a 9x9
    transposed conv of stride `scale` (Dong et al. 2016), PReLU after every conv but the last."""

    def __init__(self, channels=1, scale=2, features=56, shrink=12, mapping=4) -> None:
        super().__init__()
        layers = [nn.Conv2d(channels, features, 5, padding=2), nn.PReLU(features)]
        layers += [nn.Conv2d(features, shrink, 1), nn.PReLU(shrink)]
        for _ in range(mapping):
            layers += [nn.Conv2d(shrink, shrink, 3, padding=1), nn.PReLU(shrink)]
        layers += [nn.Conv2d(shrink, features, 1), nn.PReLU(features)]
        self.body = nn.Sequential(*layers)
        # output = scale * H = (H - 1) * scale - 2 * padding + 9 + output_padding
        padding = (10 - scale) // 2
        output_padding = 2 * padding - 9 + scale
        self.upsample = nn.ConvTranspose2d(
            features, channels, 9, scale, padding, output_padding=output_padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.body(x))


def support_masks(channels: int, square: int, band: int, ratio: float) -> tuple:
    """(mask, delta, bias mask) of an InceptionNeXt kernel merged to band x band: identity on the
    first channels, then a square, a 1 x band and a band x 1 group."""
    group, centre = int(channels * ratio), band // 2
    identity = channels - 3 * group
    mask = torch.zeros(channels, 1, band, band)
    low, high = centre - square // 2, centre + square // 2 + 1
    mask[identity : identity + group, :, low:high, low:high] = 1
    mask[identity + group : identity + 2 * group, :, centre, :] = 1
    mask[identity + 2 * group :, :, :, centre] = 1
    delta = torch.zeros_like(mask)
    delta[:identity, :, centre, centre] = 1
    bias_mask = torch.ones(channels)
    bias_mask[:identity] = 0
    return mask, delta, bias_mask


class MaskedInceptionMixer(nn.Module):
    """InceptionNeXt's token mixer in deploy form: one depthwise band x band conv whose kernel is
    `weight * mask + delta`, so its supports survive re-drawn weights."""

    def __init__(self, channels: int, square: int = 3, band: int = 11, ratio: float = 0.125):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, band, band) / band)
        self.bias = nn.Parameter(torch.zeros(channels))
        mask, delta, bias_mask = support_masks(channels, square, band, ratio)
        self.register_buffer("mask", mask)
        self.register_buffer("delta", delta)
        self.register_buffer("bias_mask", bias_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight * self.mask + self.delta
        padding = self.weight.shape[-1] // 2
        return F.conv2d(x, kernel, self.bias * self.bias_mask, 1, padding, 1, x.shape[1])


class MaskedInceptionNet(nn.Module):
    """3x3 stem, one MetaNeXt-style block (merged mixer -> BN -> 1x1 MLP, residual), head."""

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.mixer = MaskedInceptionMixer(channels)
        self.mlp = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, 2 * channels, 1),
            nn.GELU(),
            nn.Conv2d(2 * channels, channels, 1),
        )
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mlp(self.mixer(x))
        return self.head(x.mean((2, 3)))


@register_model("fsrcnn_like", input_shape=(1, 24, 24))
def fsrcnn_like() -> nn.Module:
    """FSRCNN(56, 12, 4), 2x super-resolution through a 9x9 stride-2 transposed conv."""
    return FSRCNN(channels=1, scale=2)


@register_model("fsrcnn_x3_like", input_shape=(1, 16, 16))
def fsrcnn_x3_like() -> nn.Module:
    """FSRCNN(32, 8, 2), 3x super-resolution through a 9x9 stride-3 transposed conv."""
    return FSRCNN(channels=1, scale=3, features=32, shrink=8, mapping=2)


@register_model("inceptionnext_merged_large_map", input_shape=(3, 64, 64))
def inceptionnext_merged_large_map() -> nn.Module:
    """One InceptionNeXt block in deploy form (merged 11x11 depthwise kernel) on 64x64 maps."""
    return MaskedInceptionNet(channels=32)
