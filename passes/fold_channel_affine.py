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
from fxopt.rules.rewrite import Match, PassResult, Rule, rewrite

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
    """The conv or linear owns constant floating-point weights and its output feeds one op."""
    if found is None or len(producer.users) != 1:
        return False
    weight, bias = constant(gm, found.weight), found.bias
    if weight is None or not weight.is_floating_point():
        return False
    if val(producer).shape[found.axis] != found.channels:
        return False
    return is_private_constant(gm, found.weight) and (bias is None or is_private_constant(gm, bias))


def can_fold(match: Match) -> bool:
    gm, producer, node = match.gm, match[0], match.root
    found, value = layer(producer), operand(match)[0]
    if not can_absorb(gm, producer, found) or val(producer).dtype != getattr(
        val(node), "dtype", None
    ):
        return False
    if value is None or value.is_complex() or not torch.isfinite(value).all():
        return False
    if is_op(node, aten.div) and (value == 0).any():
        return False
    if per_channel(value, val(producer).dim(), found.axis, found.channels) is None:
        return False
    touched = {found.weight, found.bias, *node.all_input_nodes}
    return isinstance(arg(node, 2, "alpha", 1), int | float) and not touched & mutated_nodes(gm)


def fold(match: Match) -> fx.Node:
    gm, producer, node = match.gm, match[0], match.root
    found = layer(producer)
    weight, bias = constant(gm, found.weight), constant(gm, found.bias)
    value, first = operand(match)
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
