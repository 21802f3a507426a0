"""Pure math for merging side-by-side branches: kernels, biases, and the price of an op.

No graph in sight: these are functions of tensors, shapes and `Cost` values, tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fxopt.analysis.cost import Cost, conv_flops, linear_flops

from .kernels import identity_kernel, pad_centred


def depthwise_weight(
    parts: Sequence[torch.Tensor | int],
    size: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One depthwise kernel for channel groups laid side by side: a tensor part is a branch's
    dense depthwise kernel (c, 1, *k) with odd k, an int part is that many identity channels."""
    kernels = [
        identity_kernel(part, part, len(size), dtype).to(device) if isinstance(part, int) else part
        for part in parts
    ]
    return torch.cat([pad_centred(kernel, size) for kernel in kernels])


def concat_biases(
    biases: Sequence[torch.Tensor | None], sizes: Sequence[int]
) -> torch.Tensor | None:
    """The bias of branches side by side: each branch's own, zeros where a branch has none;
    None when no branch has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    like = present[0]
    return torch.cat(
        [b if b is not None else like.new_zeros(n) for b, n in zip(biases, sizes, strict=True)]
    )


def conv_cost(
    out_shape: Sequence[int],
    weight_shape: Sequence[int],
    has_bias: bool,
    input_elements: int,
    element_size: int,
) -> Cost:
    """The cost of a conv that does not exist yet, batched or not, from its concrete shapes."""
    batched = len(out_shape) == len(weight_shape)
    batch, spatial = (out_shape[0], out_shape[2:]) if batched else (1, out_shape[1:])
    weights = math.prod(weight_shape) + (weight_shape[0] if has_bias else 0)
    elements = input_elements + math.prod(out_shape) + weights
    return Cost(conv_flops(batch, spatial, weight_shape, has_bias), elements * element_size)


def linear_cost(
    out_shape: Sequence[int], in_features: int, has_bias: bool, element_size: int
) -> Cost:
    """The cost of a linear that does not exist yet, from its concrete output shape."""
    out_features = out_shape[-1]
    rows = math.prod(out_shape[:-1])
    weights = in_features * out_features + (out_features if has_bias else 0)
    elements = rows * in_features + rows * out_features + weights
    flops = linear_flops(rows, in_features, out_features, has_bias)
    return Cost(flops, elements * element_size)
