"""Pure tensor math for merging parallel conv branches into one kernel (RepVGG, arXiv:2101.03697).

A kernel is laid out as a conv weight, (out, in / groups, *spatial). No graph in sight: these are
functions of tensors, tested on their own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def _grid(step: Sequence[int]) -> tuple:
    """An index selecting every `step`-th tap of each spatial dim."""
    return (..., *(slice(None, None, s) for s in step))


def dilate(kernel: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """A kernel at `dilation` as the dense kernel of size d * (k - 1) + 1 that has zeros between
    its taps: conv at dilation d with `kernel` == conv at dilation 1 with the result."""
    spatial = kernel.shape[2:]
    size = [d * (k - 1) + 1 for k, d in zip(spatial, dilation, strict=True)]
    dense = kernel.new_zeros(*kernel.shape[:2], *size)
    dense[_grid(dilation)] = kernel
    return dense


def undilate(kernel: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """The inverse of `dilate`: every `dilation`-th tap. Exact only when the others are zero."""
    return kernel[_grid(dilation)].contiguous()


def pad_centred(kernel: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial dims to `size`, keeping the kernel centred (equal zeros either side).

    Raises ValueError when a dim would shrink or cannot be centred (odd difference).
    """
    padded = kernel.new_zeros(*kernel.shape[:2], *size)
    padded[centre(kernel.shape[2:], size)] = kernel
    return padded


def centre(spatial: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """The index of a `spatial` kernel centred in `size` (see `pad_centred`)."""
    extra = [s - k for k, s in zip(spatial, size, strict=True)]
    if any(e < 0 or e % 2 for e in extra):
        raise ValueError(f"cannot centre a {tuple(spatial)} kernel in {tuple(size)}")
    return (..., *(slice(e // 2, e // 2 + k) for e, k in zip(extra, spatial, strict=True)))


def identity_kernel(
    channels: int, groups: int, dims: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The 1x..x1 kernel of a `groups`-grouped conv that maps its input to itself: output channel
    o reads its own input channel, column o % (channels / groups) of its group."""
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *(1,) * dims, dtype=dtype)
    rows = torch.arange(channels)
    kernel[(rows, rows % per_group, *(0,) * dims)] = 1
    return kernel


def avg_pool_kernel(
    channels: int,
    groups: int,
    kernel_size: Sequence[int],
    divisor: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The kernel of a `groups`-grouped conv equal to an average pool over `kernel_size`.

    Matches the pool with count_include_pad=True (padded zeros count towards the mean, so the
    divisor is the window size everywhere) or with no padding at all; `divisor` is the pool's
    divisor_override. With count_include_pad=False and padding, border windows divide by fewer
    taps and no conv kernel matches.
    """
    divisor = divisor or math.prod(kernel_size)
    delta = identity_kernel(channels, groups, len(kernel_size), dtype)
    return delta.expand(*delta.shape[:2], *kernel_size) / divisor


def merge_kernels(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum parallel (kernel, bias) pairs into one, each zero-padded centred to the largest size.

    The branches must read the same input with the same stride and groups and share a centre
    (padding - (kernel - 1) / 2 equal); dilated kernels go through `dilate` first.
    """
    if not branches:
        raise ValueError("nothing to merge")
    shapes = {tuple(kernel.shape[:2]) for kernel, _ in branches}
    if len(shapes) != 1:
        raise ValueError(f"kernels of different channel layouts {sorted(shapes)} do not add up")
    size = [max(sizes) for sizes in zip(*(kernel.shape[2:] for kernel, _ in branches), strict=True)]
    dtype = functools.reduce(torch.promote_types, (k.dtype for k, _ in branches))
    kernel = branches[0][0].new_zeros(*branches[0][0].shape[:2], *size, dtype=dtype)
    for k, _ in branches:  # added into the centre in place: real kernels are large
        kernel[centre(k.shape[2:], size)] += k
    bias = torch.zeros(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    for _, branch_bias in branches:
        if branch_bias is not None:
            bias = bias + branch_bias
    return kernel, bias
