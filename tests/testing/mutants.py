"""Deliberately broken passes, each next to the correct rewrite it breaks, for proving that
`check_pass` catches real bugs.

- `fold_conv_bn_without_eps`: fold_conv_bn with eps forced to 0 in `bn_scale_shift`.
- `merge_conv_pair(ignore_dilation=True)`: conv_a(x) + conv_b(x) merged into one conv whose
  kernel holds a dilated kernel's taps side by side.
- `merge_conv_pair(tap_offset=1)`: the same merge, centring the smaller kernel one tap off.
- `fold_bn_into_padded_conv`: fold_bn_into_next believing a zero padding of 1 is harmless.
- `reassociate_attention(through_softmax=True)`: (q @ k^T * s) @ v => q @ (k^T @ v) * s, also
  where a softmax sits in between, as a naive linear-attention rewrite would.

`merge_conv_pair()` and `reassociate_attention()` with their defaults are correct.
"""

from __future__ import annotations

from unittest import mock

import torch
from torch import fx

import fxopt.passes.fold_bn_into_next as bn_into_next
import fxopt.passes.fold_conv_bn as conv_bn
from fxopt.analysis.affine import bn_scale_shift
from fxopt.ir.graph import add_constant, call, constant, is_op, val
from fxopt.ir.ops import conv
from fxopt.rules.rewrite import Match, PassResult, Rule, rewrite

aten = torch.ops.aten
PLAIN_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)


def fold_conv_bn_without_eps(gm: fx.GraphModule) -> PassResult:
    """Mutant: s = gamma / sqrt(var) instead of gamma / sqrt(var + eps)."""

    def without_eps(mean, var, weight, bias, eps):
        return bn_scale_shift(mean, var, weight, bias, 0.0)

    with mock.patch.object(conv_bn, "bn_scale_shift", without_eps):
        return conv_bn.fold_conv_bn(gm)


def fold_bn_into_padded_conv(gm: fx.GraphModule) -> PassResult:
    """Mutant: the border taps of a conv padded by 1 read 0, not the normalized zero."""

    def padding_at_most_one(c, kernel) -> bool:
        return not isinstance(c.padding, str) and max(c.padding) <= 1

    with mock.patch.object(bn_into_next, "can_skip_padding", padding_at_most_one):
        return bn_into_next.fold_bn_into_next(gm)


def merge_kernels(
    weights: list[torch.Tensor],
    paddings: list[tuple[int, ...]],
    dilations: list[tuple[int, ...]],
    ignore_dilation: bool = False,
    tap_offset: int = 0,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(kernel, padding) of one dilation-1 conv computing sum_i conv(x, weights[i]) at
    paddings[i] and dilations[i]: tap t of kernel i lands at P - p_i + d_i * t, P = max p_i.
    The mutations: taps packed side by side (`ignore_dilation`), the narrowest kernel moved by
    `tap_offset` taps where it still fits."""
    dims = weights[0].dim() - 2
    kernels = [w.shape[2:] for w in weights]
    spans = [
        [d[a] * (k[a] - 1) for a in range(dims)] for k, d in zip(kernels, dilations, strict=True)
    ]
    pad = tuple(max(p[a] for p in paddings) for a in range(dims))
    size = [
        pad[a] + 1 + max(s[a] - p[a] for s, p in zip(spans, paddings, strict=True))
        for a in range(dims)
    ]
    merged = weights[0].new_zeros(*weights[0].shape[:2], *size)
    narrowest = min(range(len(weights)), key=lambda i: sum(spans[i]))
    for i, (weight, padding, dilation) in enumerate(zip(weights, paddings, dilations, strict=True)):
        step = (1,) * dims if ignore_dilation else dilation
        start = [pad[a] - padding[a] for a in range(dims)]
        if i == narrowest and all(
            start[a] + spans[i][a] + tap_offset < size[a] for a in range(dims)
        ):
            start = [first + tap_offset for first in start]
        taps = [
            slice(start[a], start[a] + step[a] * (kernels[i][a] - 1) + 1, step[a])
            for a in range(dims)
        ]
        merged[(..., *taps)] += weight
    return merged, pad


def conv_pair(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """Pattern: add(conv_a(x), conv_b(x)) on one input, no alpha."""
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a is b or not (is_op(a, *PLAIN_CONVS) and is_op(b, *PLAIN_CONVS)):
        return None
    return (a, b, node) if a.args[0] is b.args[0] else None


def can_merge(match: Match) -> bool:
    gm, (a, b, add) = match.gm, match.nodes
    ca, cb = conv(a), conv(b)
    if len(a.users) != 1 or len(b.users) != 1:
        return False
    if isinstance(ca.padding, str) or isinstance(cb.padding, str):
        return False
    if ca.stride != cb.stride or ca.groups != cb.groups:
        return False
    wa, wb = constant(gm, ca.weight), constant(gm, cb.weight)
    if wa is None or wb is None or wa.shape[:2] != wb.shape[:2]:
        return False
    if any(c.bias is not None and constant(gm, c.bias) is None for c in (ca, cb)):
        return False
    return val(a).shape == val(b).shape == val(add).shape


def merge(match: Match, ignore_dilation: bool, tap_offset: int) -> fx.Node | None:
    gm, (a, b, add) = match.gm, match.nodes
    convs = [conv(a), conv(b)]
    weights = [constant(gm, c.weight) for c in convs]
    paddings, dilations = [c.padding for c in convs], [c.dilation for c in convs]
    kernel, pad = merge_kernels(weights, paddings, dilations, ignore_dilation, tap_offset)
    sizes = val(add).shape[2:]
    stride = convs[0].stride
    for axis, size in enumerate(val(a.args[0]).shape[2:]):
        if (size + 2 * pad[axis] - kernel.shape[2 + axis]) // stride[axis] + 1 != sizes[axis]:
            return None  # the merged conv would not line up: decline
    biases = [constant(gm, c.bias) for c in convs if c.bias is not None]
    bias = add_constant(gm, sum(biases), "merged_bias") if biases else None
    weight = add_constant(gm, kernel, "merged_weight")
    dims = kernel.dim() - 2
    args = (a.args[0], weight, bias, list(stride), list(pad), [1] * dims, convs[0].groups)
    return call(gm, a.target, args)


def merge_conv_pair(
    gm: fx.GraphModule, ignore_dilation: bool = False, tap_offset: int = 0
) -> PassResult:
    """conv_a(x) + conv_b(x)  =>  one conv with the zero-padded kernels summed (correct with
    the defaults; a mutant with `ignore_dilation` or `tap_offset`)."""
    build = lambda match: merge(match, ignore_dilation, tap_offset)  # noqa: E731
    return rewrite(gm, [Rule("conv-pair", pattern=conv_pair, check=can_merge, build=build)])


def attention_chain(through_softmax: bool):
    """Pattern: matmul(P, v), P = matmul(q, k^T), optionally * s, (mutant: optionally softmax)."""

    def pattern(node: fx.Node) -> list[fx.Node] | None:
        if not is_op(node, aten.matmul):
            return None
        chain, scores = [node], node.args[0]
        if through_softmax and is_op(scores, aten.softmax, aten._softmax):
            chain.insert(0, scores)
            scores = scores.args[0]
        if is_op(scores, aten.mul.Tensor) and isinstance(scores.args[1], int | float):
            chain.insert(0, scores)
            scores = scores.args[0]
        return [scores, *chain] if is_op(scores, aten.matmul) else None

    return pattern


def reassociate(match: Match) -> fx.Node:
    gm, (product, *rest) = match.gm, match.nodes
    q, k_t = product.args[:2]
    out = call(
        gm, aten.matmul.default, (q, call(gm, aten.matmul.default, (k_t, match.root.args[1])))
    )
    for node in rest:
        if is_op(node, aten.mul.Tensor):
            out = call(gm, aten.mul.Tensor, (out, node.args[1]))
    return out


def reassociate_attention(gm: fx.GraphModule, through_softmax: bool = False) -> PassResult:
    """(q @ k^T [* s]) @ v  =>  q @ (k^T @ v) [* s]: exact without a softmax in between."""
    rule = Rule("reassociate", pattern=attention_chain(through_softmax), build=reassociate)
    return rewrite(gm, [rule])
