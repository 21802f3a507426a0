"""Follow one tensor axis through layout ops (transpose, permute, view, flatten, mean or adaptive
average pooling over other axes), so a per-channel rewrite can see through the reshapes between
two ops."""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import arg, is_op, val

aten = torch.ops.aten

RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)
# Averages over windows: a per-channel affine map commutes with them (the weights sum to 1).
CHANNEL_AVERAGES = (aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d)
LAYOUT_OPS = (
    *RESHAPES,
    aten.transpose,
    aten.permute,
    aten.mean,
    aten.contiguous,
    aten.clone,
    *CHANNEL_AVERAGES,
)


def follow_axis(node: fx.Node, axis: int) -> int | None:
    """Where axis `axis` of `node`'s first input lands in its output, or None when the op
    mixes that axis with others or reduces it (a per-channel map would then not commute)."""
    source, out = val(node.args[0]), val(node)
    if source is None or out is None or not is_op(node, *LAYOUT_OPS):
        return None
    if is_op(node, aten.contiguous, aten.clone):
        return axis
    if is_op(node, aten.transpose):
        a, b = (d % source.dim() for d in node.args[1:3])
        return b if axis == a else a if axis == b else axis
    if is_op(node, aten.permute):
        return [d % source.dim() for d in node.args[1]].index(axis)
    if is_op(node, aten.mean):
        return _after_mean(node, source.dim(), axis)
    if is_op(node, *CHANNEL_AVERAGES):
        spatial = len(arg(node, 1, "output_size"))
        return axis if axis < source.dim() - spatial else None
    return _after_reshape(list(source.shape), list(out.shape), axis)


def _after_mean(node: fx.Node, ndim: int, axis: int) -> int | None:
    dims = arg(node, 1, "dim")
    if dims is None or arg(node, 3, "dtype") is not None:
        return None
    reduced = {d % ndim for d in dims}
    if axis in reduced:
        return None
    return axis if arg(node, 2, "keepdim", False) else axis - sum(d < axis for d in reduced)


def _after_reshape(source: list, out: list, axis: int) -> int | None:
    before = math.prod(source[:axis])
    for k, size in enumerate(out):
        if _known_equal(math.prod(out[:k]), before) and _known_equal(size, source[axis]):
            return k
    return None


def _known_equal(a, b) -> bool:
    return bool(statically_known_true(a == b)) if not isinstance(a == b, bool) else a == b


# Ops whose second argument is read for its shape only (LeViT: `bn(x.flatten(0, 1)).reshape_as(x)`).
SHAPE_OF_SECOND = (aten.reshape_as, aten.view_as, aten.expand_as)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values, not only its shape."""
    return [
        user
        for user in node.users
        if not (is_op(user, *SHAPE_OF_SECOND) and user.args[0] is not node)
        and not is_op(user, aten.sym_size)
    ]


def chain_back(node: fx.Node, stop: tuple) -> list[fx.Node] | None:
    """From `node`'s first input, walk back through layout ops that only it reads (uses of
    their shape aside) to an op in `stop`: returns [stop_node, layout ops..., node], or None."""
    chain = [node]
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node) and len(value_users(current)) == 1:
        chain.insert(0, current)
        if is_op(current, *stop):
            return chain
        if not is_op(current, *LAYOUT_OPS):
            return None
        current = current.args[0]
    return None


def axis_through(chain: list[fx.Node], axis: int) -> int | None:
    """Follow `axis` of `chain[0]`'s output through the layout ops `chain[1:-1]`."""
    for node in chain[1:-1]:
        axis = follow_axis(node, axis)
        if axis is None:
            return None
    return axis
