"""fold_linear_bn: linear -> batch_norm, or batch_norm -> linear  =>  one linear.

Exact: yes; eval-mode batch norm is a per-channel affine map, `y = x * s + t` with
s = gamma / sqrt(var + eps) and t = beta - mean * s. After a linear it scales the weight's rows
and turns the bias into b * s + t; before one, linear(x * s + t) = x @ (W * s)^T + (W @ t + b),
so it scales the weight's columns. Both hold only on 2-D (N, C) activations, where the norm's
channel dim is the linear's feature dim: BatchNorm1d on a 3-D (N, C, L) tensor normalizes dim 1,
while a linear acts on the last dim.
Declines when: the norm uses batch statistics (training mode or no running statistics), the value
between the two ops has another user, the linear's weight or bias is not a constant or is shared
with another op, the activation is not 2-D, or the channel counts differ.
Reference: Ioffe & Szegedy 2015; SLAB (Guo et al. 2024) folds BN into the linear layers of a ViT.
"""

import torch
from torch import fx

from fxopt.graph import add_constant, arg, call, constant, constant_users, val
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


def can_fold_after(match: Match) -> bool:
    """linear -> bn: the norm normalizes the linear's output features, its only use."""
    gm, linear, norm = match.gm, match[0], match.root
    bn, out = batch_norm(gm, norm), val(linear)
    if bn is None or len(linear.users) != 1 or not can_rewrite_linear(gm, linear):
        return False
    return out is not None and out.dim() == 2 and bn.mean.numel() == _weight(gm, linear).shape[0]


def can_fold_before(match: Match) -> bool:
    """bn -> linear: the norm's output feeds only the linear, over its input features."""
    gm, norm, linear = match.gm, match[0], match.root
    bn, x = batch_norm(gm, norm), val(norm)
    if bn is None or len(norm.users) != 1 or not can_rewrite_linear(gm, linear):
        return False
    return x is not None and x.dim() == 2 and bn.mean.numel() == _weight(gm, linear).shape[1]


def can_rewrite_linear(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """The linear's weight and bias are floating constants that no other op reads."""
    weight, bias = arg(linear, 1, "weight"), arg(linear, 2, "bias")
    tensor = constant(gm, weight)
    if tensor is None or not tensor.is_floating_point() or tensor.dim() != 2:
        return False
    if constant_users(gm, weight) != 1:
        return False
    return bias is None or (constant(gm, bias) is not None and constant_users(gm, bias) == 1)


def fold_after(match: Match) -> fx.Node:
    gm, linear = match.gm, match[0]
    bn = batch_norm(gm, match.root)
    weight, bias = _weight(gm, linear), _bias(gm, linear)
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    args, kwargs = _with_weights(
        gm,
        linear,
        scale_output_channels(weight, scale),
        affine_bias(bias, scale, shift, weight.dtype),
    )
    return call(gm, linear.target, args, kwargs)


def fold_before(match: Match) -> fx.Node:
    gm, norm, linear = match.gm, match[0], match.root
    bn = batch_norm(gm, norm)
    weight, bias = _weight(gm, linear), _bias(gm, linear)
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    args, kwargs = _with_weights(
        gm, linear, scale_input_channels(weight, scale), input_shift_bias(weight, bias, shift)
    )
    return call(gm, linear.target, (arg(norm, 0, "input"), *args[1:]), kwargs)


def _weight(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor:
    return constant(gm, arg(linear, 1, "weight"))


def _bias(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor | None:
    bias = arg(linear, 2, "bias")
    return constant(gm, bias) if bias is not None else None


def _with_weights(gm, linear: fx.Node, weight: torch.Tensor, bias: torch.Tensor):
    name = arg(linear, 1, "weight").target
    return replaced_args(
        linear,
        weight=add_constant(gm, weight, f"{name}_bn"),
        bias=add_constant(gm, bias, f"{name}_bn_bias"),
    )


RULES = [
    # linear -> bn  =>  linear' (rows scaled, bias b * s + t)
    Rule("linear-bn", pattern=(LINEAR, BATCH_NORM), check=can_fold_after, build=fold_after),
    # bn -> linear  =>  linear' (columns scaled, bias b + W @ t)
    Rule("bn-linear", pattern=(BATCH_NORM, LINEAR), check=can_fold_before, build=fold_before),
]


@register_pass("fold_linear_bn", exact=True)
def fold_linear_bn(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
