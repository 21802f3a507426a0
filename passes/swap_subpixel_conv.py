"""swap_subpixel_conv: conv_transpose2d(stride r)  <=>  conv2d -> pixel_shuffle(r), the cheaper.

A stride-r transposed conv writes output row Y = rX + a - p from input row X and kernel tap a.
Split the output rows by phase s = Y mod r: row rQ + s reads x[Q + m_s - j] through tap
a = rj + t_s, where s + p = r m_s + t_s. Every phase is a plain (correlation) conv of x with the
taps a = t_s, t_s + r, ... reversed, all phases read the same input window once a common kernel
size K and padding P are chosen, and pixel_shuffle(r) interleaves the r*r phase channels back into
rows and columns. The other way, conv2d(K, padding P) -> pixel_shuffle(r) is the transposed conv
with the r*K kernel whose taps interleave the phases, padding r(K - 1 - P), output_padding 0.
Both directions use one 0/1 tap map (phase, conv tap, transposed tap), so each weight entry is
copied, never summed with another.
Exact: yes; each output is the same sum of the same products (padded taps are zero).
Declines when: the stride differs between H and W or is 1; the dilation is not 1; the output
length (H - 1)r - 2p + k + output_padding is not a multiple of r (pixel_shuffle cannot produce
it); the input is not batched 4-D; a weight or bias is not an owned constant; the conv feeding
pixel_shuffle has another user, a stride, dilation or padding larger than its kernel; a value is
written in place; or the cost model says the other form is not cheaper.
Cost rule: `roofline` of each form, a transposed conv's FLOPs counted 1 + 8 / (output channels
per group) times: PyTorch's CPU transposed conv reaches a fraction of a plain conv's FLOP rate
when it has few output channels, about the same with 64. Measured on one core (PyTorch 2.13,
interleaved medians, 2-3 runs on a loaded machine; sub-pixel time / transposed time, K from
this pass, so the sub-pixel conv carries the zero taps):
    56 -> 1, k=9, r=2 (FSRCNN), 32x32: 0.05-0.31   64x64: 0.32-0.36      model: sub-pixel
    32 -> 1, k=9, r=3, 32x32: 0.02-0.13   32 -> 3, k=8, r=4: 0.05-0.52  model: sub-pixel
    32 -> 8, k=6, r=2, 32x32: 0.69-0.74                                  model: sub-pixel
    16 -> 16, k=2, r=2, 64x64: 0.86-1.04 (a tie)                         model: transposed
    64 -> 64, k=2, r=2, 16x16: 1.40   32x32: 0.94;  32 -> 32, 32x32: 1.10  model: transposed
    64 -> 64, k=4, p=1, r=2 (DCGAN), 32x32: 1.16-1.38                     model: transposed
So FSRCNN-style upsamplers (few output channels) become sub-pixel convs, ESPCN's conv +
pixel_shuffle stays, and U-Net's wide 1x1 conv + pixel_shuffle becomes a 2x2 transposed conv;
the crossover is near 16 output channels per group.
Reference: Shi et al. 2016 (ESPCN), "Is the deconvolution layer the same as a convolutional
layer?" (Shi et al. 2016).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import Cost, call_overhead, conv_cost, hinted, roofline
from fxopt.ir.graph import add_constant, call, constant, is_op, mutated_nodes, owns_weights, val
from fxopt.ir.ops import Conv, conv
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
# A transposed conv's FLOPs cost 1 + SLOWDOWN / (output channels per group) plain-conv FLOPs on
# CPU: about 9x with one output channel, near 1x with 64 (fitted to the table above).
TRANSPOSED_CONV_SLOWDOWN = 8.0


@dataclass(frozen=True)
class Taps:
    """One spatial dim of the identity: a conv of size `size`, symmetric padding `padding`,
    and `table[s, u, a] = 1` where phase s's conv tap u is the transposed conv's tap a."""

    size: int
    padding: int
    table: torch.Tensor


def phase_taps(k: int, r: int, p: int, output_padding: int) -> Taps | None:
    """The sub-pixel conv of one dim of conv_transpose(kernel k, stride r, padding p), or None
    when its output length is not a multiple of r."""
    if (k - 2 * p + output_padding) % r:
        return None
    shifts = [divmod(s + p, r) for s in range(r)]  # (m_s, t_s)
    counts = [max(0, math.ceil((k - t) / r)) for _, t in shifts]
    live = [(m, n) for (m, _), n in zip(shifts, counts, strict=True) if n]
    left = max(n - 1 - m for m, n in live)
    size = left + max(m for m, _ in live) + 1
    right = (k - 2 * p + output_padding) // r - 2 - left + size
    padding = max(left, right, 0)
    size += (padding - left) + (padding - right)
    table = torch.zeros(r, size, k)
    for s, ((m, t), n) in enumerate(zip(shifts, counts, strict=True)):
        for j in range(n):
            table[s, padding + m - j, r * j + t] = 1
    return Taps(size, padding, table)


def transposed_params(size: int, padding: int, r: int) -> tuple[int, int]:
    """(kernel, padding) of the transposed conv equal to conv(size, padding) -> pixel_shuffle(r);
    its output_padding is 0."""
    return r * size, r * (size - 1 - padding)


def to_subpixel_weight(weight: torch.Tensor, groups: int, rows: Taps, cols: Taps) -> torch.Tensor:
    """conv_transpose weight (in, out / groups, k, k) => conv weight (out * r * r, in / groups,
    K, K), output channels ordered as pixel_shuffle reads them."""
    cin, per_group, *kernel = weight.shape
    dense = weight.reshape(groups, cin // groups, per_group, *kernel).transpose(1, 2)
    dense = dense.reshape(groups * per_group, cin // groups, *kernel)
    table_h, table_w = rows.table.to(weight), cols.table.to(weight)
    out = torch.einsum("oiab,xua,yvb->oxyiuv", dense, table_h, table_w)
    return out.reshape(-1, *out.shape[3:]).contiguous()


def to_transposed_weight(weight: torch.Tensor, groups: int, rows: Taps, cols: Taps) -> torch.Tensor:
    """The inverse of `to_subpixel_weight` for tables where every transposed tap is used once."""
    r = rows.table.shape[0]
    cout = weight.shape[0] // (r * r)
    phased = weight.reshape(cout, r, r, *weight.shape[1:])
    table_h, table_w = rows.table.to(weight), cols.table.to(weight)
    dense = torch.einsum("oxyiuv,xua,yvb->oiab", phased, table_h, table_w)
    per_group, cin = cout // groups, dense.shape[1] * groups
    dense = dense.reshape(groups, per_group, cin // groups, *dense.shape[2:]).transpose(1, 2)
    return dense.reshape(cin, per_group, *dense.shape[3:]).contiguous()


def transposed_time(x, weight, out, bias: bool, groups: int, element_size: int) -> float:
    """`roofline` of a transposed conv at concrete shapes, its FLOPs weighted by the penalty."""
    flops = 2 * x[0] * math.prod(x[2:]) * math.prod(weight) + (math.prod(out) if bias else 0)
    elements = math.prod(x) + math.prod(weight) + math.prod(out) + (out[1] if bias else 0)
    penalty = 1 + TRANSPOSED_CONV_SLOWDOWN / (out[1] // groups)
    cost = Cost(int(flops * penalty), element_size * elements)
    return roofline(cost, call_overhead(groups))


def subpixel_time(x, weight, out, bias: bool, groups: int, r: int, element_size: int) -> float:
    """`roofline` of conv -> pixel_shuffle(r) at concrete shapes (the shuffle copies)."""
    conv_out = [out[0], weight[0], *(n // r for n in out[2:])]
    cost = conv_cost(conv_out, weight, bias, math.prod(x), element_size)
    shuffle = Cost(math.prod(out), 2 * element_size * math.prod(out))
    return roofline(cost, call_overhead(groups)) + roofline(shuffle)


def owned(gm: fx.GraphModule, c: Conv, nodes: list[fx.Node]) -> bool | object:
    if val(c.node.args[0]).dim() != 4:
        return decline("input is not a batched 4-D tensor")
    if not owns_weights(gm, c.weight, c.bias):
        return decline("weight or bias is not a constant that only this conv reads")
    if set(nodes) & mutated_nodes(gm):
        return decline("a value involved is written in place")
    return True


def subpixel_plan(c: Conv) -> tuple[Taps, Taps] | None:
    r = c.stride[0]
    kernel = val(c.weight).shape[2:]
    plans = [
        phase_taps(k, r, p, op)
        for k, p, op in zip(kernel, c.padding, c.output_padding, strict=True)
    ]
    return None if None in plans else tuple(plans)


def can_make_subpixel(match: Match):
    """The phase taps of the sub-pixel form (rows, cols), or a `decline`."""
    c = conv(match.root)
    if not c.transposed or val(c.weight).dim() != 4:
        return decline("not a transposed conv2d with a 4-D weight (the input is not batched 4-D)")
    if len(set(c.stride)) != 1 or c.stride[0] < 2 or any(d != 1 for d in c.dilation):
        return decline(
            f"stride {c.stride}, dilation {c.dilation}: needs one stride r >= 2 and dilation 1"
        )
    if subpixel_plan(c) is None:
        return decline("output size is not a multiple of the stride: no pixel_shuffle form")
    ok = owned(match.gm, c, [match.root, c.node.args[0]])
    if not ok:
        return ok
    x, out = hinted(val(c.node.args[0]).shape), hinted(val(c.node).shape)
    rows, cols = subpixel_plan(c)
    w = val(c.weight).shape
    subpixel_weight = (w[1] * c.groups * c.stride[0] ** 2, w[0] // c.groups, rows.size, cols.size)
    bias, size = c.bias is not None, val(c.node).element_size()
    old = transposed_time(x, tuple(w), out, bias, c.groups, size)
    if subpixel_time(x, subpixel_weight, out, bias, c.groups, c.stride[0], size) >= old:
        return decline("cost model: conv + pixel_shuffle is not cheaper")
    return rows, cols


def make_subpixel(match: Match) -> fx.Node:
    gm, c = match.gm, conv(match.root)
    r, (rows, cols) = c.stride[0], match.plan
    weight = to_subpixel_weight(constant(gm, c.weight), c.groups, rows, cols)
    bias = None
    if c.bias is not None:
        bias = add_constant(gm, constant(gm, c.bias).repeat_interleave(r * r), "subpixel_bias")
    padding = [rows.padding, cols.padding]
    args = (c.node.args[0], add_constant(gm, weight, "subpixel"), bias, [1, 1], padding)
    return call(
        gm,
        aten.pixel_shuffle.default,
        (call(gm, aten.conv2d.default, (*args, [1, 1], c.groups)), r),
    )


def padding_of(c: Conv) -> tuple[int, ...] | None:
    """The conv's padding as numbers, or None for an even kernel's "same" padding."""
    kernel = val(c.weight).shape[2:]
    if c.padding == "valid":
        return (0, 0)
    if c.padding == "same":
        return tuple((k - 1) // 2 for k in kernel) if all(k % 2 for k in kernel) else None
    return tuple(c.padding)


def transposed_plan(c: Conv, r: int) -> tuple[Taps, Taps] | None:
    kernel = val(c.weight).shape[2:]
    padding = padding_of(c)
    if padding is None or any(p > k - 1 for p, k in zip(padding, kernel, strict=True)):
        return None
    params = [transposed_params(k, p, r) for k, p in zip(kernel, padding, strict=True)]
    return tuple(phase_taps(k, r, p, 0) for k, p in params)


def transposed_padding(c: Conv, r: int) -> list[int]:
    kernel = val(c.weight).shape[2:]
    return [transposed_params(k, p, r)[1] for k, p in zip(kernel, padding_of(c), strict=True)]


def can_make_transposed(match: Match):
    """The phase taps of the transposed form (rows, cols), or a `decline`."""
    c, shuffle = conv(match[0]), match.root
    r = shuffle.args[1]
    if not is_op(c.node, aten.conv2d):
        return decline("the op before pixel_shuffle is not a conv2d")
    if len(c.node.users) != 1:
        return decline("the conv feeding pixel_shuffle has another user")
    if not isinstance(r, int):
        return decline("the upscale factor is not a constant")
    if any(s != 1 for s in c.stride) or any(d != 1 for d in c.dilation):
        return decline("the conv before pixel_shuffle is strided or dilated")
    if transposed_plan(c, r) is None:
        return decline("conv padding is not symmetric within its kernel")
    ok = owned(match.gm, c, [c.node, shuffle, c.node.args[0]])
    if not ok:
        return ok
    if c.bias is not None and phase_bias(match.gm, c, r) is None:
        return decline("the conv bias differs between the phases of one output channel")
    x, out = hinted(val(c.node.args[0]).shape), hinted(val(shuffle).shape)
    w, (rows, cols) = val(c.weight).shape, transposed_plan(c, r)
    kernel = (rows.table.shape[2], cols.table.shape[2])
    transposed_weight = (w[1] * c.groups, w[0] // (r * r * c.groups), *kernel)
    bias, size = c.bias is not None, val(shuffle).element_size()
    new = transposed_time(x, transposed_weight, out, bias, c.groups, size)
    if new >= subpixel_time(x, tuple(w), out, bias, c.groups, r, size):
        return decline("cost model: conv_transpose2d is not cheaper")
    return rows, cols


def phase_bias(gm: fx.GraphModule, c: Conv, r: int) -> torch.Tensor | None:
    """The transposed conv's bias: one value per output channel, the same for every phase."""
    bias = constant(gm, c.bias)
    per_channel = bias.reshape(-1, r * r)
    return per_channel[:, 0] if bool((per_channel == per_channel[:, :1]).all()) else None


def make_transposed(match: Match) -> fx.Node | None:
    gm, c, r = match.gm, conv(match[0]), match.root.args[1]
    rows, cols = match.plan
    weight = to_transposed_weight(constant(gm, c.weight), c.groups, rows, cols)
    bias = None
    if c.bias is not None:
        bias = add_constant(gm, phase_bias(gm, c, r), "transposed_bias")
    padding = transposed_padding(c, r)
    args = (c.node.args[0], add_constant(gm, weight, "transposed"), bias, [r, r], padding)
    return call(gm, aten.conv_transpose2d.input, (*args, [0, 0], c.groups, [1, 1]))


def transposed_conv(node: fx.Node) -> tuple[fx.Node] | None:
    c = conv(node)
    return (node,) if c is not None and c.transposed else None


RULES = [
    # conv_transpose(x, stride r)  =>  pixel_shuffle(conv(x, phase kernels), r)
    Rule("transposed-to-subpixel", transposed_conv, can_make_subpixel, make_subpixel),
    # pixel_shuffle(conv(x), r)  =>  conv_transpose(x, interleaved kernel, stride r)
    Rule(
        "subpixel-to-transposed",
        (aten.conv2d, aten.pixel_shuffle),
        can_make_transposed,
        make_transposed,
    ),
]


@register_pass("swap_subpixel_conv", exact=True)
def swap_subpixel_conv(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
