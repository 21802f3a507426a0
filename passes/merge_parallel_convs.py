"""merge_parallel_convs: a sum of parallel linear branches of one x  =>  one conv.

Branches are convs (any kernel size, dilation, zero padding, bias), average pools and x itself,
each under per-channel scales and shifts (eval batch norm, layer scale, +, -, constants), as
`fxopt.linear_combination` reads them: RepVGG, ACNet, DBB, MobileOne, RepLKNet, UniRepLKNet
(dilated branches) and FastViT's RepMixer. A branch may read x through a 1x1 conv, a symmetric
zero pad and per-channel maps (DBB's 1x1 -> k x k and 1x1 -> avg-pool branches): the pad commutes
with the 1x1 conv and joins the padding, and the two compose into one kernel. Runs after
fold_conv_bn, but needs it for nothing.
Exact: yes. Every branch is a linear op of the same x with the same stride and a shared centre
(padding - dilation * (kernel - 1) / 2 equal), so the sum is one conv whose kernel is the sum of
the branch kernels, each made dense (zeros between dilated taps) and zero-padded about the
centre: x is a delta kernel and an average pool a constant one, per group of the merged conv;
scales multiply kernel rows, biases and shifts add up; an inner 1x1 conv P with bias b_p under
a conv W (bias b) gives W P and b + sum over taps of W b_p. Taps that all fall on a coarser grid
keep a dilation (3x3 at dilation 15 plus 1x1 stays a dilated 3x3).
Declines when: the branches read different values (a norm or nonlinearity between x and a
branch's op other than per-channel maps over an inner 1x1 conv, a reflect, non-zero or asymmetric
pad, a strided or padded inner conv, a bias below a zero pad, a bias carried into an op that pads
again, or a branch value that another op reads), strides, conv groups or centres differ,
a pool uses ceil_mode or leaves padded zeros out of its mean, a conv is transposed or its weight
or bias is not a constant or is shared, dtypes differ, there is one branch or no conv, a value
involved is written in place, or the merged conv would cost more than the branches (its kernel
spans the widest branch densely).
Reference: RepVGG (Ding et al. 2021), ACNet, DBB, MobileOne, RepLKNet, UniRepLKNet, FastViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import Cost, conv_cost, hinted, static_cost
from fxopt.analysis.kernels import avg_pool_kernel, dilate, identity_kernel, merge_kernels, undilate
from fxopt.analysis.linear_combination import (
    AVG_POOLS,
    ConvTerm,
    Inner,
    LinearCombination,
    as_conv,
    linear_combination,
)
from fxopt.analysis.sequential_math import pointwise_before
from fxopt.ir.graph import (
    add_constant,
    call,
    constant,
    constant_users,
    is_op,
    mutated_nodes,
    only_user,
    val,
)
from fxopt.ir.ops import Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
CONV_BY_DIMS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


@dataclass(frozen=True)
class Plan:
    """The merged conv: x, the branches it replaces and its arguments."""

    x: fx.Node
    combination: LinearCombination
    branches: tuple[ConvTerm, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    weight_shape: tuple[int, ...]

    @property
    def removed(self) -> tuple[fx.Node, ...]:
        """The nodes that go, inputs first and the root last."""
        leaves = [node for b in self.branches for node in b.term.ops]
        return tuple(dict.fromkeys([*leaves, *self.combination.nodes]))

    @property
    def convs(self) -> list[Conv]:
        """The convs the branches run, inner 1x1 convs included."""
        return [c for c in map(conv, self.removed) if c is not None]


def sum_of_branches(gm: fx.GraphModule, root: fx.Node) -> LinearCombination | None:
    """`root` as a sum of two or more linear branches, or None."""
    combination = linear_combination(gm, root)
    return combination if combination is not None and len(combination.terms) > 1 else None


def plan(gm: fx.GraphModule, root: fx.Node) -> Plan | Declined:
    """The merged conv of the sum at `root`, or a `decline` saying why there is none."""
    combination = sum_of_branches(gm, root)
    if combination is None:
        return decline("not a sum of two or more linear branches")
    if len(combination.sources) != 1:
        return decline(
            "the branches read different values (a norm or nonlinearity between x and a "
            "branch's op, a pad or inner conv that does not commute, or a branch value that "
            "another op reads)"
        )
    (x,) = combination.sources
    out, dims = val(root), val(root).dim() - 2
    if dims not in CONV_BY_DIMS:
        return decline(f"a {dims + 2}-D value, not a 1-D, 2-D or 3-D conv's")
    if getattr(val(x), "dtype", None) != out.dtype:
        return decline("the dtypes differ")
    branches = tuple(as_conv(gm, term, dims) for term in combination.terms)
    if None in branches:
        return decline(
            "a branch is not a conv, average pool or x fxopt can merge (a transposed conv, a "
            "non-constant or shared weight, a pool with ceil_mode or that leaves padded zeros "
            "out of its mean, or a pad or inner conv that does not commute)"
        )
    groups = {b.groups for b in branches if b.groups is not None}
    if len(groups) != 1:
        return decline("the conv groups differ" if groups else "there is no conv")
    if len({b.stride for b in branches}) != 1:
        return decline("the strides differ")
    if len({b.centre for b in branches}) != 1:
        return decline("the centres differ (padding - dilation * (kernel - 1) / 2)")
    padding = tuple(max(b.padding[i] for b in branches) for i in range(dims))
    taps = [[t for b in branches for t in b.taps(i, padding[i])] for i in range(dims)]
    dilation = tuple(math.gcd(*dim_taps) or 1 for dim_taps in taps)
    (group_count,) = groups
    size = tuple(max(t) // d + 1 for t, d in zip(taps, dilation, strict=True))
    weight_shape = (out.shape[1], val(x).shape[1] // group_count, *size)
    found = Plan(x, combination, branches, padding, dilation, group_count, weight_shape)
    if not merged_cost(found, out) <= static_cost(found.removed):
        return decline("the merged conv would cost more than the branches")
    return found


def merged_cost(found: Plan, out: torch.Tensor) -> Cost:
    """FLOPs and bytes of the merged conv, which does not exist yet."""
    out_shape, input_elements = hinted(out.shape), math.prod(hinted(val(found.x).shape))
    return conv_cost(out_shape, found.weight_shape, True, input_elements, out.element_size())


def parallel_branches(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """Pattern: a sum of two or more linear branches; matches its combining ops, root last.
    `can_merge` plans the merge (the branches themselves join the plan's nodes)."""
    combination = sum_of_branches(node.graph.owning_module, node)
    return (*(n for n in combination.nodes if n is not node), node) if combination else None


def can_merge(match: Match) -> Plan | Declined:
    """The plan holds, the sum is the outermost mergeable one (a larger one around it merges
    instead), no other op reads a branch's weight or bias, and nothing is written in place
    (both scan the graph, so only matched roots pay for them)."""
    gm, found = match.gm, plan(match.gm, match.root)
    if isinstance(found, Declined):
        return found
    user = only_user(match.root)
    if user is not None and not isinstance(plan(gm, user), Declined):
        return decline(f"the larger sum {user.name} around it merges instead")
    constants = [n for c in found.convs for n in (c.weight, c.bias) if n is not None]
    if not all(constant_users(gm, n) == 1 for n in constants):
        return decline("a conv's weight or bias is shared")
    removed = found.removed
    touched = {found.x, *removed, *(i for n in removed for i in n.all_input_nodes)}
    if touched & mutated_nodes(gm):
        return decline("a value involved is written in place")
    return found


def branch_kernel(gm: fx.GraphModule, b: ConvTerm, found: Plan) -> tuple[torch.Tensor, ...]:
    """The branch's scaled dense kernel (float64) and bias (or None)."""
    dims, inner, node = len(found.padding), b.term.inner, b.term.node
    channels = val(node if inner is None else node.args[0]).shape[1]
    bias, groups = None, found.groups
    if b.term.is_identity:
        kernel = identity_kernel(channels, groups, dims)
    elif is_op(node, *AVG_POOLS):
        groups = groups if inner is None else channels  # depthwise, before the inner conv
        kernel = avg_pool_kernel(channels, groups, b.kernel, b.divisor)
    else:
        c = conv(node)
        kernel, groups = tensor(gm, c.weight), c.groups
        bias = tensor(gm, c.bias) if c.bias is not None else None
    if inner is not None:
        kernel, bias = through_inner(gm, inner, kernel, bias, groups)
    kernel = kernel * b.term.scale.reshape(-1, *(1,) * (dims + 1))
    bias = bias * b.term.scale if bias is not None else None
    return dilate(kernel, b.dilation), bias


def through_inner(gm: fx.GraphModule, inner: Inner, kernel, bias, groups: int) -> tuple:
    """A branch's kernel and bias composed with the inner 1x1 conv that it reads (scaled and
    shifted per channel), as the kernel and bias of one conv of the source."""
    c = conv(inner.conv)
    weight = tensor(gm, c.weight) * inner.scale.reshape(-1, *(1,) * (kernel.dim() - 1))
    carried = inner.shift
    if c.bias is not None:
        carried = carried + inner.scale * tensor(gm, c.bias)
    kernel, bias, _ = pointwise_before(weight, carried, c.groups, kernel, bias, groups)
    return kernel, bias


def tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return constant(gm, node).detach().cpu().double()


def merge(match: Match) -> fx.Node:
    gm, root, found = match.gm, match.root, match.plan
    kernel, bias = merge_kernels([branch_kernel(gm, b, found) for b in found.branches])
    kernel, bias = undilate(kernel, found.dilation), bias + found.combination.shift
    like = constant(gm, found.convs[0].weight)
    weight_node = add_constant(gm, kernel.to(like), f"{root.name}_merged_weight")
    bias_node = add_constant(gm, bias.to(like), f"{root.name}_merged_bias")
    stride, padding, dilation = found.branches[0].stride, found.padding, found.dilation
    args = (found.x, weight_node, bias_node, [*stride], [*padding], [*dilation], found.groups)
    return call(gm, CONV_BY_DIMS[len(padding)], args)


RULES = [
    # sum of scaled conv | avg_pool | x branches of one x (stride, groups, centre shared)  =>  conv
    Rule("parallel-branches", pattern=parallel_branches, check=can_merge, build=merge),
]


@register_pass("merge_parallel_convs", exact=True)
def merge_parallel_convs(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
