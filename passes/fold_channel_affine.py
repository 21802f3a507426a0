"""fold_channel_affine: conv | linear -> * a, / a, + b, - b  =>  conv | linear with a, b folded.

Exact: yes; a constant that varies per output channel only is a per-channel affine map, which a
conv's (any dims, groups, transposed) or linear's output channels absorb into weight rows and
bias (a bias is created when there was none). `x * a + b` chains fold one step at a time.
Declines when: the conv/linear output has another user; the operand is not a constant or a
Python number; it broadcasts over batch or spatial positions, or would enlarge the output; the
result's dtype differs (type promotion); the weight or bias is shared or not a constant; a
value involved is written in place; a divisor contains 0; the operand is not finite.
Reference: layer scale (CaiT, ConvNeXt); UniRepLKNet deploy code.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx

from fxopt.analysis.affine import (
    affine_bias,
    elementwise_affine,
    per_channel,
    scale_output_channels,
)
from fxopt.ir.graph import (
    add_constant,
    arg,
    call,
    constant,
    constant_users,
    is_op,
    mutated_nodes,
    val,
)
from fxopt.ir.ops import ANY_CONV, conv, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten

SCALES = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
SHIFTS = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar)
PRODUCERS = (*ANY_CONV, aten.linear)


def after_producer(ops: tuple) -> Callable[[fx.Node], tuple[fx.Node, fx.Node] | None]:
    """Pattern: one of `ops` whose first operand (either, where the op lets it) is a conv or
    linear; matches (producer, op)."""

    def pattern(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        if not is_op(node, *ops):
            return None
        either = is_op(node, aten.mul, aten.add, aten.sub) and len(node.args) > 1
        for candidate in node.args[:2] if either else node.args[:1]:
            if is_op(candidate, *PRODUCERS):
                return candidate, node
        return None

    return pattern


def operand(match: Match) -> tuple[torch.Tensor | None, bool]:
    """The other operand as a tensor (None if not constant) and whether it comes first."""
    producer, node = match[0], match.root
    first = node.args[0] is not producer
    other = node.args[0] if first else node.args[1] if len(node.args) > 1 else None
    if isinstance(other, int | float) and not isinstance(other, bool):
        return torch.tensor(float(other), dtype=torch.float64), first
    return constant(match.gm, other), first


class Layer(NamedTuple):
    """A conv or linear call: its weight and bias nodes and where its output channels live."""

    weight: fx.Node
    bias: fx.Node | None
    axis: int
    channels: int
    transposed: bool = False
    groups: int = 1


def layer(producer: fx.Node) -> Layer | None:
    out, weight = val(producer), val(producer.args[1])
    if not isinstance(out, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if is_op(producer, aten.linear):
        if weight.dim() != 2:
            return None
        return Layer(producer.args[1], arg(producer, 2, "bias"), out.dim() - 1, weight.shape[0])
    c = conv(producer)
    channels = weight.shape[1] * c.groups if c.transposed else weight.shape[0]
    axis = out.dim() - (weight.dim() - 2) - 1
    return Layer(c.weight, c.bias, axis, channels, c.transposed, c.groups)


def is_private_constant(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    """A constant that no other op reads."""
    return constant(gm, node) is not None and constant_users(gm, node) == 1


def can_absorb(gm: fx.GraphModule, producer: fx.Node, found: Layer | None) -> bool:
    """The conv or linear owns constant floating-point weights and its output feeds one op:
    True, or a `decline` saying which does not hold."""
    if found is None:
        return decline(f"{producer.name} is not a conv or linear on tensors fxopt reads")
    if len(producer.users) != 1:
        return decline(f"the output of {producer.name} has another user")
    weight, bias = constant(gm, found.weight), found.bias
    if weight is None or not weight.is_floating_point():
        return decline("the weight is not a floating-point constant")
    if val(producer).shape[found.axis] != found.channels:
        return decline("the output's channel axis does not match the weight")
    if not is_private_constant(gm, found.weight) or not (
        bias is None or is_private_constant(gm, bias)
    ):
        return decline("the weight or bias is shared or not a constant")
    return True


class Fold(NamedTuple):
    """What `can_fold` found: the layer, the other operand and whether it comes first."""

    found: Layer
    value: torch.Tensor
    first: bool


def can_fold(match: Match) -> Fold | Declined:
    gm, producer, node = match.gm, match[0], match.root
    found, (value, first) = layer(producer), operand(match)
    absorbs = can_absorb(gm, producer, found)
    if isinstance(absorbs, Declined):
        return absorbs
    if val(producer).dtype != getattr(val(node), "dtype", None):
        return decline("the result's dtype differs (type promotion)")
    if value is None:
        return decline("the operand is not a constant or a Python number")
    if value.is_complex() or not torch.isfinite(value).all():
        return decline("the operand is complex or not finite")
    if is_op(node, aten.div) and (value == 0).any():
        return decline("the divisor contains 0")
    if per_channel(value, val(producer).dim(), found.axis, found.channels) is None:
        return decline(
            "the operand is not per channel: it broadcasts over batch or spatial positions, "
            "or would enlarge the output"
        )
    if not isinstance(arg(node, 2, "alpha", 1), int | float):
        return decline("alpha is not a number")
    if {found.weight, found.bias, *node.all_input_nodes} & mutated_nodes(gm):
        return decline("a value involved is written in place")
    return Fold(found, value, first)


def fold(match: Match) -> fx.Node:
    gm, producer, node = match.gm, match[0], match.root
    found, value, first = match.plan
    weight, bias = constant(gm, found.weight), constant(gm, found.bias)
    vector = per_channel(value.to(weight.device), val(producer).dim(), found.axis, found.channels)
    op = node.target.overloadpacket.__name__
    scale, shift = elementwise_affine(op, vector, first, float(arg(node, 2, "alpha", 1)))
    weight_node = found.weight
    if not (scale == 1).all():
        new_weight = scale_output_channels(weight, scale, found.transposed, found.groups)
        weight_node = add_constant(gm, new_weight, f"{producer.name}_weight")
    new_bias = add_constant(
        gm, affine_bias(bias, scale, shift, weight.dtype), f"{producer.name}_bias"
    )
    args, kwargs = replaced_args(producer, weight=weight_node, bias=new_bias)
    return call(gm, producer.target, args, kwargs)


RULES = [
    # conv | linear -> * a, / a  =>  conv | linear with scaled weight rows and bias
    Rule("channel-scale", pattern=after_producer(SCALES), check=can_fold, build=fold),
    # conv | linear -> + b, - b, b - y  =>  conv | linear with shifted bias (b - y negates rows)
    Rule("channel-shift", pattern=after_producer(SHIFTS), check=can_fold, build=fold),
]


@register_pass("fold_channel_affine", exact=True)
def fold_channel_affine(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
