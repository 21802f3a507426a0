"""split_separable_kernels: conv kh x kw of low rank  =>  conv 1 x kw -> conv kh x 1 (or reverse).

Each group's kernel, read as the matrix M[(o, h), (i, w)], has numerical rank R (SVD in float64;
singular values dropped while their Frobenius norm stays within 4 units of roundoff of |M|, less
than storing the kernel in its dtype already moves it). M = A B with A (o h, R), B (R, i w) makes
conv 1 x kw from in / g to R channels per group (groups g, kernel B), then conv kh x 1 from R to
out / g per group (kernel A, groups g, the bias). A depthwise conv is the case in / g = 1: a
channel multiplier R, then groups = channels with R inputs each. With the roles of h and w
swapped (kh x 1 first) the rank may differ; the cheaper order is taken.
Exact: yes, up to rounding. Padding, stride and dilation split per axis: the first conv pads,
strides and dilates only along its axis, the second only along the other, so output (y, x) of
the pair is sum over (h, w) of A[h] B[w] x_pad[y s_h + h d_h, x s_w + w d_w], as before. At the
borders: the first conv has no bias and reads every row of x (no row padding), so the rows the
second conv pads with zeros are exactly the rows of zeros the original padding adds (a zero row
of x_pad maps to a zero row of the first conv). "same" and "valid" padding split the same way.
A reflect pad is a separate op in the graph before a padding-0 conv, so it stays exact too.
Declines when: the op is not a conv2d (transposed convs, `aten.convolution`), the kernel is
1 x k or k x 1 already, the weight or bias is not a constant or is shared, an input or weight is
written in place, the rank saves no FLOPs, or the split costs more.
Cost rule: `fxopt.cost.roofline` of each call, with the band convs' FLOPs priced by their
measured rate (`decompose_math`: 1.5x for groups = 1, 6x for depthwise, 30x for other grouped
band convs). Measured (one thread, medians of interleaved runs, split / one conv):
dense 32->32 at 32x32, 3x3: R 8 0.57, 16 0.63, 24 1.21, 32 1.16; 5x5: R 32 0.69, 48 0.88,
64 1.09; 7x7: R 64 0.75, 96 1.05; 64->64 3x3 at 28x28: R 32 0.62, 64 0.95; 5x5 rank-1..3 colour
filters 3->3 at 128x128: 0.55 / 0.78 / 0.86; Sobel x/y 3->2 (R 2): 0.81 at 64x64, 1.39 at 224.
Crossover: FLOPs of the pair near 2/3 of the square conv's; the model agrees except 3x3 R 24
(splits, 1.21) and Sobel at 64x64 (keeps, 0.81, 5 us apart). Depthwise rank 1 at 64x56x56:
7x7 1.19, 9x9 1.22, 11x11 1.12, 13x13 0.97, 17x17 0.13; 7x7 at 14x14 1.82; Gaussian 5x5 on 3x224
1.20; rank 2 or 3 with a multiplier: 9-10x. So depthwise splits only from about 13x13 (the
model: 15 and up), and never with rank > 1. Grouped, batch 2: 16->32 g 4 3x5 R 1 at 32x32 1.17,
64->64 g 4 5x5 R 2 at 32x32 1.32 (at 1/20 of the FLOPs), 64->64 g 8 7x7 R 4 at 56x56 0.69: too
erratic to price finely, so grouped splits are priced to decline (the last one is missed).
Reference: separable filters (a rank-1 kernel is an outer product); a-priori compressed CNNs.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxopt.analysis.cost import hinted, node_roofline
from fxopt.analysis.decompose_math import (
    BAND_FLOP_PENALTY,
    DEPTHWISE_BAND_FLOP_PENALTY,
    MULTIPLIER_FLOP_PENALTY,
    Factors,
    conv_price,
    group_energy,
    rank_exceeds,
    separable_factors,
)
from fxopt.ir.graph import add_constant, call, constant, is_op, mutated_nodes, owns_weights, val
from fxopt.ir.ops import Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten


def can_split(match: Match) -> Factors | Declined:
    return plan(match.gm, match.root)


def plan(gm: fx.GraphModule, node: fx.Node) -> Factors | Declined:
    """The cheaper factorization of the conv at `node`, or why it should stay one conv."""
    c = conv(node)
    weight = constant(gm, c.weight)
    if weight is None or not owns_weights(gm, c.weight, c.bias):
        return decline("the weight or bias is not a constant or is read by another op")
    out, per_group, kh, kw = weight.shape
    if {node, node.args[0], c.weight} & mutated_nodes(gm) or weight.dtype != val(node).dtype:
        return decline("the input or weight is written in place, or dtypes differ")
    no_saving = saving_limit(weight.shape, c.groups)
    settled = certain_decline(node, c, weight, no_saving)
    if settled is not None:
        return settled
    options = [separable_factors(weight, c.groups, order) for order in ("w", "h")]
    best = min(options, key=lambda f: split_price(node, c, f))
    if best.rank >= no_saving:
        return decline(f"rank {best.rank} saves no FLOPs over the {kh}x{kw} kernel")
    if split_price(node, c, best) > node_roofline(node):
        return decline(f"rank {best.rank}: two band convs cost more than one {kh}x{kw} conv")
    return best


def saving_limit(shape, groups: int) -> int:
    """The smallest rank at which the two band convs do no fewer FLOPs than the kernel."""
    out, per_group, kh, kw = shape
    out_per_group = out // groups
    return -(-out_per_group * per_group * kh * kw // (per_group * kw + out_per_group * kh))


# Ranks up to this are certified at the FLOP limit itself, so the decline says so; above it, at
# the (smaller, cheaper to certify) rank where the split starts to cost more.
CERTIFY_AT_FLOP_LIMIT = 128


def certain_decline(node: fx.Node, c: Conv, weight: torch.Tensor, no_saving: int):
    """The decline `plan` would reach, settled without an SVD where each order's rank certainly
    reaches a rank whose split saves no FLOPs or costs more (`rank_exceeds`); else None. An SVD
    of a 3x3 kernel with 512 channels takes seconds; the certificate a few tens of ms."""
    kh, kw = weight.shape[2:]
    limits = dict.fromkeys(("w", "h"), no_saving)
    if no_saving > CERTIFY_AT_FLOP_LIMIT:
        limits = {order: costly_rank(node, c, order, no_saving) for order in limits}
    energy = group_energy(weight, c.groups)  # the same for both orders
    certain = (rank_exceeds(weight, c.groups, r - 1, order, energy) for order, r in limits.items())
    if not all(certain):
        return None
    rank = min(limits.values())
    if rank == no_saving:
        return decline(f"rank {rank} or more saves no FLOPs over the {kh}x{kw} kernel")
    return decline(f"rank {rank} or more: two band convs cost more than one {kh}x{kw} conv")


def costly_rank(node: fx.Node, c: Conv, order: str, limit: int) -> int:
    """The smallest rank (at most `limit`) whose band convs in `order` cost more than the conv
    (the price grows with the rank: a binary search over factor shapes alone)."""
    out, per_group, kh, kw = val(c.weight).shape
    roof, low, high = node_roofline(node), 1, limit
    while low < high:
        rank = (low + high) // 2
        band = (1, kw) if order == "w" else (kh, 1)
        first = torch.empty(c.groups * rank, per_group, *band, device="meta")
        second = torch.empty(out, rank, *reversed(band), device="meta")
        if split_price(node, c, Factors(first, second, rank, order)) > roof:
            high = rank
        else:
            low = rank + 1
    return low


def split_price(node: fx.Node, c: Conv, factors: Factors) -> float:
    """The roofline of the two band convs, from the shapes traced at `node`."""
    x, out = hinted(val(node.args[0]).shape), hinted(val(node).shape)
    if len(out) == 3:  # an unbatched conv
        x, out = [1, *x], [1, *out]
    axis = 3 if factors.order == "w" else 2  # the axis the first conv works along
    middle = [out[0], factors.first.shape[0], *x[2:]]
    middle[axis] = out[axis]
    penalty = BAND_FLOP_PENALTY
    if c.groups > 1:  # depthwise band convs are slow, grouped ones with few channels slower
        first_shape, out_channels = factors.first.shape, factors.second.shape[0]
        depthwise = first_shape[1] == 1 and first_shape[0] == out_channels == c.groups
        penalty = DEPTHWISE_BAND_FLOP_PENALTY * (1 if depthwise else MULTIPLIER_FLOP_PENALTY)
    size = val(node).element_size()
    has_bias = c.bias is not None
    first = conv_price(middle, factors.first.shape, math.prod(x), False, c.groups, size, penalty)
    second = conv_price(
        out, factors.second.shape, math.prod(middle), has_bias, c.groups, size, penalty
    )
    return first + second


def per_axis(values, axis: int, other) -> list:
    """`values` kept along `axis` (2 = h, 3 = w) and set to `other` along the other axis."""
    return [values[0], other] if axis == 2 else [other, values[1]]


def split(match: Match) -> fx.Node | Declined:
    gm, node = match.gm, match.root
    factors, c = match.plan, conv(node)
    first_axis, second_axis = (3, 2) if factors.order == "w" else (2, 3)
    padding = c.padding

    def geometry(axis: int) -> tuple:
        pad = padding if isinstance(padding, str) else per_axis(padding, axis, 0)
        return per_axis(c.stride, axis, 1), pad, per_axis(c.dilation, axis, 1)

    first_weight = add_constant(gm, factors.first, "separable_first")
    second_weight = add_constant(gm, factors.second, "separable_second")
    target = aten.conv2d.padding if isinstance(padding, str) else aten.conv2d.default
    middle = call(gm, target, (node.args[0], first_weight, None, *geometry(first_axis), c.groups))
    return call(gm, target, (middle, second_weight, c.bias, *geometry(second_axis), c.groups))


def square_conv2d(node: fx.Node) -> tuple[fx.Node] | None:
    """A conv2d whose kernel spans two or more taps along both axes (a band conv is done)."""
    weight = val(node.args[1]) if is_op(node, aten.conv2d) else None
    return (node,) if weight is not None and min(weight.shape[2:]) >= 2 else None


RULES = [
    # conv kh x kw (rank R per group)  =>  conv 1 x kw (R per group) -> conv kh x 1, or reversed
    Rule("split-separable", pattern=square_conv2d, check=can_split, build=split),
]


@register_pass("split_separable_kernels", exact=True)
def split_separable_kernels(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
