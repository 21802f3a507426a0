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
        scaled = weight.detach().to(torch.float64, copy=True)  # a copy even of a float64 weight
        return scaled.mul_(scale.detach().double().reshape(shape)).to(weight.dtype)
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


def scale_input_channels(
    weight: torch.Tensor, scale: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """The weight of `op(x * scale)` for a conv or linear `op`: each input channel's taps are
    multiplied by `scale[channel]`.

    The weight is (out, in / groups, *kernel): output channel `o` of group
    `o // (out / groups)` reads input channel `group * (in / groups) + j` through column `j`.
    """
    factors = _per_input_channel(scale, weight, groups)
    return (weight.double() * factors).to(weight.dtype)


def input_shift_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, shift: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """The bias of `op(x + shift)` for a linear or an unpadded conv `op` with `weight` and
    `bias`: `bias + sum over input columns and kernel taps of weight * shift`.

    Only exact when every tap reads a real input: a zero-padded tap would read 0, not `shift`.
    """
    shifted = weight.double() * _per_input_channel(shift, weight, groups)
    total = shifted.flatten(1).sum(1)
    if bias is not None:
        total = total + bias.double()
    return total.to(weight.dtype)


def _per_input_channel(values: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """`values` (one per input channel) laid out like `weight`'s (out, in / groups) block."""
    out_channels, in_per_group = weight.shape[:2]
    blocks = values.double().reshape(groups, 1, in_per_group)
    blocks = blocks.expand(groups, out_channels // groups, in_per_group)
    return blocks.reshape(out_channels, in_per_group, *(1,) * (weight.dim() - 2))


def per_channel(
    value: torch.Tensor, rank: int, channel_axis: int, channels: int
) -> torch.Tensor | None:
    """`value` as one float64 number per channel, or None unless it broadcasts against a
    rank-`rank` tensor along `channel_axis` only (every other axis of size 1, no new axes)."""
    if value.dim() > rank:
        return None
    shape = (1,) * (rank - value.dim()) + tuple(value.shape)
    if any(size != 1 for axis, size in enumerate(shape) if axis != channel_axis):
        return None
    if shape[channel_axis] not in (1, channels):
        return None
    return value.double().reshape(-1).expand(channels).clone()


def elementwise_affine(
    op: str, operand: torch.Tensor, operand_first: bool = False, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`y <op> operand` (or `operand <op> y`) written as `y * scale + shift`.

    `op` is an ATen name: mul, div (y / operand only), add and sub (with `alpha` scaling the
    second operand), rsub (`operand - alpha * y`).
    """
    operand = operand.double()
    one, zero = torch.ones_like(operand), torch.zeros_like(operand)
    if op == "mul":
        return operand, zero
    if op == "div" and not operand_first:
        return 1 / operand, zero
    if op == "add":
        return (alpha * one, operand) if operand_first else (one, alpha * operand)
    if op == "sub":
        return (-alpha * one, operand) if operand_first else (one, -alpha * operand)
    if op == "rsub" and not operand_first:
        return -alpha * one, operand
    raise ValueError(f"y {op} operand is not an affine map of y")
