"""fold_linear_bn: linear -> batch_norm, or batch_norm -> linear  =>  one linear.

Exact: yes; eval-mode batch norm is a per-channel affine map, `y = x * s + t` with
s = gamma / sqrt(var + eps) and t = beta - mean * s. After a linear it scales the weight's rows
and turns the bias into b * s + t; before one, linear(x * s + t) = x @ (W * s)^T + (W @ t + b),
so it scales the weight's columns. Layout ops between the two (transpose, permute, flatten,
view, mean or adaptive average pooling over other axes: SLAB's
`bn(x.transpose(1, 2)).transpose(1, 2)`, LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`, a
pooled head) are followed, since a per-channel map commutes with them, as long as the norm's
channel axis (dim 1) is the linear's feature axis (its last) throughout. A norm whose output
(after the layout ops) feeds several linears, such as EfficientFormerV2's head and distillation
head on one pooled feature, folds into each of them.
Declines when: the norm uses batch statistics (training mode or no running statistics), a value
between the two ops has another user, the linear's weight or bias is not a constant or is shared
with another op, a layout op mixes the channel axis with others, or the channel counts differ.
Reference: Ioffe & Szegedy 2015; SLAB (Guo et al. 2024) folds BN into the linear layers of a ViT.
"""

import torch
from torch import fx

from fxopt.analysis.affine import (
    affine_bias,
    bn_scale_shift,
    input_shift_bias,
    scale_input_channels,
    scale_output_channels,
)
from fxopt.ir.graph import add_constant, arg, call, constant, erase_dead, is_op, owns_weights, val
from fxopt.ir.layout import axis_through, chain_back, follow_axis, value_users
from fxopt.ir.ops import BATCH_NORM, batch_norm, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

LINEAR = (torch.ops.aten.linear,)


def linear_then_norm(node: fx.Node) -> list[fx.Node] | None:
    """[linear, layout ops..., bn] ending at a batch norm."""
    return chain_back(node, LINEAR) if is_op(node, *BATCH_NORM) else None


def norm_then_linear(node: fx.Node) -> list[fx.Node] | None:
    """[bn, layout ops..., linear] ending at a linear."""
    return chain_back(node, BATCH_NORM) if is_op(node, *LINEAR) else None


def can_fold_after(match: Match) -> object:
    """linear -> bn: the norm normalizes the linear's output features, its only use. The plan
    is the norm."""
    gm, linear, norm = match.gm, match[0], match.root
    bn, out, normed = batch_norm(gm, norm), val(linear), val(norm)
    if bn is None:
        return decline(BATCH_STATISTICS)
    if out is None or normed is None or normed.dim() < 2:
        return decline("the norm's input is not a batched tensor")
    if not owns_linear(gm, linear):
        return decline("the linear's weight or bias is not a constant or is shared")
    if axis_through(match.nodes, out.dim() - 1) != 1:
        return decline("a layout op mixes the channel axis with others")
    if bn.mean.numel() != _weight(gm, linear).shape[0]:
        return decline("the channel counts differ")
    return bn


def can_fold_before(match: Match) -> object:
    """bn -> linear: the norm's output feeds only the linear, over its input features. The
    plan is the norm."""
    gm, norm, linear = match.gm, match[0], match.root
    bn, x, features = batch_norm(gm, norm), val(norm), val(linear.args[0])
    if bn is None:
        return decline(BATCH_STATISTICS)
    if x is None or features is None or x.dim() < 2:
        return decline("the norm's input is not a batched tensor")
    if not owns_linear(gm, linear):
        return decline("the linear's weight or bias is not a constant or is shared")
    if axis_through(match.nodes, 1) != features.dim() - 1:
        return decline("a layout op mixes the channel axis with others")
    if bn.mean.numel() != _weight(gm, linear).shape[1]:
        return decline("the channel counts differ")
    return bn


BATCH_STATISTICS = (
    "the norm uses batch statistics (training mode or no running statistics) or "
    "non-constant parameters"
)


def owns_linear(gm: fx.GraphModule, linear: fx.Node) -> bool:
    return owns_weights(gm, arg(linear, 1, "weight"), arg(linear, 2, "bias"))


def fold_after(match: Match) -> fx.Node:
    """The folded linear goes where the old one was; the layout ops now read it."""
    gm, linear, bn = match.gm, match[0], match.plan
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
    gm, norm, linear, bn = match.gm, match[0], match.root, match.plan
    weight, bias = _weight(gm, linear), _bias(gm, linear)
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    args, kwargs = _with_weights(
        gm, linear, scale_input_channels(weight, scale), input_shift_bias(weight, bias, shift)
    )
    norm.replace_all_uses_with(arg(norm, 0, "input"))
    erase_dead(gm, norm)
    return call(gm, linear.target, (linear.args[0], *args[1:]), kwargs)


def norm_then_linears(node: fx.Node) -> list[fx.Node] | None:
    """[bn, layout ops..., node] where `node`'s value is read by two or more linears (a head and
    a distillation head on one pooled feature)."""
    users = value_users(node)
    if len(users) < 2 or not all(is_op(u, *LINEAR) and u.args[0] is node for u in users):
        return None
    return [node] if is_op(node, *BATCH_NORM) else chain_back(node, BATCH_NORM)


def can_fold_before_each(match: Match):
    """bn -> (layout ops) -> several linears: each reads the norm's channels as its features."""
    gm, norm, shared = match.gm, match[0], match.root
    bn, x, features = batch_norm(gm, norm), val(norm), val(shared)
    if bn is None or x is None or features is None or x.dim() < 2:
        return decline("not an eval-mode batch norm with constant statistics and known shapes")
    axis = axis_through(match.nodes, 1)
    if shared is not norm and axis is not None:
        axis = follow_axis(shared, axis)
    if axis != features.dim() - 1:
        return decline("the norm's channels are not the linears' input features")
    for linear in value_users(shared):
        if not owns_linear(gm, linear):
            return decline(f"{linear.name}'s weight or bias is not a constant it alone reads")
        if _weight(gm, linear).shape[1] != bn.mean.numel():
            return decline(f"{linear.name} takes {_weight(gm, linear).shape[1]} features")
    return bn


def fold_before_each(match: Match) -> fx.Node:
    """Each linear takes the norm's map; the layout ops read the norm's input. Returns the
    shared value (the match's root), which stays."""
    gm, norm, shared, bn = match.gm, match[0], match.root, match.plan
    scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
    source = arg(norm, 0, "input")
    for linear in value_users(shared):
        weight, bias = _weight(gm, linear), _bias(gm, linear)
        args, kwargs = _with_weights(
            gm, linear, scale_input_channels(weight, scale), input_shift_bias(weight, bias, shift)
        )
        with gm.graph.inserting_before(linear):
            linear.replace_all_uses_with(call(gm, linear.target, args, kwargs))
        erase_dead(gm, linear)
    if shared is norm:
        return source  # the driver replaces the norm
    norm.replace_all_uses_with(source)
    erase_dead(gm, norm)
    return shared


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
    # bn -> (layout ops) -> linears (head and distillation head)  =>  each linear' as above
    Rule(
        "bn-linears", pattern=norm_then_linears, check=can_fold_before_each, build=fold_before_each
    ),
]


@register_pass("fold_linear_bn", exact=True)
def fold_linear_bn(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
