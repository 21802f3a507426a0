"""Pure tensor math for merging linear maps applied one after another, or summed.

No graph in sight: these are functions of tensors, tested on their own. Everything is computed
in float64; callers cast the result to the weight's dtype. A bias of None means zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Bias = torch.Tensor | None
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dense_conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in / groups, *kernel) as the equal groups=1 weight
    (out, in, *kernel): block diagonal, zero where an output channel does not read."""
    out_channels, in_per_group = weight.shape[:2]
    dense = weight.new_zeros(out_channels, in_per_group * groups, *weight.shape[2:])
    out_per_group = out_channels // groups
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = weight[rows]
    return dense


def grouped_conv_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The diagonal blocks of a dense (out, in, *kernel) weight, as a `groups` conv weight."""
    out_per_group, in_per_group = dense.shape[0] // groups, dense.shape[1] // groups
    blocks = [
        dense[
            g * out_per_group : (g + 1) * out_per_group, g * in_per_group : (g + 1) * in_per_group
        ]
        for g in range(groups)
    ]
    return torch.cat(blocks)


def pointwise_after(
    weight: torch.Tensor,
    bias: Bias,
    groups: int,
    pointwise: torch.Tensor,
    pointwise_bias: Bias,
    pointwise_groups: int,
) -> tuple[torch.Tensor, Bias, int]:
    """conv then a 1x1 conv as one conv with the first conv's geometry:
    W'[o] = sum_m P[o, m] W[m] and b' = P b + b_p. Returns (weight, bias, groups); the groups are
    gcd(groups, pointwise_groups), the finest split both convs respect."""
    mixed = dense_conv_weight(pointwise.double(), pointwise_groups).flatten(1)
    merged = torch.einsum("om,mc...->oc...", mixed, dense_conv_weight(weight.double(), groups))
    new_bias = _sum_biases(mixed @ bias.double() if bias is not None else None, pointwise_bias)
    common = math.gcd(groups, pointwise_groups)
    return grouped_conv_weight(merged, common), new_bias, common


def pointwise_before(
    pointwise: torch.Tensor,
    pointwise_bias: Bias,
    pointwise_groups: int,
    weight: torch.Tensor,
    bias: Bias,
    groups: int,
) -> tuple[torch.Tensor, Bias, int]:
    """A 1x1 conv then a conv as one conv with the second conv's geometry:
    W'[o, c] = sum_m W[o, m] P[m, c] and b' = b + sum over m and taps of W[o, m] b_p[m].

    The bias is only exact when the second conv reads no padded zero: at a padded tap the
    original sees 0 where the merged conv assumes b_p.
    """
    mixed = dense_conv_weight(pointwise.double(), pointwise_groups).flatten(1)
    dense = dense_conv_weight(weight.double(), groups)
    merged = torch.einsum("om...,mc->oc...", dense, mixed)
    carried = None
    if pointwise_bias is not None:
        carried = torch.einsum("om...,m->o", dense, pointwise_bias.double())
    common = math.gcd(groups, pointwise_groups)
    return grouped_conv_weight(merged, common), _sum_biases(carried, bias), common


def compose_linears(
    inner: torch.Tensor, inner_bias: Bias, outer: torch.Tensor, outer_bias: Bias
) -> tuple[torch.Tensor, Bias]:
    """outer(inner(x)) as one linear: W = W_o W_i, b = W_o b_i + b_o."""
    outer = outer.double()
    carried = outer @ inner_bias.double() if inner_bias is not None else None
    return outer @ inner.double(), _sum_biases(carried, outer_bias)


def add_linears(
    first: torch.Tensor, first_bias: Bias, second: torch.Tensor, second_bias: Bias, alpha=1.0
) -> tuple[torch.Tensor, Bias]:
    """first(x) + alpha * second(x) as one linear."""
    scaled = second_bias.double() * alpha if second_bias is not None else None
    return first.double() + alpha * second.double(), _sum_biases(first_bias, scaled)


def conv_as_matrix(
    weight: torch.Tensor,
    spatial: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
    blocks: int = 1,
) -> torch.Tensor:
    """A conv on a fixed input size as the matrix of the linear map between flattened samples.

    Returns (blocks, out_features / blocks, in_features / blocks): block j maps input channels
    [j C / blocks, (j + 1) C / blocks) to the matching output channels, as the weight of a
    `blocks`-group fully connected layer; features are flattened (channel, *positions) in
    row-major order. `blocks` must divide `groups` (the conv never mixes two blocks).
    Built from a 0/1 tap selection S[q, t, p] (input position q feeds output position p
    through tap t): M[o, p, c, q] = sum_t W[o, c, t] S[q, t, p]; cheaper than pushing the
    identity of all C * H * W input features through the conv.
    """
    out_channels, in_per_group, *kernel = weight.shape
    select = _tap_selection(spatial, tuple(kernel), stride, padding, dilation)
    positions_in, taps, positions_out = select.shape
    per_group = weight.double().reshape(groups, out_channels // groups, in_per_group, taps)
    maps = torch.einsum("goct,qtp->gopcq", per_group, select)
    inner = groups // blocks  # conv groups inside one block: its matrix is block diagonal
    maps = maps.reshape(blocks, inner, out_channels // groups, positions_out, in_per_group, -1)
    result = maps.new_zeros(
        blocks, inner, out_channels // groups, positions_out, inner, in_per_group, positions_in
    )
    for i in range(inner):
        result[:, i, :, :, i] = maps[:, i]
    out_features = out_channels * positions_out // blocks
    return result.reshape(blocks, out_features, -1)


def conv_bias_as_vector(bias: torch.Tensor, positions: int) -> torch.Tensor:
    """A conv bias as the bias of the flattened output: each channel's value at every position."""
    return bias.double().repeat_interleave(positions)


def _tap_selection(spatial, kernel, stride, padding, dilation) -> torch.Tensor:
    dims = len(spatial)
    positions = math.prod(spatial)
    taps = math.prod(kernel)
    images = torch.eye(positions, dtype=torch.float64).reshape(positions, 1, *spatial)
    deltas = torch.eye(taps, dtype=torch.float64).reshape(taps, 1, *kernel)
    padding = padding if isinstance(padding, str) else list(padding)
    selected = CONV_FNS[dims](
        images, deltas, stride=list(stride), padding=padding, dilation=list(dilation)
    )
    return selected.reshape(positions, taps, -1)


def _sum_biases(first: Bias, second: Bias) -> Bias:
    if first is None:
        return None if second is None else second.double()
    return first.double() if second is None else first.double() + second.double()
