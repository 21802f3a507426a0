"""ATen op groups and readers for their arguments, shared by the passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph import arg, constant, is_op, val

aten = torch.ops.aten

CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
TRANSPOSED_CONVS = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
ANY_CONV = (*CONVS, *TRANSPOSED_CONVS, aten.convolution)
BATCH_NORM = (aten.batch_norm,)


@dataclass(frozen=True)
class Conv:
    """A convolution call's arguments, with `transposed` and the weight's channel layout."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    output_padding: tuple[int, ...]


def conv(node: fx.Node) -> Conv | None:
    """Read a conv/conv_transpose/convolution call; None for anything else."""
    if not is_op(node, *ANY_CONV):
        return None
    weight = val(node.args[1])
    dims = weight.dim() - 2 if weight is not None else 2  # the input may be unbatched
    ones, zeros = (1,) * dims, (0,) * dims

    def ints(value, default):
        value = default if value is None else value
        return value if isinstance(value, str) else tuple(value) * (dims if len(value) == 1 else 1)

    if is_op(node, aten.convolution):
        transposed = bool(node.args[6])
        return Conv(
            node,
            node.args[1],
            node.args[2],
            ints(node.args[3], ones),
            ints(node.args[4], zeros),
            ints(node.args[5], ones),
            node.args[8],
            transposed,
            ints(node.args[7], zeros),
        )
    transposed = is_op(node, *TRANSPOSED_CONVS)
    # conv_transpose puts output_padding at 5 and dilation last; conv puts dilation at 5
    return Conv(
        node,
        node.args[1],
        arg(node, 2, "bias"),
        ints(arg(node, 3, "stride"), ones),
        ints(arg(node, 4, "padding"), zeros),
        ints(arg(node, 7 if transposed else 5, "dilation"), ones),
        arg(node, 6, "groups", 1),
        transposed,
        ints(arg(node, 5, "output_padding"), zeros) if transposed else zeros,
    )


@dataclass(frozen=True)
class BatchNorm:
    """An eval batch norm's constants; `weight` and `bias` are None when it is not affine."""

    node: fx.Node
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def batch_norm(gm: fx.GraphModule, node: fx.Node) -> BatchNorm | None:
    """Read an eval-mode batch norm with constant statistics; None when it normalizes with
    batch statistics (training mode, or no running statistics) or reads non-constants."""
    if not is_op(node, *BATCH_NORM) or arg(node, 5, "training", False):
        return None
    weight_node, bias_node = arg(node, 1, "weight"), arg(node, 2, "bias")
    mean = constant(gm, arg(node, 3, "running_mean"))
    var = constant(gm, arg(node, 4, "running_var"))
    weight, bias = constant(gm, weight_node), constant(gm, bias_node)
    if mean is None or var is None:
        return None
    if (weight_node is not None and weight is None) or (bias_node is not None and bias is None):
        return None
    return BatchNorm(node, mean, var, weight, bias, float(arg(node, 7, "eps", 1e-5)))


def replaced_args(node: fx.Node, **values) -> tuple[tuple, dict]:
    """`node`'s args and kwargs with `weight` and/or `bias` (positions 1 and 2) replaced."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        index = {"weight": 1, "bias": 2}[name]
        if index < len(args):
            args[index] = value
        elif index == len(args) and name not in kwargs:
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs
