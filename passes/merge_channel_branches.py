"""merge_channel_branches: cat of convs on channel slices of x  =>  one depthwise or grouped conv.

Three shapes of branch, each concatenated on the channel axis:
- InceptionNeXt: identity slices and depthwise convs (stride 1, "same" padding, any dilation)
  on consecutive channel slices of x => one depthwise conv whose per-channel kernels are the
  branches' dense kernels zero-padded, centred, to the largest support (identity: a delta).
- ResNeXt: N convs with identical hyper-parameters and weight shapes on N consecutive,
  equal-size channel slices of x => one conv with N times the groups.
- N convs with identical hyper-parameters and groups=1 on the same x => one conv with the
  filters stacked.
Slices are `split`, `split_with_sizes`, `chunk`, `narrow` or `slice`; when they cover only part
of x, the merged conv reads that part through one `slice`.
Exact: yes; a centred zero-padded kernel with padding (K - 1) / 2 reads the same taps as the
original with (k - 1) / 2, and zero-padded borders read zero on both sides. Grouped and stacked
filters compute each output channel from the same inputs and taps as before.
Declines when: a branch conv is transposed or an `aten.convolution`, is strided or not
"same"-padded or not depthwise (InceptionNeXt), or differs from its siblings (ResNeXt, stacked);
a conv output has another user; a weight or bias is not a constant, is shared, or its dtype
differs from x; the slices are not consecutive slices of one tensor in order; a value involved
is written in place; or the cost model prices the merged conv above the branches.
Cost rule: `fxopt.cost.roofline` per call, max(FLOPs / 8, bytes) plus the call's fixed cost
(measured on CPU: about 3 us for a dense conv, linear or cat, about 70 us for a grouped or
depthwise conv), for the branch convs and the cat against the merged conv. So InceptionNeXt's
split + three depthwise convs + cat merges on small maps (the calls dominate: 236 us against the
merged 84 us at 32x16x16) and stays split on large ones, where the merged 11x11 kernel's 2.7x
work wins (k = 11 declines at 64x64). Stacked filters always merge (one dense call, no cat);
ResNeXt paths merge into one grouped call once there are enough of them (32 do, 3 do not).
Reference: InceptionNeXt (Yu et al. 2024), ResNeXt (Xie et al. 2017).
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.channel_math import concat_biases, depthwise_weight
from fxopt.analysis.cost import call_overhead, conv_cost, hinted, node_roofline, roofline
from fxopt.analysis.kernels import dilate
from fxopt.ir.graph import (
    add_constant,
    arg,
    call,
    constant,
    constant_users,
    is_op,
    val,
    written_in_place,
)
from fxopt.ir.ops import ANY_CONV, CONVS, Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
SPLITS = (aten.split, aten.split_with_sizes, aten.chunk)
CONV_OF_RANK = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_END = 1 << 62  # a slice end at or past this means "to the end" (export writes sys.maxsize)


@dataclass(frozen=True)
class Part:
    """One cat input: channels [start, stop) of `source`, through `conv` unless it is None."""

    node: fx.Node
    source: fx.Node
    start: int
    stop: int
    conv: Conv | None


def channel_range(node: fx.Node, axis: int) -> tuple[fx.Node, int, int] | None:
    """(source, start, stop): `node` is channels [start, stop) of `source` along `axis`, seen
    through slices, narrows and split pieces; `node` itself when it is none of these."""
    out = val(node)
    if not isinstance(out, torch.Tensor) or axis >= out.dim():
        return None
    piece = parent_range(node, axis)
    if piece is None:
        return (node, 0, out.shape[axis]) if isinstance(out.shape[axis], int) else None
    outer = channel_range(piece[0], axis)
    return None if outer is None else (outer[0], outer[1] + piece[1], outer[1] + piece[2])


def parent_range(node: fx.Node, axis: int) -> tuple[fx.Node, int, int] | None:
    """(parent, start, stop) when `node` is a view of channels [start, stop) of `parent`."""
    if node.target is operator.getitem and is_op(node.args[0], *SPLITS):
        bounds = split_bounds(node.args[0], axis)
        return (node.args[0].args[0], *bounds[node.args[1]]) if bounds else None
    if not is_op(node, aten.slice, aten.narrow) or arg(node, 4, "step", 1) != 1:
        return None
    parent, start = node.args[0], arg(node, 2, "start", 0) or 0
    end = arg(node, 3, "end") if is_op(node, aten.slice) else node.args[3]  # narrow: a length
    shape = val(parent).shape
    dim, size = arg(node, 1, "dim", 0) % len(shape), shape[axis]
    if not all(isinstance(v, int) for v in (start, size, 0 if end is None else end)):
        return None
    if is_op(node, aten.narrow):
        start, end = (None, None) if start < 0 else (start, start + end)
    if start is None:  # a narrow from the end
        return None
    if dim != axis:
        full = end is None or end >= _END or (isinstance(shape[dim], int) and end >= shape[dim])
        return (parent, 0, size) if start == 0 and full else None
    start = start + size if start < 0 else start
    end = size if end is None else (end + size if end < 0 else end)
    return parent, min(start, size), min(max(end, start), size)


def split_bounds(split: fx.Node, axis: int) -> list[tuple[int, int]] | None:
    """Channel ranges of a split's pieces, when it splits along `axis`."""
    shape = val(split.args[0]).shape
    total, how = shape[axis], split.args[1]
    if arg(split, 2, "dim", 0) % len(shape) != axis or not isinstance(total, int) or not total:
        return None
    if isinstance(how, int) and how > 0:
        size = math.ceil(total / how) if is_op(split, aten.chunk) else how
        how = [size] * math.ceil(total / size)
    if not isinstance(how, list | tuple) or not all(isinstance(s, int) for s in how):
        return None
    ends = [min(total, end) for end in itertools.accumulate(how)]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def cat_parts(gm: fx.GraphModule, cat: fx.Node) -> list[Part] | Declined:
    """The cat's inputs as channel ranges of one source (through a conv or not), or a
    `decline` saying why they are not."""
    out, inputs = val(cat), cat.args[0]
    axis = channel_axis(cat)
    parts = []
    for node in inputs:
        c = conv(node) if is_op(node, *ANY_CONV) else None
        if c is not None and not is_op(node, *CONVS):
            return decline(f"{node.name} is an aten.convolution or not a plain conv call")
        if c is not None and not can_read(gm, c, out.dtype, axis):
            return decline(
                f"{node.name} is transposed, has another user, or its weight or bias is not a "
                "constant of x's dtype that only it reads"
            )
        found = channel_range(c.node.args[0] if c else node, axis)
        if found is None or val(node).dtype != out.dtype:
            return decline(f"{node.name} does not read a channel slice of x (or changes dtype)")
        parts.append(Part(node, *found, c))
    if len({p.node for p in parts}) < len(parts) or len({p.source for p in parts}) != 1:
        return decline("the branches do not read slices of one tensor, each once")
    weights = [n for p in parts if p.conv for n in (p.conv.weight, p.conv.bias) if n is not None]
    if written_in_place(gm, [cat, parts[0].source, *inputs, *weights]):
        return decline("a value involved is written in place")
    return parts


def channel_axis(cat: fx.Node) -> int:
    return arg(cat, 1, "dim", 0) % val(cat).dim()


def can_read(gm: fx.GraphModule, c: Conv, dtype: torch.dtype, axis: int) -> bool:
    """A conv with channels on `axis` (batched or not), constant weights of `dtype` that no
    other op reads, and no user but the cat."""
    weight = constant(gm, c.weight)
    if c.transposed or weight is None or weight.dtype != dtype or len(c.node.users) != 1:
        return False
    if constant_users(gm, c.weight) != 1 or val(c.node).dim() - axis != weight.dim() - 1:
        return False
    if c.bias is None:
        return True
    bias = constant(gm, c.bias)
    return bias is not None and bias.dtype == dtype and constant_users(gm, c.bias) == 1


def consecutive(parts: list[Part]) -> bool:
    return all(a.stop == b.start for a, b in zip(parts[:-1], parts[1:], strict=True))


def dense_support(c: Conv) -> tuple[int, ...]:
    """The kernel's extent once its dilation is written out as zeros."""
    kernel = val(c.weight).shape[2:]
    return tuple(d * (k - 1) + 1 for d, k in zip(c.dilation, kernel, strict=True))


def is_same_padded_depthwise(part: Part) -> bool:
    """A stride-1 depthwise conv whose padding keeps the kernel centred on each output."""
    c, channels = part.conv, part.stop - part.start
    if c.groups != channels or tuple(val(c.weight).shape[:2]) != (channels, 1):
        return False
    support = dense_support(c)
    if any(s != 1 for s in c.stride) or any(k % 2 == 0 for k in support):
        return False
    if isinstance(c.padding, str):
        return c.padding == "same" or all(k == 1 for k in support)
    return all(2 * p == k - 1 for p, k in zip(c.padding, support, strict=True))


def signature(c: Conv, stacked: bool) -> tuple:
    """What two convs must share to become one; stacked filters may differ in count."""
    shape = tuple(val(c.weight).shape)
    return c.node.target, shape[1:] if stacked else shape, c.stride, c.padding, c.dilation, c.groups


def hinted_numel(node: fx.Node) -> int:
    return math.prod(hinted(val(node).shape))


def cheaper(
    parts: list[Part], cat: fx.Node, weight_shape: tuple, input_elements: int, groups: int
) -> bool:
    """The roofline of the merged conv against the branch convs and the cat."""
    work = [p.node for p in parts if p.conv] + [cat]
    branches = sum(node_roofline(node) for node in work)
    has_bias = any(p.conv and p.conv.bias is not None for p in parts)
    out = val(cat)
    shape = hinted(out.shape)
    merged = conv_cost(shape, weight_shape, has_bias, input_elements, out.element_size())
    return roofline(merged, call_overhead(groups)) <= branches


def can_merge_depthwise(match: Match) -> list[Part] | Declined:
    """The cat's parts, to merge into one depthwise conv, or a `decline`."""
    parts = cat_parts(match.gm, match.root)
    if isinstance(parts, Declined):
        return parts
    if not consecutive(parts):
        return decline("the slices are not consecutive slices of one tensor in order")
    if not any(p.conv for p in parts):
        return decline("no branch is a conv")
    if not all(p.conv is None or is_same_padded_depthwise(p) for p in parts):
        return decline("a branch conv is not a stride-1, same-padded depthwise conv")
    channels = parts[-1].stop - parts[0].start
    shape = (channels, 1, *depthwise_support(parts))
    if not cheaper(parts, match.root, shape, hinted_numel(match.root), channels):
        return decline("cost model: the merged depthwise conv costs more than the branches")
    return parts


def depthwise_support(parts: list[Part]) -> tuple[int, ...]:
    supports = [dense_support(p.conv) for p in parts if p.conv]
    return tuple(max(sizes) for sizes in zip(*supports, strict=True))


def can_stack(match: Match, grouped: bool) -> list[Part] | Declined:
    """The cat's parts, to stack into one conv (grouped: one group per part), or a `decline`."""
    parts = cat_parts(match.gm, match.root)
    if isinstance(parts, Declined):
        return parts
    if len(parts) < 2 or not all(p.conv for p in parts):
        return decline("a branch is not a conv")
    if len({signature(p.conv, not grouped) for p in parts}) != 1:
        return decline("a branch conv differs from its siblings")
    if grouped and not (consecutive(parts) and len({p.stop - p.start for p in parts}) == 1):
        return decline("the slices are not consecutive, equal slices of one tensor in order")
    ranges = {(p.start, p.stop) for p in parts}
    if not grouped and (len(ranges) != 1 or parts[0].conv.groups != 1):
        return decline("the convs do not all read the same channels, or are grouped")
    shapes = [val(p.conv.weight).shape for p in parts]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    inputs = [p.conv.node.args[0] for p in parts] if grouped else [parts[0].conv.node.args[0]]
    groups = parts[0].conv.groups * (len(parts) if grouped else 1)
    if not cheaper(parts, match.root, shape, sum(hinted_numel(n) for n in inputs), groups):
        return decline("cost model: the merged conv costs more than the branches and the cat")
    return parts


def merged_input(gm: fx.GraphModule, parts: list[Part], axis: int) -> fx.Node:
    source, start, stop = parts[0].source, parts[0].start, max(p.stop for p in parts)
    if start == 0 and stop == val(source).shape[axis]:
        return source
    return call(gm, aten.slice.Tensor, (source, axis, start, stop))


def bias_of(gm: fx.GraphModule, c: Conv | None) -> torch.Tensor | None:
    return constant(gm, c.bias) if c is not None and c.bias is not None else None


def add_optional(gm: fx.GraphModule, tensor: torch.Tensor | None, name: str) -> fx.Node | None:
    return None if tensor is None else add_constant(gm, tensor, name)


def merge_depthwise(match: Match) -> fx.Node:
    gm, cat = match.gm, match.root
    parts, axis = match.plan, channel_axis(cat)
    support = depthwise_support(parts)
    like = next(constant(gm, p.conv.weight) for p in parts if p.conv)
    kernels = [
        dilate(constant(gm, p.conv.weight), p.conv.dilation) if p.conv else p.stop - p.start
        for p in parts
    ]
    weight = depthwise_weight(kernels, support, like.dtype, like.device)
    sizes = [p.stop - p.start for p in parts]
    bias = concat_biases([bias_of(gm, p.conv) for p in parts], sizes)
    rank, name = len(support), "merged_dw"
    args = (
        merged_input(gm, parts, axis),
        add_constant(gm, weight, name),
        add_optional(gm, bias, f"{name}_bias"),
        [1] * rank,
        [(k - 1) // 2 for k in support],
        [1] * rank,
        weight.shape[0],
    )
    return call(gm, CONV_OF_RANK[rank], args)


def stack(match: Match, grouped: bool) -> fx.Node:
    gm, cat, parts = match.gm, match.root, match.plan
    first = parts[0].conv
    weights = [constant(gm, p.conv.weight) for p in parts]
    bias = concat_biases([bias_of(gm, p.conv) for p in parts], [w.shape[0] for w in weights])
    padding = first.padding if isinstance(first.padding, str) else list(first.padding)
    name = "grouped" if grouped else "stacked"
    args = (
        merged_input(gm, parts, channel_axis(cat)),
        add_constant(gm, torch.cat(weights), name),
        add_optional(gm, bias, f"{name}_bias"),
        list(first.stride),
        padding,
        list(first.dilation),
        first.groups * (len(parts) if grouped else 1),
    )
    return call(gm, first.node.target, args)


def can_group(match: Match) -> list[Part] | Declined:
    return can_stack(match, grouped=True)


def can_stack_filters(match: Match) -> list[Part] | Declined:
    return can_stack(match, grouped=False)


def group(match: Match) -> fx.Node:
    return stack(match, grouped=True)


def stack_filters(match: Match) -> fx.Node:
    return stack(match, grouped=False)


def cat_of_branches(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """A cat of two or more values, at least one of them a conv."""
    inputs = node.args[0] if is_op(node, aten.cat) else None
    if not isinstance(inputs, list | tuple) or len(inputs) < 2:
        return None
    if not isinstance(val(node), torch.Tensor):
        return None
    return (*inputs, node) if any(is_op(n, *ANY_CONV) for n in inputs) else None


RULES = [
    # cat(x[a:b], dw_k(x[b:c]), dw_1xk(x[c:d]), ...)  =>  dw_K(x[a:d]), kernels centred in K
    Rule(
        "split-dw-branches",
        pattern=cat_of_branches,
        check=can_merge_depthwise,
        build=merge_depthwise,
    ),
    # cat(conv_1(x[0:c]), conv_2(x[c:2c]), ...)  =>  conv(x, groups=N * groups)
    Rule(
        "grouped-branches",
        pattern=cat_of_branches,
        check=can_group,
        build=group,
    ),
    # cat(conv_1(x), conv_2(x), ...)  =>  conv(x) with the filters stacked
    Rule(
        "stacked-branches",
        pattern=cat_of_branches,
        check=can_stack_filters,
        build=stack_filters,
    ),
]


@register_pass("merge_channel_branches", exact=True)
def merge_channel_branches(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
