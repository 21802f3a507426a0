"""Matchers shared by the attention passes: score matmuls, transposed keys, constant scalings.

Not a pass (it registers nothing). Every helper reads the graph and never changes it; engineer
G's `linearize_attention` may import from here too.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.ir.graph import arg, constant, is_op, mutated_nodes, val

from .preconditions import is_deterministic

aten = torch.ops.aten
MATMULS = (aten.matmul, aten.bmm)
SCALINGS = (aten.mul, aten.div)
SOFTMAXES = (aten.softmax, aten._softmax)


def is_tensor_node(node: object) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)


def scalar_value(gm: fx.GraphModule, value: object) -> float | None:
    """A Python number, or a one-element floating-point constant, as a float; else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    tensor = constant(gm, value)
    if tensor is not None and tensor.numel() == 1 and tensor.is_floating_point():
        return float(tensor.reshape(()))
    return None


def scaling(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, c) when `node` is `x * c`, `c * x` or `x / c` with a constant scalar c."""
    if not is_op(node, *SCALINGS) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_tensor_node(a) and (c := scalar_value(gm, b)) is not None:
        if is_op(node, aten.div):
            return (a, 1.0 / c) if c != 0 else None
        return a, c
    if is_op(node, aten.mul) and is_tensor_node(b) and (c := scalar_value(gm, a)) is not None:
        return b, c
    return None


def peel_scale(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]]:
    """Walk down single-user constant scalings from `node`: (base, product of factors, the
    scaling nodes walked through). The first node may have several users; the rest have one."""
    factor, walked = 1.0, []
    while (found := scaling(gm, node)) is not None:
        if walked and len(node.users) != 1:
            break
        if val(found[0]).dtype != val(node).dtype or val(found[0]).shape != val(node).shape:
            break  # a scaling that broadcasts or promotes is not a plain factor
        walked.append(node)
        node, factor = found[0], factor * found[1]
    return node, factor, walked


def swaps_last_two(node: fx.Node) -> bool:
    """Whether `node` is x transposed in its last two dimensions (transpose, mT, t, permute)."""
    out = val(node)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return False
    rank = out.dim()
    if is_op(node, aten.mT, aten.t):
        return True
    if is_op(node, aten.transpose):
        dims = {arg(node, 1, "dim0") % rank, arg(node, 2, "dim1") % rank}
        return dims == {rank - 2, rank - 1}
    if is_op(node, aten.permute):
        perm = [d % rank for d in arg(node, 1, "dims")]
        return perm == [*range(rank - 2), rank - 1, rank - 2]
    return False


@dataclass(frozen=True)
class Scores:
    """`scale * (query @ key_t)`: the N x M score matrix of an attention, before any mask."""

    node: fx.Node  # the top scaling, or the matmul when there is none
    matmul: fx.Node
    query: fx.Node
    key_t: fx.Node
    scale: float
    chain: tuple[fx.Node, ...]  # the scalings between `node` and `matmul`


def scores(gm: fx.GraphModule, node: fx.Node) -> Scores | None:
    """`node` as constant scalings of a `query @ key_t` matmul of two tensors of rank >= 2 and
    one dtype, or None."""
    base, factor, chain = peel_scale(gm, node)
    if not is_op(base, *MATMULS) or (chain and len(base.users) != 1):
        return None
    query, key_t = base.args[:2]
    if not (is_tensor_node(query) and is_tensor_node(key_t)):
        return None
    q, k = val(query), val(key_t)
    if q.dim() < 2 or k.dim() < 2 or q.dtype != k.dtype or q.dtype != val(base).dtype:
        return None
    if not q.is_floating_point():
        return None
    return Scores(node, base, query, key_t, factor, tuple(chain))


def constant_value(gm: fx.GraphModule, node: object, depth: int = 8) -> torch.Tensor | None:
    """The value of `node` when it is a constant or a short chain of deterministic ATen ops on
    constants and literals (`ones(n, n).triu(1)` written in forward), computed now; else None."""
    tensor = constant(gm, node)
    if tensor is not None or not isinstance(node, fx.Node) or depth == 0:
        return tensor
    if node.op != "call_function" or not is_deterministic(node) or node in mutated_nodes(gm):
        return None
    values = {}
    for source in node.all_input_nodes:
        values[source] = constant_value(gm, source, depth - 1)
        if values[source] is None:
            return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    result = node.target(*args, **kwargs)
    return result if isinstance(result, torch.Tensor) else None


def reads_input(node: fx.Node) -> bool:
    """Whether `node` depends on a graph input: its value is known only at run time."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        if current not in seen:
            seen.add(current)
            stack += current.all_input_nodes
    return False


def reads_scores(node: fx.Node, top: fx.Node) -> bool:
    """`top @ V` or `top.sum(-1)`: a user the rewrite knows how to replace."""
    if is_op(node, *MATMULS):
        return node.args[0] is top and node.args[1] is not top and is_tensor_node(node.args[1])
    if is_op(node, aten.sum) and len(node.args) >= 2 and node.args[0] is top:
        rank, dims = val(top).dim(), node.args[1]
        same_dtype = arg(node, 3, "dtype") is None
        return (
            same_dtype and isinstance(dims, list | tuple) and [d % rank for d in dims] == [rank - 1]
        )
    return False


def is_constant(node: fx.Node) -> bool:
    """A weight or buffer: attention reads activations on all three sides."""
    return node.op == "get_attr"


def matmul_values(users: tuple[fx.Node, ...]) -> list[fx.Node]:
    """The V of each `scores @ V` among `users`."""
    return [u.args[1] for u in users if is_op(u, *MATMULS)]


def causal_mask_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """x when `node` keeps the lower triangle of x (tril, a 0/1 mask, masked_fill with 0)."""
    out = val(node)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    rows, cols = out.shape[-2:]
    if not isinstance(rows, int) or not isinstance(cols, int) or rows != cols:
        return None
    lower = torch.ones(rows, cols, dtype=torch.bool).tril()
    if is_op(node, aten.tril) and arg(node, 1, "diagonal", 0) == 0:
        return node.args[0]
    if is_op(node, aten.mul) and len(node.args) == 2:
        for x, m in (node.args, node.args[::-1]):
            mask = constant_value(gm, m)
            if mask is not None and is_tensor_node(x) and mask.shape[-2:] == (rows, cols):
                if mask.numel() == rows * cols and bool((mask.reshape(rows, cols) == lower).all()):
                    return x if val(x).shape == out.shape and val(x).dtype == out.dtype else None
    if is_op(node, aten.masked_fill) and scalar_value(gm, node.args[2]) == 0:
        mask = constant_value(gm, node.args[1])
        if mask is not None and mask.numel() == rows * cols:
            return node.args[0] if bool((mask.reshape(rows, cols) == ~lower).all()) else None
    return None
