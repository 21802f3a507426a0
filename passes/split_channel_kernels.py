"""split_channel_kernels: depthwise conv with small per-channel supports  =>  split -> convs -> cat.

The reverse of `merge_channel_branches`' InceptionNeXt rule. Each channel's kernel is reduced to
its support: the smallest centred box outside which it is zero (a delta with weight 1 and no bias
is the identity). Consecutive runs of channels with the same support are the candidate groups;
the pass picks the partition of the runs into consecutive segments that the cost model prices
lowest (a segment's support is the largest of its runs'; an all-identity segment costs nothing),
and writes it as split_with_sizes -> one depthwise conv per segment with its kernel cropped to
the segment's support (identity segments pass through) -> cat. One segment is one smaller conv
with no split or cat.
Exact: yes; cropping zeros from a centred kernel and shrinking the padding to match reads the
same taps, and each channel's output depends only on its own input channel.
Declines when: the conv is not a stride-1 depthwise conv with "same" padding and an odd kernel
(any dilation is written out densely first), the input is not batched, the weight or bias is
not a constant that only this conv reads, a value involved is written in place, or no partition
is cheaper than the conv as it is. Channels whose supports interleave (3x3, 1x11, 3x3, ...) form
many runs; the cost model then keeps them together rather than permute channels.
Cost rule: the roofline terms `merge_channel_branches` compares (each depthwise call with its
fixed cost, and the cat), and the split form must cost at most SPLIT_MARGIN (0.8) of the conv
as it is and be cheaper than one conv with the joined support. A merge needs only "not dearer",
so the two passes never undo each other. Measured on one core for InceptionNeXt's merged 11x11
kernel (32 channels: 20 identity, 4 each 3x3, 1x11, 11x1) against the cheapest split the model
finds, fx graphs run interleaved, medians (a loaded machine, +-10%); split / merged time:
    batch 1: 16x16 1.07 (149 vs 139 us; model 0.94)   32x32 0.92 (model 0.81)
             64x64 0.77 (456 vs 591 us; model 0.62)
    batch 2:  8x8  1.12 (model 0.98)                  16x16 1.17 (model 0.88)
The model is optimistic by 0.1-0.3, hence the margin: the pass splits at 64x64 (the identity
channels pass through, 3x3 and 1x11 join into one 3x11 conv, 11x1 stays apart) and keeps the
merged kernel at 16x16 and below; at 32x32 it splits at batch 2 and not at batch 1. Raw single
calls at 64x64: merged 617 us against 117 + 83 us for the two small convs and 33 us for the cat.
Reference: InceptionNeXt (Yu et al. 2024, arXiv:2303.16900); merge_channel_branches, its inverse.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import Cost, call_overhead, conv_cost, hinted, node_roofline, roofline
from fxopt.analysis.kernels import dilate
from fxopt.ir.graph import add_constant, call, constant, mutated_nodes, owns_weights, val
from fxopt.ir.ops import Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
CONV_OF_RANK = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
IDENTITY = ()  # the support of a channel that is passed through unchanged
# Split only when the model prices the split form at most this fraction of the conv: it misses
# the split's and getitems' own calls and the copies of channel slices, and measured gains
# appeared only where it predicted 20% or more (see the table above).
SPLIT_MARGIN = 0.8


@dataclass(frozen=True)
class Segment:
    """Channels [start, stop) computed with a kernel cropped to `support` (IDENTITY: none)."""

    start: int
    stop: int
    support: tuple[int, ...]


def channel_supports(kernel: torch.Tensor, bias: torch.Tensor | None) -> list[tuple[int, ...]]:
    """Per channel of a depthwise kernel (c, 1, *k) with odd k: the smallest centred box that
    holds its nonzero taps, or IDENTITY for a delta of weight 1 with no bias."""
    spatial, taps = kernel.shape[2:], kernel[:, 0] != 0
    radii = []
    for dim, size in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[dim] = size
        distance = (torch.arange(size) - size // 2).abs().reshape(1, *shape)
        radii.append((taps * distance).flatten(1).amax(1))
    centre = kernel[(slice(None), 0, *(k // 2 for k in spatial))]
    delta = (torch.stack(radii).amax(0) == 0) & (centre == 1)
    if bias is not None:
        delta &= bias == 0
    boxes = (2 * torch.stack(radii, 1) + 1).tolist()
    return [
        IDENTITY if is_delta else tuple(box) for is_delta, box in zip(delta, boxes, strict=True)
    ]


def runs(supports: list[tuple[int, ...]]) -> list[Segment]:
    """Maximal runs of consecutive channels with the same support."""
    found: list[Segment] = []
    for channel, support in enumerate(supports):
        if found and found[-1].support == support:
            found[-1] = Segment(found[-1].start, channel + 1, support)
        else:
            found.append(Segment(channel, channel + 1, support))
    return found


def joined(parts: list[Segment]) -> Segment:
    """One segment over consecutive runs, with the largest of their supports."""
    boxes = [p.support for p in parts if p.support != IDENTITY]
    support = tuple(max(sizes) for sizes in zip(*boxes, strict=True)) if boxes else IDENTITY
    return Segment(parts[0].start, parts[-1].stop, support)


def segment_time(segment: Segment, shape: list[int], has_bias: bool, element_size: int) -> float:
    """`roofline` of a segment's depthwise conv, as `node_roofline` will price the node."""
    if segment.support == IDENTITY:
        return 0.0
    channels = segment.stop - segment.start
    out = [shape[0], channels, *shape[2:]]
    weight = (channels, 1, *segment.support)
    cost = conv_cost(out, weight, has_bias, math.prod(out), element_size)
    return roofline(cost, call_overhead(channels))


def cat_time(shape: list[int], element_size: int) -> float:
    elements = math.prod(shape)
    return roofline(Cost(elements, 2 * elements * element_size))


def cheapest_partition(
    parts: list[Segment], shape: list[int], has_bias: bool, element_size: int
) -> tuple[float, list[Segment]]:
    """The partition of consecutive runs into segments with the lowest total time, the cat
    included when there is more than one segment; fewer segments win ties."""
    best: list[tuple[float, list[Segment]]] = [(0.0, [])]
    for end in range(1, len(parts) + 1):
        options = []
        for start in range(end):
            segment = joined(parts[start:end])
            time, chosen = best[start]
            time += segment_time(segment, shape, has_bias, element_size)
            options.append((time, len(chosen) + 1, [*chosen, segment]))
        time, _, chosen = min(options, key=lambda option: option[:2])
        best.append((time, chosen))
    whole = joined(parts)
    single = segment_time(whole, shape, has_bias, element_size)
    time, segments = best[-1]
    if len(segments) == 1 or single <= time + cat_time(shape, element_size):
        return single, [whole]
    return time + cat_time(shape, element_size), segments


def dense_kernel(gm: fx.GraphModule, c: Conv) -> torch.Tensor:
    return dilate(constant(gm, c.weight), c.dilation)


def is_same_padded_depthwise(c: Conv) -> bool:
    """A stride-1 depthwise conv on batched input whose odd kernel is centred on each output."""
    weight, x = val(c.weight), val(c.node.args[0])
    if weight.dim() != x.dim() or c.groups != x.shape[1] or weight.shape[:2] != (c.groups, 1):
        return False
    support = [d * (k - 1) + 1 for d, k in zip(c.dilation, weight.shape[2:], strict=True)]
    if any(s != 1 for s in c.stride) or any(k % 2 == 0 for k in support):
        return False
    if isinstance(c.padding, str):
        return c.padding == "same" or all(k == 1 for k in support)
    return all(2 * p == k - 1 for p, k in zip(c.padding, support, strict=True))


def plan(match: Match) -> list[Segment] | object:
    """The cheapest segments for the matched conv, or a decline saying why there are none."""
    gm, c = match.gm, conv(match.root)
    if not is_op_conv(c) or not is_same_padded_depthwise(c):
        return decline("not a stride-1, same-padded depthwise conv on batched input")
    if not owns_weights(gm, c.weight, c.bias) or val(c.node).dtype != val(c.weight).dtype:
        return decline("weight or bias is not a constant that only this conv reads")
    if {c.node, c.node.args[0], c.weight} & mutated_nodes(gm):
        return decline("a value involved is written in place")
    kernel = dense_kernel(gm, c)
    bias = constant(gm, c.bias) if c.bias is not None else None
    shape, size = hinted(val(c.node).shape), val(c.node).element_size()
    time, segments = cheapest_partition(
        runs(channel_supports(kernel, bias)), shape, bias is not None, size
    )
    if time >= SPLIT_MARGIN * node_roofline(c.node):
        return decline("cost model: no split of the channels is cheaper than the conv")
    return segments


def is_op_conv(c: Conv | None) -> bool:
    return c is not None and not c.transposed and c.node.target in CONV_OF_RANK.values()


def segment_output(gm: fx.GraphModule, c: Conv, piece: fx.Node, segment: Segment) -> fx.Node:
    """The depthwise conv of one segment on its piece of x (the piece itself for identity)."""
    if segment.support == IDENTITY:
        return piece
    kernel = dense_kernel(gm, c)[segment.start : segment.stop]
    crop = [(k - s) // 2 for k, s in zip(kernel.shape[2:], segment.support, strict=True)]
    index = [slice(a, k - a) for a, k in zip(crop, kernel.shape[2:], strict=True)]
    weight = add_constant(gm, kernel[(..., *index)].contiguous(), "split_dw")
    bias = None
    if c.bias is not None:
        bias = add_constant(gm, constant(gm, c.bias)[segment.start : segment.stop], "split_dw_bias")
    rank, channels = len(segment.support), segment.stop - segment.start
    padding = [(s - 1) // 2 for s in segment.support]
    args = (piece, weight, bias, [1] * rank, padding, [1] * rank, channels)
    return call(gm, CONV_OF_RANK[rank], args)


def split_kernels(match: Match) -> fx.Node:
    gm, c = match.gm, conv(match.root)
    segments, x = match.plan, c.node.args[0]
    if len(segments) == 1:
        return segment_output(gm, c, x, segments[0])
    sizes = [s.stop - s.start for s in segments]
    split = call(gm, aten.split_with_sizes.default, (x, sizes, 1))
    outputs = []
    for i, segment in enumerate(segments):
        piece = call(gm, operator.getitem, (split, i))
        outputs.append(segment_output(gm, c, piece, segment))
    return call(gm, aten.cat.default, (outputs, 1))


def depthwise_conv(node: fx.Node) -> tuple[fx.Node] | None:
    return (node,) if is_op_conv(conv(node)) else None


RULES = [
    # dw_K(x) with small per-channel supports  =>  cat(x[a:b], dw_3x3(x[b:c]), dw_1xk(x[c:d]), ...)
    Rule("split-dw-kernel", pattern=depthwise_conv, check=plan, build=split_kernels),
]


@register_pass("split_channel_kernels", exact=True)
def split_channel_kernels(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
