"""sparsify_dilated_kernels: conv whose kernel is zero off a grid  =>  smaller conv, dilated.

Per spatial axis, the nonzero taps of a dense K-tap kernel sit at lo, lo + d, ..., hi (the
coarsest such grid: d is the gcd of their offsets from lo); the k = (hi - lo) / d + 1 taps on the
grid become the kernel of a conv at dilation d * D (D the conv's own dilation). A grid offset
inside the kernel, or zero rows and columns at its edges, move the padding: the left padding p
becomes p - lo * D and the right padding p_r becomes p_r - (K - 1 - hi) * D.
Exact: yes; output position y reads x_pad[y s + t D] for the taps t = lo + j d, the same inputs
as before, in the same order of taps, with zeros dropped; zero padding reads zero either way.
The smaller conv takes symmetric padding, so it gets the new left padding on both sides when
that gives the same number of outputs (the positions read past the input's end are zeros in
both forms); "same" padding stays "same" when the new kernel centres the same way.
Declines when: the conv is transposed or an `aten.convolution`, the weight or bias is not a
constant or is shared, an input or weight is written in place, the grid would need padding
below zero (taps at the kernel's start that the padding does not reach) or asymmetric padding
that changes the output size, or the smaller conv costs more.
Cost rule: `fxopt.cost.roofline` of the dilated conv against the dense one; the dilated conv
does k^2 / K^2 of the FLOPs. Measured (one thread, medians of interleaved runs, dilated / dense
time): depthwise 64 channels at 56x56: 3x3 d 2 0.90, 3x3 d 3 0.91, 5x5 d 3 0.60; at 14x14: 3x3
d 2 0.95, 7x7 d 3 0.08; 3 channels at 64x64, 3x3 d 2 0.84; dense 32->32 at 32x32: 3x3 d 2 0.46,
3x3 d 3 0.12, 5x5 d 2 0.16; 16->16 at 16x16, 3x3 d 2 0.82; 64->64 at 56x56, 3x3 d 2 0.37;
8->8 at 64x64, 3x3 d 4 0.11. PyTorch's dilated convs were never slower on this CPU, so there
is no crossover: the model always agrees to sparsify (fewer FLOPs, same bytes).
Not undone by merge_parallel_convs, which only merges sums of two or more branches and keeps
a common dilation itself; the default pipeline run twice with this pass reaches a fixed point.
Reference: UniRepLKNet's dilated reparam read backwards; DCLS.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxopt.analysis.cost import hinted, node_roofline
from fxopt.analysis.decompose_math import Grid, conv_price, grid_kernel, out_size, tap_grid
from fxopt.ir.graph import add_constant, call, constant, is_op, mutated_nodes, owns_weights, val
from fxopt.ir.ops import CONVS, Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite


def sparse_conv(node: fx.Node) -> tuple[fx.Node] | None:
    """A conv whose constant kernel has a zero edge or zeros between taps on a grid."""
    if not is_op(node, *CONVS):
        return None
    weight = constant(node.graph.owning_module, node.args[1])
    grid = tap_grid(weight) if weight is not None and weight.dim() > 2 else None
    if grid is None:
        return None
    full = all(
        a == 0 and b == k - 1 and s == 1
        for a, b, s, k in zip(grid.start, grid.stop, grid.step, weight.shape[2:], strict=True)
    )
    return None if full else (node,)


def paddings(c: Conv, kernel: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """(left, right) zero padding per spatial axis; None for "same" with a stride."""
    if c.padding == "valid":
        return [(0, 0)] * len(kernel)
    if c.padding == "same":
        if any(s != 1 for s in c.stride):
            return None
        totals = [d * (k - 1) for d, k in zip(c.dilation, kernel, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in c.padding]


def plan(gm: fx.GraphModule, node: fx.Node) -> tuple[Grid, list[int] | str, list[int]] | Declined:
    """The grid, the smaller conv's padding and dilation, or why the conv stays dense."""
    c = conv(node)
    weight = constant(gm, c.weight)
    if c.transposed or not owns_weights(gm, c.weight, c.bias):
        return decline("the weight or bias is not a constant or is read by another op")
    if {node, node.args[0], c.weight} & mutated_nodes(gm):
        return decline("the input or weight is written in place")
    grid, kernel = tap_grid(weight), tuple(weight.shape[2:])
    pads = paddings(c, kernel)
    if pads is None:
        return decline("'same' padding with a stride")
    lengths = hinted(val(node.args[0]).shape)[-len(kernel) :]
    new_padding, dilation, centred = [], [], c.padding == "same"
    for axis, (k, d) in enumerate(zip(kernel, c.dilation, strict=True)):
        lo, hi, step = grid.start[axis], grid.stop[axis], grid.step[axis]
        left, right = pads[axis][0] - lo * d, pads[axis][1] - (k - 1 - hi) * d
        new_dilation = d * step if hi > lo else 1
        extent = d * (hi - lo) + 1
        before = out_size(lengths[axis], *pads[axis], d * (k - 1) + 1, c.stride[axis])
        if left < 0 or out_size(lengths[axis], left, left, extent, c.stride[axis]) != before:
            return decline(f"taps {lo}..{hi} of {k} need padding ({left}, {right})")
        new_padding.append(left)
        dilation.append(new_dilation)
        centred = centred and left == (extent - 1) // 2  # "same" pads (extent - 1) in total
    if price(node, c, grid, weight) > node_roofline(node):
        return decline("the dilated conv costs more than the dense one")
    return grid, "same" if centred else new_padding, dilation


def price(node: fx.Node, c: Conv, grid: Grid, weight: torch.Tensor) -> float:
    x, out = hinted(val(node.args[0]).shape), hinted(val(node).shape)
    if len(out) == weight.dim() - 1:  # an unbatched conv
        x, out = [1, *x], [1, *out]
    shape = grid_kernel(weight, grid).shape
    size = val(node).element_size()
    return conv_price(out, shape, math.prod(x), c.bias is not None, c.groups, size)


def can_sparsify(match: Match) -> tuple[Grid, list[int] | str, list[int]] | Declined:
    return plan(match.gm, match.root)


def sparsify(match: Match) -> fx.Node:
    gm, node = match.gm, match.root
    (grid, padding, dilation), c = match.plan, conv(node)
    weight = add_constant(gm, grid_kernel(constant(gm, c.weight), grid), "dilated")
    packet = node.target.overloadpacket
    target = packet.padding if isinstance(padding, str) else packet.default
    args = (node.args[0], weight, c.bias, list(c.stride), padding, dilation, c.groups)
    return call(gm, target, args)


RULES = [
    # conv K x K, zero off a grid of step d  =>  conv k x k at dilation d
    Rule("sparsify-dilated", pattern=sparse_conv, check=can_sparsify, build=sparsify),
]


@register_pass("sparsify_dilated_kernels", exact=True)
def sparsify_dilated_kernels(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
