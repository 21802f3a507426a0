"""fuse_horizontal: sibling linears (or convs) on the same x  =>  one wider op + split.

Separate q, k, v projections become one qkv linear; sibling convs with the same kernel become one
conv with the filters stacked. The wide output is cut back with `split_with_sizes` on the last
dim (linear) or the channel dim (conv), so every former output is a view of the wide one.
Exact: yes; each output column or channel is computed from the same x, weights and bias as
before. Siblings without a bias get a zero bias when a sibling has one.
Declines when: fewer than two siblings qualify. A sibling qualifies when it reads x as its input;
it is a linear, or a non-transposed conv with groups=1 whose overload, weight shape past dim 0,
stride, padding and dilation match its siblings'; its weight (and bias) is a floating constant of
x's dtype that no other op reads; no value involved is written in place; and every view taken of
its output, directly or through other views, is still possible on a strided slice of the wide
output (`view(B, N * C)` of a split-off column block is not, so that sibling stays separate).
Cost rule: `fxopt.cost.roofline`, summed per call: max(FLOPs / 8, bytes) plus the call's fixed
cost. The wide op does the same FLOPs (plus the adds of any zero bias) and reads x once instead
of N times in one call instead of N, so it wins unless zero biases cost more than that saves.
Reference: horizontal fusion (TensorRT, TorchInductor); fused qkv projections (ViT).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from fxopt.analysis.channel_math import concat_biases
from fxopt.analysis.cost import conv_cost, hinted, linear_cost, node_roofline, roofline
from fxopt.ir.graph import (
    add_constant,
    arg,
    call,
    constant,
    constant_users,
    erase_dead,
    is_op,
    mutated_nodes,
    val,
)
from fxopt.ir.ops import CONVS, conv, replaced_args
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten


def weight_and_bias(node: fx.Node) -> tuple[fx.Node, fx.Node | None, tuple] | None:
    """A linear's or groups=1 conv's weight and bias nodes, and the hyper-parameters siblings
    must share; None for anything else."""
    if is_op(node, aten.linear):
        return arg(node, 1, "weight"), arg(node, 2, "bias"), ()
    c = conv(node) if is_op(node, *CONVS) else None
    if c is None or c.transposed or c.groups != 1:
        return None
    return c.weight, c.bias, (c.stride, c.padding, c.dilation)


def sibling_key(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> tuple | None:
    """What `node` must share with its siblings to fuse with them, or None if it cannot."""
    found = weight_and_bias(node) if node.args and node.args[0] is x else None
    if found is None or not isinstance(val(node), torch.Tensor):
        return None
    weight_node, bias_node, params = found
    for tensor_node in (weight_node, bias_node):
        tensor = constant(gm, tensor_node) if tensor_node is not None else val(x)
        if tensor is None or tensor.dtype != val(x).dtype or not tensor.is_floating_point():
            return None
        if tensor_node is not None and constant_users(gm, tensor_node) != 1:
            return None
    weight = constant(gm, weight_node)
    return node.target, tuple(weight.shape[1:]), params, weight.device


def split_axis(node: fx.Node) -> int:
    """The dim of `node`'s output that holds its output features or channels."""
    out, weight = val(node), val(weight_and_bias(node)[0])
    return out.dim() - 1 if is_op(node, aten.linear) else out.dim() - (weight.dim() - 1)


def keeps_views(node: fx.Node, value) -> bool:
    """Every view of `node`'s value, direct or through other views, can still be taken when the
    value is `value` (meta tensors at concrete shapes, with the strides the fusion gives)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        aliases = schema is not None and any(r.alias_info is not None for r in schema.returns)
        if not aliases and user.target is not operator.getitem:
            continue
        try:
            result = replay(user, node, value)
        except Exception:  # the view is impossible at these strides
            return False
        if not keeps_views(user, result):
            return False
    return True


def replay(user: fx.Node, node: fx.Node, value):
    """Run `user` on meta values, `value` standing for `node`."""

    def concrete(a: fx.Node):
        if a is node:
            return value
        v = val(a)
        if isinstance(v, torch.Tensor):
            return torch.empty(hinted(v.shape), dtype=v.dtype, device="meta")
        return optimization_hint(v, fallback=1) if isinstance(v, torch.SymInt) else v

    args, kwargs = fx.node.map_arg((user.args, user.kwargs), concrete)
    return user.target(*args, **kwargs)


def viewable(group: list[fx.Node]) -> list[fx.Node]:
    """The siblings whose views survive the split; dropping one changes the others' strides,
    so repeat until none drops."""
    while len(group) > 1:
        axis, outs = split_axis(group[0]), [val(n) for n in group]
        sizes = [out.shape[axis] for out in outs]
        shape = hinted(outs[0].shape)
        shape[axis] = sum(sizes)
        wide = torch.empty(shape, dtype=outs[0].dtype, device="meta")
        offsets = [0, *itertools.accumulate(sizes)][:-1]
        keep = [
            n
            for n, o, s in zip(group, offsets, sizes, strict=True)
            if keeps_views(n, wide.narrow(axis, o, s))
        ]
        if len(keep) == len(group):
            break
        group = keep
    return group


def cheaper(x: fx.Node, group: list[fx.Node], has_bias: bool) -> bool:
    """The roofline of the wide op against the siblings run one by one."""
    separate = sum(node_roofline(node) for node in group)
    axis, outs = split_axis(group[0]), [val(n) for n in group]
    shape = hinted(outs[0].shape)
    shape[axis] = sum(out.shape[axis] for out in outs)
    weight = val(weight_and_bias(group[0])[0])
    size = outs[0].element_size()
    if is_op(group[0], aten.linear):
        wide = linear_cost(shape, weight.shape[1], has_bias, size)
    else:
        weight_shape = (shape[axis], *weight.shape[1:])
        wide = conv_cost(shape, weight_shape, has_bias, math.prod(hinted(val(x).shape)), size)
    return roofline(wide) <= separate


def fuse(gm: fx.GraphModule, group: list[fx.Node]) -> None:
    """Replace the siblings by one wide op, inserted before the first of them, and a split."""
    first, axis = group[0], split_axis(group[0])
    weights = [constant(gm, weight_and_bias(n)[0]) for n in group]
    bias_nodes = [weight_and_bias(n)[1] for n in group]
    biases = [constant(gm, b) if b is not None else None for b in bias_nodes]
    sizes = [w.shape[0] for w in weights]
    bias = concat_biases(biases, sizes)
    with gm.graph.inserting_before(first):
        args, kwargs = replaced_args(
            first,
            weight=add_constant(gm, torch.cat(weights), "fused"),
            bias=None if bias is None else add_constant(gm, bias, "fused_bias"),
        )
        wide = call(gm, first.target, args, kwargs)
        pieces = call(gm, aten.split_with_sizes.default, (wide, sizes, axis))
        for index, node in enumerate(group):
            node.replace_all_uses_with(call(gm, operator.getitem, (pieces, index)))
    for node in group:
        erase_dead(gm, node)


def sibling_groups(gm: fx.GraphModule, x: fx.Node, linear: bool) -> list[list[fx.Node]]:
    """The linear (or conv) users of `x` that may fuse, grouped by what they must share, in
    graph order."""
    groups: defaultdict[tuple, list[fx.Node]] = defaultdict(list)
    if not isinstance(val(x), torch.Tensor):
        return []
    for node in sorted(x.users):  # fx nodes order as they stand in the graph
        key = sibling_key(gm, node, x) if is_op(node, aten.linear) == linear else None
        if key is not None:
            groups[key].append(node)
    return [group for group in groups.values() if len(group) > 1]


def siblings(linear: bool):
    """Pattern: a value that two or more linears (or convs) read as their input; matches the
    value, which stays (the rule fuses its users)."""

    def pattern(x: fx.Node) -> tuple[fx.Node] | None:
        readers = [
            n
            for n in x.users
            if n.args
            and n.args[0] is x
            and is_op(n, aten.linear) == linear
            and weight_and_bias(n) is not None
        ]
        return (x,) if len(readers) > 1 else None

    return pattern


def can_fuse(match: Match, linear: bool) -> list[fx.Node] | Declined:
    """The first group of siblings to fuse, or a `decline` saying why none qualifies."""
    gm, x = match.gm, match.root
    written = mutated_nodes(gm)
    if x in written:
        return decline("the shared input is written in place")
    groups = sibling_groups(gm, x, linear)
    why = decline(
        "fewer than two siblings qualify: they differ in overload, weight shape past dim 0, "
        "stride, padding or dilation, or a weight or bias is not a floating constant of x's "
        "dtype that no other op reads (or a conv is transposed or grouped)"
    )
    for group in groups:
        group = viewable([n for n in group if not {n, *n.all_input_nodes} & written])
        if len(group) < 2:
            why = decline(
                "fewer than two siblings qualify: a value involved is written in place, or a "
                "view of a sibling's output is impossible on a slice of the wide output"
            )
            continue
        if not cheaper(x, group, any(weight_and_bias(n)[1] is not None for n in group)):
            why = decline("cost model: the wide op with zero biases costs more than the siblings")
            continue
        return group
    return why


def can_fuse_linears(match: Match) -> list[fx.Node] | Declined:
    return can_fuse(match, linear=True)


def can_fuse_convs(match: Match) -> list[fx.Node] | Declined:
    return can_fuse(match, linear=False)


def fuse_siblings(match: Match) -> fx.Node:
    """Fuse the group `can_fuse` chose; `x`, the match's root, stays."""
    fuse(match.gm, match.plan)
    return match.root


RULES = [
    # linear_1(x), ..., linear_n(x)  =>  split(linear(x, cat(W_1, ..., W_n)))
    Rule(
        "sibling-linears",
        pattern=siblings(linear=True),
        check=can_fuse_linears,
        build=fuse_siblings,
    ),
    # conv_1(x), ..., conv_n(x) sharing kernel and geometry  =>  split(conv(x, cat(W_i)))
    Rule(
        "sibling-convs",
        pattern=siblings(linear=False),
        check=can_fuse_convs,
        build=fuse_siblings,
    ),
]


@register_pass("fuse_horizontal", exact=True)
def fuse_horizontal(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
