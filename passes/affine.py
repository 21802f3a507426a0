"""Pure tensor math for folding per-channel affine maps into conv and linear weights.

No graph in sight: these are functions of tensors, tested on their own.
"""

from __future__ import annotations

import torch


def bn_scale_shift(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval batch norm as `y = x * scale + shift` per channel."""
    scale = torch.rsqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def scale_output_channels(
    weight: torch.Tensor, scale: torch.Tensor, transposed: bool = False, groups: int = 1
) -> torch.Tensor:
    """Multiply each output channel's filter by `scale[channel]`.

    A conv or linear weight holds output channels on dim 0. A transposed conv's weight is
    (in, out / groups, *kernel): output channel `g * out_per_group + j` lives in column `j` of
    group `g`'s block of rows.
    """
    if not transposed:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return (weight.double() * scale.double().reshape(shape)).to(weight.dtype)
    in_channels, out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    blocks = weight.double().reshape(groups, in_channels // groups, out_per_group, *kernel)
    factors = scale.double().reshape(groups, 1, out_per_group, *(1,) * len(kernel))
    return (blocks * factors).reshape(weight.shape).to(weight.dtype)


def affine_bias(
    bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The bias of `(x + bias) * scale + shift`."""
    base = bias.double() if bias is not None else torch.zeros_like(shift, dtype=torch.float64)
    return (base * scale.double() + shift.double()).to(dtype)
