"""Models with hand-set kernels: a classic image-filter bank and VAN's large-kernel attention.

The filter kernels are buffers, not parameters: `randomize_` redraws every parameter at
`create`, and a redrawn Gaussian would no longer be separable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def gaussian(size: int, sigma: float) -> torch.Tensor:
    """A normalized 1-D Gaussian of `size` taps."""
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    return g / g.sum()


def outer(column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The rank-1 kernel column x row."""
    return column[:, None] * row[None, :]


def atrous(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """`kernel` with dilation - 1 zeros between its taps, written out densely (the a trous
    wavelet transform's filters)."""
    size = [dilation * (k - 1) + 1 for k in kernel.shape]
    dense = kernel.new_zeros(size)
    dense[::dilation, ::dilation] = kernel
    return dense


class FilterBank(nn.Module):
    """Fixed filters side by side on an RGB image, concatenated with it and mixed by learned 1x1
    convs: a colour-mixing 5x5 Gaussian blur (dense, rank 3), a 7x7 Gaussian and a 3x3 box
    filter (depthwise, rank 1), Sobel x and y of the grey image (dense, rank 2), and a B3-spline
    at scale 2 of the a trous transform (depthwise, a 5x5 kernel stored as a dense 9x9)."""

    def __init__(self, channels: int = 3, width: int = 16) -> None:
        super().__init__()
        mix = torch.full((channels, channels), 0.1, dtype=torch.float64) + 0.7 * torch.eye(channels)
        g5, g7 = (
            outer(gaussian(5, 1.0), gaussian(5, 1.0)),
            outer(gaussian(7, 1.5), gaussian(7, 1.5)),
        )
        b3 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
        smooth, diff = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
        sobel = torch.stack([outer(smooth, diff), outer(diff, smooth)]).double() / channels
        kernels = {
            "blur": mix[:, :, None, None] * g5,
            "smooth": g7.expand(channels, 1, 7, 7),
            "box": torch.full((channels, 1, 3, 3), 1 / 9, dtype=torch.float64),
            "sobel": sobel[:, None].expand(2, channels, 3, 3),
            "spline": atrous(outer(b3, b3), 2).expand(channels, 1, 9, 9),
        }
        for name, kernel in kernels.items():
            self.register_buffer(name, kernel.float().contiguous())
        mixed = 4 * channels + 2 + channels
        self.mix = nn.Sequential(
            nn.Conv2d(mixed, width, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        features = [
            x,
            F.conv2d(x, self.blur, padding=2),
            F.conv2d(x, self.smooth, padding=3, groups=c),
            F.conv2d(x, self.box, padding=1, groups=c),
            F.conv2d(x, self.sobel, padding=1),
            F.conv2d(x, self.spline, padding=4, groups=c),
        ]
        return self.mix(torch.cat(features, 1))


class LargeKernelAttention(nn.Module):
    """VAN's LKA: dw 5x5 -> dw 7x7 at dilation 3 -> 1x1, used as a gate on its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv_spatial = nn.Conv2d(channels, channels, 7, padding=9, groups=channels, dilation=3)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class VANAttentionBlock(nn.Module):
    """x + proj2(LKA(GELU(proj1(BN(x))))): the attention half of a VAN block (Guo et al. 2022)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.proj1 = nn.Conv2d(channels, channels, 1)
        self.act = nn.GELU()
        self.lka = LargeKernelAttention(channels)
        self.proj2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj2(self.lka(self.act(self.proj1(self.norm(x)))))


@register_model("image_filter_net", input_shape=(3, 64, 64))
def image_filter_net() -> nn.Module:
    """Fixed Gaussian, box, Sobel and a trous filters on an RGB image, mixed by learned 1x1s."""
    return FilterBank(channels=3, width=16)


@register_model("van_lka_block", input_shape=(32, 16, 16))
def van_lka_block() -> nn.Module:
    """VAN's attention block: BN, 1x1, GELU, large-kernel attention (dw 5x5, dw 7x7 d3), 1x1."""
    return VANAttentionBlock(channels=32)
