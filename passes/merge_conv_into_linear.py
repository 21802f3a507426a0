"""merge_conv_into_linear: FC(x) + sum of conv_i(x), reshaped alike  =>  one FC (RepMLP).

Exact: yes; a conv on a fixed input size is a linear map between flattened samples, with matrix
M[(o, p), (c, q)] = sum over taps t of W[o, c, t] [q feeds p through t] and bias b[o] at every
output position p; FC + alpha * conv is then the FC with weight W_fc + alpha M and bias
b_fc + alpha b. The FC is a linear over the last axis, or a 1x1 conv (RepMLP's grouped fc3) over
a (N, C*H*W, 1, 1) input. Reshapes (view, reshape, flatten, squeeze, ...) keep the row-major
order of elements, so when the FC's input and each conv's input are reshapes of one value and the
two outputs are reshaped to one shape before the add, row r of the FC meets sample r of the conv.
Sums of several convs (RepMLP's 1x1, 3x3, ... branches) are taken as a whole.
Declines when: a spatial size is symbolic; the reshapes do not line up (a permute or transpose
between the FC's and a conv's input, differing feature counts); a value in between has another
user or passes a nonlinearity; a conv is transposed or unbatched; a conv mixes channels of two
FC groups; a weight or bias is not a constant or is shared; dtypes differ; an input or weight is
written in place; the add broadcasts; or the FC's matrix has over MAX_WEIGHT_ELEMENTS (2^24)
elements (the conv's matrix is as large). Cost: the merged FC has the FC's shape and groups, so
it costs what the FC alone costs; the static costs are compared all the same.
Reference: RepMLP (Ding et al. 2021); RepMLPNet (Ding et al. 2022).
"""

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import static_cost
from fxopt.analysis.preconditions import (
    ADDS,
    add_of_values,
    add_operands,
    can_skip_padding,
    same_shape,
)
from fxopt.analysis.sequential_math import conv_as_matrix, conv_bias_as_vector
from fxopt.ir.graph import (
    add_constant,
    arg,
    call,
    constant,
    erase_dead,
    is_op,
    owns_weights,
    val,
    written_in_place,
)
from fxopt.ir.layout import RESHAPES
from fxopt.ir.ops import Conv, conv, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
ORDER_KEEPING = (*RESHAPES, aten.contiguous, aten.clone, aten.alias, aten.squeeze, aten.unsqueeze)
MAX_WEIGHT_ELEMENTS = 1 << 24


def keeps_order(node: fx.Node) -> bool:
    """A reshape-like op: the same elements in the same row-major order (not `view(dtype)`)."""
    if not is_op(node, *ORDER_KEEPING) or not isinstance(node.args[0], fx.Node):
        return False
    return val(node) is not None and val(node).dtype == val(node.args[0]).dtype


def back(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The producer behind single-user reshape-like ops, and those ops."""
    chain = []
    while keeps_order(node) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    return node, chain


def origins(node: fx.Node) -> set[fx.Node]:
    """`node` and every value it is a reshape of."""
    found = {node}
    while keeps_order(node):
        node = node.args[0]
        found.add(node)
    return found


@dataclass(frozen=True)
class FullyConnected:
    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    groups: int
    features_in: int
    features_out: int


def fully_connected(gm: fx.GraphModule, node: fx.Node) -> FullyConnected | None:
    """A linear, or a 1x1 conv on a 1x1 input, with constant weights of its own."""
    if is_op(node, aten.linear):
        weight, bias = node.args[1], arg(node, 2, "bias")
        w = constant(gm, weight)
        if w is None or w.dim() != 2 or not owns_weights(gm, weight, bias):
            return None
        return FullyConnected(node, weight, bias, 1, w.shape[1], w.shape[0])
    c, x = conv(node), val(node.args[0]) if node.args else None
    if c is None or c.transposed or not owns_weights(gm, c.weight, c.bias):
        return None
    w = constant(gm, c.weight)
    if x is None or x.dim() != w.dim() or any(size != 1 for size in (*x.shape[2:], *w.shape[2:])):
        return None
    if not can_skip_padding(c, tuple(w.shape[2:])):
        return None
    return FullyConnected(node, c.weight, c.bias, c.groups, w.shape[1] * c.groups, w.shape[0])


def conv_terms(node: fx.Node, scale: float, region: list[fx.Node]) -> list | None:
    """`node` as a sum of (conv, scale) terms, through reshapes and adds whose values only the
    sum reads; the nodes walked are appended to `region`."""
    producer, chain = back(node)
    region += [*chain, producer]
    if len(producer.users) != 1:
        return None
    c = conv(producer)
    if c is not None:
        return [(c, scale)]
    if is_op(producer, *ADDS) and is_zero(producer.args[1]):
        return conv_terms(producer.args[0], scale, region)  # RepMLP's `conv_out = 0; += ...`
    operands = add_operands(producer)
    if operands is None or not same_shape(operands[0], operands[1], producer):
        return None
    left = conv_terms(operands[0], scale, region)
    right = conv_terms(operands[1], scale * operands[2], region)
    return left + right if left is not None and right is not None else None


def is_zero(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def can_absorb(gm: fx.GraphModule, fc: FullyConnected, c: Conv) -> bool:
    """The conv reads the FC's input, reshaped, at a fixed size, and writes its output: True,
    or a `decline` saying which does not hold."""
    x, out = val(c.node.args[0]), val(c.node)
    if c.transposed:
        return decline(f"{c.node.name} is a transposed conv")
    if not owns_weights(gm, c.weight, c.bias) or x is None or out is None:
        return decline(f"{c.node.name}'s weight or bias is not a constant or is shared")
    weight = constant(gm, c.weight)
    if weight.dtype != constant(gm, fc.weight).dtype:
        return decline(f"{c.node.name}'s dtype differs from the FC's")
    if x.dim() != weight.dim():
        return decline(f"{c.node.name} is unbatched")
    if not all(isinstance(size, int) for size in (*x.shape[1:], *out.shape[1:])):
        return decline(f"{c.node.name} has a symbolic spatial size (no fixed matrix)")
    if math.prod(x.shape[1:]) != fc.features_in or math.prod(out.shape[1:]) != fc.features_out:
        return decline(f"{c.node.name}'s feature counts differ from the FC's")
    if c.groups % fc.groups:
        return decline(f"{c.node.name} mixes channels of two FC groups")
    if not origins(c.node.args[0]) & origins(fc.node.args[0]):
        return decline(f"{c.node.name} and the FC read different values (not reshapes of one)")
    return True


@dataclass(frozen=True)
class Plan:
    fc: FullyConnected
    fc_scale: float
    terms: list  # (conv, scale) pairs
    region: list[fx.Node]  # the FC, the convs and the values between them and the add
    fc_side: fx.Node  # the add's FC-side operand; it reads the merged FC afterwards


def plan(gm: fx.GraphModule, root: fx.Node) -> Plan | Declined:
    """The FC side, the conv side and their scales, trying each operand as the FC; or a
    `decline` saying why the last side tried does not fit."""
    operands = add_operands(root)
    if operands is None:
        return decline("not an add of two values")
    if not same_shape(operands[0], operands[1], root):
        return decline("the add broadcasts")
    a, b, alpha = operands
    why = decline("neither operand is a linear or 1x1 conv FC (through reshapes)")
    for (fc_side, fc_scale), (conv_side, conv_scale) in (
        ((a, 1.0), (b, alpha)),
        ((b, alpha), (a, 1.0)),
    ):
        producer, chain = back(fc_side)
        fc = fully_connected(gm, producer)
        if fc is None:
            continue
        if len(producer.users) != 1:
            why = decline(f"the FC {producer.name} has another user")
            continue
        region = [*chain, producer]
        terms = conv_terms(conv_side, conv_scale, region)
        if not terms:
            why = decline(
                f"the operand beside the FC {producer.name} is not a sum of convs (through "
                "reshapes) whose values only the sum reads"
            )
            continue
        verdicts = [can_absorb(gm, fc, c) for c, _ in terms]
        why = next((v for v in verdicts if isinstance(v, Declined)), None)
        if why is None:
            return Plan(fc, fc_scale, terms, region, fc_side)
    return why


def can_merge(match: Match) -> Plan | Declined:
    gm, found = match.gm, plan(match.gm, match.root)
    if isinstance(found, Declined):
        return found
    fc = found.fc
    if fc.features_in * fc.features_out // fc.groups > MAX_WEIGHT_ELEMENTS:
        return decline(f"the FC's matrix has over MAX_WEIGHT_ELEMENTS ({MAX_WEIGHT_ELEMENTS})")
    touched = {
        fc.node.args[0],
        fc.weight,
        *(n for c, _ in found.terms for n in (c.node.args[0], c.weight)),
    }
    if written_in_place(gm, touched):
        return decline("an input or weight is written in place")
    # the merged FC has the FC's shape and groups: it costs what the FC alone costs
    if not static_cost([fc.node]) <= static_cost([*found.region, match.root]):
        return decline("the merged FC would cost more than the FC and convs")
    return found


def merge(match: Match) -> fx.Node:
    gm, found = match.gm, match.plan
    fc = found.fc
    weight = constant(gm, fc.weight)
    blocks = weight.double().reshape(fc.groups, fc.features_out // fc.groups, -1) * found.fc_scale
    bias = constant(gm, fc.bias).double() * found.fc_scale if fc.bias is not None else None
    for c, scale in found.terms:
        spatial, out = tuple(val(c.node.args[0]).shape[2:]), val(c.node).shape[2:]
        w = constant(gm, c.weight)
        blocks += scale * conv_as_matrix(
            w, spatial, c.stride, c.padding, c.dilation, c.groups, fc.groups
        )
        if c.bias is not None:
            term = scale * conv_bias_as_vector(constant(gm, c.bias), math.prod(out))
            bias = term if bias is None else bias + term
    name = f"{fc.weight.target}_merged"
    with gm.graph.inserting_before(fc.node.next):
        values = {"weight": add_constant(gm, blocks.reshape(weight.shape).to(weight.dtype), name)}
        if bias is not None:
            values["bias"] = add_constant(gm, bias.to(weight.dtype), f"{name}_bias")
        args, kwargs = replaced_args(fc.node, **values)
        merged = call(gm, fc.node.target, args, kwargs)
    fc.node.replace_all_uses_with(merged)
    erase_dead(gm, fc.node)
    return merged if found.fc_side is fc.node else found.fc_side


RULES = [
    # FC(x) + sum of conv_i(x), reshaped alike  =>  FC with W + sum of M_i
    Rule("fc-conv", pattern=add_of_values, check=can_merge, build=merge),
]


@register_pass("merge_conv_into_linear", exact=True)
def merge_conv_into_linear(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
