"""fold_linear_bn: linear -> batch_norm, or batch_norm -> linear  =>  one linear.

Exact: yes; eval-mode batch norm is a per-channel affine map, `y = x * s + t` with
s = gamma / sqrt(var + eps) and t = beta - mean * s. After a linear it scales the weight's rows
and turns the bias into b * s + t; before one, linear(x * s + t) = x @ (W * s)^T + (W @ t + b),
so it scales the weight's columns. Layout ops between the two (transpose, permute, flatten,
view, mean or adaptive average pooling over other axes: SLAB's
`bn(x.transpose(1, 2)).transpose(1, 2)`, LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`, a
pooled head) are followed, since a per-channel map commutes with them, as long as the norm's
channel axis (dim 1) is the linear's feature axis (its last) throughout.
Declines when: the norm uses batch statistics (training mode or no running statistics), a value
between the two ops has another user, the linear's weight or bias is not a constant or is shared
with another op, a layout op mixes the channel axis with others, or the channel counts differ.
Reference: Ioffe & Szegedy 2015; SLAB (Guo et al. 2024) folds BN into the linear layers of a ViT.
"""

import torch
from torch import fx

from fxopt.graph import add_constant, arg, call, constant, erase_dead, is_op, owns_weights, val
from fxopt.layout import axis_through, chain_back
from fxopt.ops import BATCH_NORM, batch_norm, replaced_args
from fxopt.registry import register_pass
from fxopt.rewrite import Match, PassResult, Rule, rewrite

from .affine import (
    affine_bias,
    bn_scale_shift,
    input_shift_bias,
    scale_input_channels,
    scale_output_channels,
)

LINEAR = (torch.ops.aten.linear,)


def linear_then_norm(node: fx.Node) -> list[fx.Node] | None:
    """[linear, layout ops..., bn] ending at a batch norm."""
    return chain_back(node, LINEAR) if is_op(node, *BATCH_NORM) else None


def norm_then_linear(node: fx.Node) -> list[fx.Node] | None:
    """[bn, layout ops..., linear] ending at a linear."""
    return chain_back(node, BATCH_NORM) if is_op(node, *LINEAR) else None


def can_fold_after(match: Match) -> bool:
    """linear -> bn: the norm normalizes the linear's output features, its only use."""
    gm, linear, norm = match.gm, match[0], match.root
    bn, out, normed = batch_norm(gm, norm), val(linear), val(norm)
    if bn is None or out is None or normed is None or normed.dim() < 2:
        return False
    if not owns_linear(gm, linear) or axis_through(match.nodes, out.dim() - 1) != 1:
        return False
    return bn.mean.numel() == _weight(gm, linear).shape[0]


def can_fold_before(match: Match) -> bool:
    """bn -> linear: the norm's output feeds only the linear, over its input features."""
    gm, norm, linear = match.gm, match[0], match.root
    bn, x, features = batch_norm(gm, norm), val(norm), val(linear.args[0])
    if bn is None or x is None or features is None or x.dim() < 2:
        return False
    if not owns_linear(gm, linear) or axis_through(match.nodes, 1) != features.dim() - 1:
        return False
    return bn.mean.numel() == _weight(gm, linear).shape[1]


def owns_linear(gm: fx.GraphModule, linear: fx.Node) -> bool:
    return owns_weights(gm, arg(linear, 1, "weight"), arg(linear, 2, "bias"))


def fold_after(match: Match) -> fx.Node:
    """The folded linear goes where the old one was; the layout ops now read it."""
    gm, linear = match.gm, match[0]
    bn = batch_norm(gm, match.root)
    weight, bias = _weight(gm, linear), _bias(gm, linear)
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    with gm.graph.inserting_before(linear.next):
        args, kwargs = _with_weights(
            gm,
            linear,
            scale_output_channels(weight, scale),
            affine_bias(bias, scale, shift, weight.dtype),
        )
        folded = call(gm, linear.target, args, kwargs)
    linear.replace_all_uses_with(folded)
    erase_dead(gm, linear)
    return match[-2] if len(match.nodes) > 2 else folded


def fold_before(match: Match) -> fx.Node:
    """The layout ops read the norm's input; the linear takes the norm's map."""
    gm, norm, linear = match.gm, match[0], match.root
    bn = batch_norm(gm, norm)
    weight, bias = _weight(gm, linear), _bias(gm, linear)
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    args, kwargs = _with_weights(
        gm, linear, scale_input_channels(weight, scale), input_shift_bias(weight, bias, shift)
    )
    norm.replace_all_uses_with(arg(norm, 0, "input"))
    erase_dead(gm, norm)
    return call(gm, linear.target, (linear.args[0], *args[1:]), kwargs)


def _weight(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor:
    return constant(gm, arg(linear, 1, "weight"))


def _bias(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor | None:
    bias = arg(linear, 2, "bias")
    return constant(gm, bias) if bias is not None else None


def _with_weights(
    gm: fx.GraphModule, linear: fx.Node, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[tuple, dict]:
    name = arg(linear, 1, "weight").target
    return replaced_args(
        linear,
        weight=add_constant(gm, weight, f"{name}_bn"),
        bias=add_constant(gm, bias, f"{name}_bn_bias"),
    )


RULES = [
    # linear -> (layout ops) -> bn  =>  linear' (rows scaled, bias b * s + t)
    Rule("linear-bn", pattern=linear_then_norm, check=can_fold_after, build=fold_after),
    # bn -> (layout ops) -> linear  =>  linear' (columns scaled, bias b + W @ t)
    Rule("bn-linear", pattern=norm_then_linear, check=can_fold_before, build=fold_before),
]


@register_pass("fold_linear_bn", exact=True)
def fold_linear_bn(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
