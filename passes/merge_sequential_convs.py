"""merge_sequential_convs: conv -> 1x1 conv, 1x1 conv -> conv, linear -> linear  =>  one op.

Exact: yes; a composition or a sum of affine maps is affine. conv -> 1x1 conv keeps the first
conv's geometry with W' = P W, b' = P b + b_p; 1x1 conv -> conv keeps the second's with
W' = W P, b' = b + sum over taps of W b_p (merged groups: gcd of both). linear -> linear is
W2 W1, W2 b1 + b2. A sum `f(x) + alpha * g(x)` of chains of linears and scalar multiplies of one
input (ZeroI2V adapters: parallel `W x + b + up(down(x))`, serial `h + up(down(h))` with
h = host(x)) becomes one linear of the nearest such input that passes
the checks: the parallel form gives W + U D, b + U b_d + b_u; the serial form (I + U D) W,
(I + U D) b + U b_d + b_u.
Declines when: a value in between has another user or passes a nonlinearity; a weight or bias is
not a constant or is shared; the dtypes differ; a conv is transposed, unbatched or of another
rank; the 1x1 conv is strided or padded; the 1x1 conv before a zero-padded conv has a nonzero
bias (the padded border reads 0, not the bias; DBB pads with the bias value through an explicit
pad op, which this pass does not match); the add broadcasts; an input or weight is written in
place (into a model input or buffer); or the merged op would cost more (fxopt.cost: FLOPs,
then bytes). Merging multiplies out the middle width, so a narrow middle makes it dearer:
linear in -> mid -> out merges only when in * out <= mid * (in + out), i.e. at
mid >= in * out / (in + out) (256 -> 4 -> 256 declines, 64 -> 64 -> 64 merges). Per output
position, k x k C -> M (groups g1) then 1x1 M -> O (g2) merges when
O C k^2 / gcd(g1, g2) <= M C k^2 / g1 + O M / g2 (a depthwise k x k before a dense 1x1 would
turn dense and declines); 1x1 C -> M then k x k M -> O when O C k^2 / gcd <= M C / g1 (at every
input position) + O M k^2 / g2, so when C <= M for equal groups. An adapter with its host
linear always passes.
Reference: DBB (Ding et al. 2021), ZeroI2V (Li et al. 2024), SimVQ (Zhu et al. 2024).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import fx

from fxopt.analysis.cost import Cost, conv_cost, hinted, linear_cost, static_cost
from fxopt.analysis.preconditions import (
    add_of_values,
    add_operands,
    can_skip_padding,
    same_shape,
)
from fxopt.analysis.sequential_math import (
    Bias,
    add_linears,
    compose_linears,
    pointwise_after,
    pointwise_before,
)
from fxopt.ir.graph import (
    add_constant,
    arg,
    call,
    constant,
    is_op,
    owns_weights,
    val,
    written_in_place,
)
from fxopt.ir.ops import CONVS, Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
LINEAR = (aten.linear,)
CONV_OPS = (*CONVS, aten.convolution)


# -- conv -> conv -------------------------------------------------------------------------------


def is_pointwise(c: Conv, kernel) -> bool:
    """A 1x1 conv that maps each position to itself."""
    ones = all(k == 1 for k in kernel) and all(s == 1 for s in c.stride)
    return ones and can_skip_padding(c, tuple(kernel))


@dataclass(frozen=True)
class ConvPair:
    first: Conv
    second: Conv
    geometry: Conv  # the conv whose kernel, stride, padding and dilation the merged conv keeps


def conv_pair(gm: fx.GraphModule, match: Match, pointwise_second: bool) -> ConvPair | Declined:
    first, second = conv(match[0]), conv(match.root)
    if first is None or second is None:
        return decline("an op is not a conv call fxopt reads")
    if first.transposed or second.transposed:
        return decline("a conv is transposed")
    if len(match[0].users) != 1:
        return decline("the first conv's output has another user")
    if not all(owns_weights(gm, c.weight, c.bias) for c in (first, second)):
        return decline("a weight or bias is not a constant or is shared")
    w1, w2 = constant(gm, first.weight), constant(gm, second.weight)
    if w1.dtype != w2.dtype:
        return decline("the dtypes differ")
    if w1.dim() != w2.dim() or val(match[0].args[0]).dim() != w1.dim():
        return decline("a conv is unbatched or of another rank")  # then dim 1 is space
    if pointwise_second:
        if not is_pointwise(second, w2.shape[2:]):
            return decline("the second conv is not an unstrided, unpadded 1x1 conv")
        return ConvPair(first, second, first)
    if not is_pointwise(first, w1.shape[2:]):
        return decline("the first conv is not an unstrided, unpadded 1x1 conv")
    bias = constant(gm, first.bias) if first.bias is not None else None
    if bias is not None and bias.any() and not can_skip_padding(second, tuple(w2.shape[2:])):
        # the padded border reads 0 where the merged conv would assume the bias
        return decline("the 1x1 conv before a zero-padded conv has a nonzero bias")
    return ConvPair(first, second, second)


def can_merge_convs(match: Match, pointwise_second: bool) -> ConvPair | Declined:
    gm, pair = match.gm, conv_pair(match.gm, match, pointwise_second)
    if isinstance(pair, Declined):
        return pair
    w1, w2 = constant(gm, pair.first.weight), constant(gm, pair.second.weight)
    groups = math.gcd(pair.first.groups, pair.second.groups)
    kernel = constant(gm, pair.geometry.weight).shape[2:]
    weight_shape = (w2.shape[0], w1.shape[1] * pair.first.groups // groups, *kernel)
    out, source = hinted(val(match.root).shape), hinted(val(match[0].args[0]).shape)
    bias = pair.first.bias is not None or pair.second.bias is not None
    merged = conv_cost(out, weight_shape, bias, math.prod(source), w1.element_size())
    touched = {match[0].args[0], pair.first.weight, pair.second.weight}
    if written_in_place(gm, touched):
        return decline("an input or weight is written in place")
    if not merged <= static_cost(match.nodes):
        return decline("the merged conv would cost more than the two")
    return pair


def merge_convs(match: Match, pointwise_second: bool) -> fx.Node:
    gm, pair = match.gm, match.plan
    first, second = pair.first, pair.second
    tensors = [constant(gm, n) if n is not None else None for n in (first.weight, first.bias)]
    tensors += [constant(gm, n) if n is not None else None for n in (second.weight, second.bias)]
    if pointwise_second:
        weight, bias, groups = pointwise_after(
            *tensors[:2], first.groups, *tensors[2:], second.groups
        )
    else:
        weight, bias, groups = pointwise_before(
            *tensors[:2], first.groups, *tensors[2:], second.groups
        )
    dtype, name = tensors[0].dtype, f"{second.weight.target}_merged"
    weight_node = add_constant(gm, weight.to(dtype), name)
    bias_node = add_constant(gm, bias.to(dtype), f"{name}_bias") if bias is not None else None
    return call(
        gm,
        pair.geometry.node.target,
        conv_args(pair.geometry, match[0].args[0], weight_node, bias_node, groups),
    )


def conv_args(
    c: Conv, source: fx.Node, weight: fx.Node, bias: fx.Node | None, groups: int
) -> tuple:
    """Arguments of a conv call like `c`'s, on another input, weight, bias and groups."""
    padding = c.padding if isinstance(c.padding, str) else list(c.padding)
    geometry = (list(c.stride), padding, list(c.dilation))
    if is_op(c.node, aten.convolution):
        return (source, weight, bias, *geometry, False, list(c.output_padding), groups)
    return (source, weight, bias, *geometry, groups)


# -- linear -> linear ---------------------------------------------------------------------------


def can_merge_linears(match: Match) -> bool:
    gm, first, second = match.gm, match[0], match.root
    if len(first.users) != 1:
        return decline("the first linear's output has another user")
    if not all(is_owned_linear(gm, n) for n in match.nodes):
        return decline("a weight or bias is not a constant of its own (or not 2-D)")
    w1, w2 = constant(gm, first.args[1]), constant(gm, second.args[1])
    if w1.dtype != w2.dtype:
        return decline("the dtypes differ")
    touched = {first.args[0], first.args[1], second.args[1]}
    if written_in_place(gm, touched):
        return decline("an input or weight is written in place")
    bias = arg(first, 2, "bias") is not None or arg(second, 2, "bias") is not None
    if not merged_linear_cost(first.args[0], second, bias) <= static_cost(match.nodes):
        return decline("the merged linear would cost more (a narrow middle width)")
    return True


def is_owned_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A linear whose 2-D weight and bias are constants it alone reads."""
    if not is_op(node, *LINEAR) or not owns_weights(gm, node.args[1], arg(node, 2, "bias")):
        return False
    return constant(gm, node.args[1]).dim() == 2


def merged_linear_cost(source: fx.Node, root: fx.Node, bias: bool) -> Cost:
    """Cost of one linear from `source`'s features to `root`'s output."""
    features, out = hinted(val(source).shape)[-1], hinted(val(root).shape)
    return linear_cost(out, features, bias, val(root).element_size())


def merge_linears(match: Match) -> fx.Node:
    gm, first, second = match.gm, match[0], match.root
    weight, bias = linear_map(gm, (first, second), None)
    return merged_linear(gm, first.args[0], weight, bias, constant(gm, first.args[1]).dtype)


def merged_linear(gm, source: fx.Node, weight: torch.Tensor, bias, dtype) -> fx.Node:
    weight_node = add_constant(gm, weight.to(dtype), "linear_merged")
    if bias is None:
        return call(gm, aten.linear.default, (source, weight_node))
    return call(
        gm,
        aten.linear.default,
        (source, weight_node, add_constant(gm, bias.to(dtype), "linear_merged_bias")),
    )


# -- sums of affine maps of one input (adapters) ------------------------------------------------


@dataclass(frozen=True)
class Path:
    """A value written as `steps` (linears and scalar multiplies, producer first) of `source`."""

    source: fx.Node
    steps: tuple[fx.Node, ...] = ()


def paths(gm: fx.GraphModule, node: fx.Node, limit: int = 4) -> list[Path]:
    """`node` as affine maps of ever earlier values, nearest source (`node` itself) first."""
    found = [Path(node)]
    while len(found) <= limit and is_affine_step(gm, found[-1].source):
        step = found[-1].source
        found.append(Path(step.args[0], (step, *found[-1].steps)))
    return found


def is_affine_step(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_op(node, aten.mul.Tensor) and isinstance(node.args[0], fx.Node):
        return isinstance(node.args[1], int | float) and not isinstance(node.args[1], bool)
    return is_owned_linear(gm, node)


def linear_map(gm: fx.GraphModule, steps, features: int | None) -> tuple[torch.Tensor, Bias]:
    """The (weight, bias) that `steps` apply to a `features`-wide input, in float64."""
    weight, bias = None, None  # the identity
    for step in steps:
        if is_op(step, aten.mul.Tensor):
            scale = float(step.args[1])
            weight = scale * (weight if weight is not None else torch.eye(features).double())
            bias = bias * scale if bias is not None else None
            continue
        w, b = constant(gm, step.args[1]), arg(step, 2, "bias")
        b = constant(gm, b) if b is not None else None
        weight, bias = (w.double(), b) if weight is None else compose_linears(weight, bias, w, b)
    return (weight if weight is not None else torch.eye(features).double()), bias


def summed_paths(gm: fx.GraphModule, root: fx.Node) -> tuple[Path, Path, float] | Declined:
    """The nearest common source of both operands of `root` that the merge may start from;
    or a `decline` saying why the nearest common source does not do (or that there is none)."""
    operands = add_operands(root)
    if operands is None:
        return decline("not an add of two values")
    if not same_shape(operands[0], operands[1], root):
        return decline("the add broadcasts")
    a, b, alpha = operands
    why = None
    for path_a in paths(gm, a):
        for path_b in paths(gm, b):
            if path_a.source is not path_b.source or not (path_a.steps or path_b.steps):
                continue
            verdict = can_sum(gm, root, path_a, path_b)
            if not isinstance(verdict, Declined):
                return path_a, path_b, alpha
            why = why or verdict
    return why or decline("the operands are not linears or scalar multiples of one value")


def can_sum(gm: fx.GraphModule, root: fx.Node, path_a: Path, path_b: Path) -> bool:
    region, source = {*path_a.steps, *path_b.steps}, path_a.source
    if any(not set(node.users) <= region | {root} for node in region):
        return decline("a value in between has another user")
    if len({val(n).dtype for n in (*region, root, source)}) != 1:
        return decline("the dtypes differ")
    if not isinstance(val(source).shape[-1], int):
        return decline("the feature count is symbolic")
    linears = [n for n in region if is_op(n, *LINEAR)]
    biases = [arg(n, 2, "bias") for n in linears if arg(n, 2, "bias") is not None]
    touched = {source, *biases, *(n.args[1] for n in linears)}
    if written_in_place(gm, touched):
        return decline("an input or weight is written in place")
    if not merged_linear_cost(source, root, bool(biases)) <= static_cost([*region, root]):
        return decline("the merged linear would cost more than the branches")
    return True


def can_merge_sum(match: Match) -> tuple[Path, Path, float] | Declined:
    return summed_paths(match.gm, match.root)


def merge_sum(match: Match) -> fx.Node:
    gm, root = match.gm, match.root
    path_a, path_b, alpha = match.plan
    features = val(path_a.source).shape[-1]
    first = linear_map(gm, path_a.steps, features)
    second = linear_map(gm, path_b.steps, features)
    weight, bias = add_linears(*first, *second, alpha)
    return merged_linear(gm, path_a.source, weight, bias, val(root).dtype)


RULES = [
    # conv -> 1x1 conv  =>  conv with the first's geometry (W' = P W)
    Rule(
        "conv-pointwise",
        pattern=(CONV_OPS, CONV_OPS),
        check=partial(can_merge_convs, pointwise_second=True),
        build=partial(merge_convs, pointwise_second=True),
    ),
    # 1x1 conv -> conv  =>  conv with the second's geometry (W' = W P)
    Rule(
        "pointwise-conv",
        pattern=(CONV_OPS, CONV_OPS),
        check=partial(can_merge_convs, pointwise_second=False),
        build=partial(merge_convs, pointwise_second=False),
    ),
    # linear -> linear  =>  linear (W2 W1), when not more expensive
    Rule("linear-linear", pattern=(LINEAR, LINEAR), check=can_merge_linears, build=merge_linears),
    # f(x) + alpha * g(x), f and g linears and scalar multiplies  =>  linear (adapters)
    Rule("linear-sum", pattern=add_of_values, check=can_merge_sum, build=merge_sum),
]


@register_pass("merge_sequential_convs", exact=True)
def merge_sequential_convs(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
