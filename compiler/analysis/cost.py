"""The cost model: FLOPs and bytes per ATen op at concrete shapes, op counts and parameters.

`static_cost` prices nodes in the graph; `conv_cost` and `linear_cost` price, the same way, an op
a rewrite plans to create (every pass that compares the two asks them, not a copy of them).

A multiply-add counts as two FLOPs. Shapes are the ones the graph records (`meta["val"]`) with
its symbolic sizes bound to the inputs' sizes, or, where a node records none, those of one run of
the graph on the inputs; symbolic batch sizes never leak into the numbers.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils import _pytree as pytree

from ..ir import block_ops
from ..ir.graph import constant, constants, is_op

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_TRANSPOSED = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
_MATMULS = (aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm)
_FREE = (
    aten.view,
    aten.reshape,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.expand,
    aten.unsqueeze,
    aten.squeeze,
    aten.flatten,
    aten.slice,
    aten.select,
    aten.alias,
    aten.detach,
    aten.unflatten,
    aten.sym_size,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.unbind,
    aten.dropout,
    aten.contiguous,
    aten.lift_fresh_copy,
)
_IGNORED = {operator.getitem, "sym_size", "_assert_tensor_metadata"}  # bookkeeping, not compute


@dataclass(frozen=True)
class Stats:
    op_counts: dict[str, int]
    params: int
    flops: int


def op_name(node: fx.Node) -> str:
    """The op's name: "conv2d" for ATen ops, "namespace::name" for others ("fxopt::dw_pw_block")."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        namespace = getattr(node.target, "namespace", "aten")
        return packet.__name__ if namespace == "aten" else f"{namespace}::{packet.__name__}"
    return getattr(node.target, "__name__", str(node.target))


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each ATen op is called, shape bookkeeping left out."""
    counts = Counter(
        op_name(n)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in _IGNORED and op_name(n) not in _IGNORED
    )
    return dict(sorted(counts.items()))


def param_count(gm: fx.GraphModule) -> int:
    """Elements of all floating-point constants the graph reads (weights, biases, statistics)."""
    return sum(t.numel() for t in constants(gm) if t.is_floating_point())


def concrete_values(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, object]:
    """Run `gm` once and keep every node's output (for shapes)."""
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            values[node] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def node_flops(node: fx.Node, values: dict) -> int:
    """FLOPs of one call at the recorded shapes; 0 for free ops and non-tensor results."""
    out = values.get(node)
    if node.op != "call_function" or not isinstance(out, torch.Tensor):
        return 0
    if is_op(node, *_FREE):
        return 0
    args = [values.get(a) if isinstance(a, fx.Node) else a for a in node.args]
    if is_op(node, *_CONVS, *_TRANSPOSED):
        weight, bias = args[1], args[2] if len(args) > 2 else None
        transposed = is_op(node, *_TRANSPOSED) or (is_op(node, aten.convolution) and args[6])
        spatial = args[0].shape[2:] if transposed else out.shape[2:]
        macs = out.shape[0] * math.prod(spatial) * weight.numel()
        return 2 * macs + (out.numel() if isinstance(bias, torch.Tensor) else 0)
    if is_op(node, aten.linear):
        bias = args[2] if len(args) > 2 else None
        return 2 * out.numel() * args[0].shape[-1] + (out.numel() if bias is not None else 0)
    if is_op(node, *_MATMULS):
        inner = args[-2].shape[-1] if is_op(node, aten.addmm, aten.baddbmm) else args[0].shape[-1]
        return 2 * out.numel() * inner
    if is_op(node, aten.scaled_dot_product_attention):
        q, k, v = args[:3]
        pairs = math.prod(q.shape[:-1]) * k.shape[-2]
        return 2 * pairs * (q.shape[-1] + v.shape[-1])
    if node.target in block_ops.BLOCK_OPS:  # fused by `fuse_blocks`: count the convs inside
        return block_ops.block_flops(node.target is block_ops.PW_DW_PW_BLOCK, args, out)
    if is_op(node, aten.batch_norm, aten._native_batch_norm_legit_no_training):
        return 2 * out.numel()
    if is_op(node, aten.layer_norm, aten.group_norm, aten.softmax, aten._softmax):
        return 5 * out.numel()
    return out.numel()


def node_bytes(node: fx.Node, values: dict) -> int:
    """Bytes read and written by one call (inputs once each, plus the output)."""
    tensors = [values.get(a) for a in node.all_input_nodes] + [values.get(node)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved; a rewrite that can make a model slower compares these first."""

    flops: int = 0
    bytes: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __le__(self, other: Cost) -> bool:
        """Not more expensive: no more FLOPs, and no more bytes when FLOPs tie."""
        return (self.flops, self.bytes) <= (other.flops, other.bytes)


# FLOPs an op may do per byte it moves before it stops being memory-bound. Peak ratios sit
# around 10-20 for fp32, but depthwise and small grouped convs reach a fraction of peak FLOPs.
MACHINE_BALANCE = 8.0
# A call's fixed cost in bytes-moved units (at about 10 GB/s). Measured with PyTorch 2.13 on one
# core of this project's CPU machines: a small dense conv, linear or cat costs 2-9 us a call, a
# small depthwise/grouped conv about 70 us (its CPU path has a large set-up cost). That is why
# InceptionNeXt's split + three depthwise convs + cat (236 us at 32x16x16) loses to one merged
# 11x11 depthwise conv (84 us) although the merged kernel does 2.7x the work; at 64x64 maps the
# two tie (473 vs 486 us).
OP_OVERHEAD_BYTES = 30_000
GROUPED_CONV_OVERHEAD_BYTES = 700_000


def roofline(cost: Cost, overhead: float = OP_OVERHEAD_BYTES) -> float:
    """Estimated run time of one call doing `cost`, in byte-transfer units: the longer of
    compute and memory traffic, plus the call's fixed cost."""
    return max(cost.flops / MACHINE_BALANCE, float(cost.bytes)) + overhead


def call_overhead(groups: int = 1) -> float:
    """The fixed cost of one call; `groups` > 1 for a grouped or depthwise conv."""
    return GROUPED_CONV_OVERHEAD_BYTES if groups > 1 else OP_OVERHEAD_BYTES


def node_roofline(node: fx.Node) -> float:
    """`roofline` of an existing node at its recorded shapes."""
    groups = 1
    if is_op(node, *_CONVS, *_TRANSPOSED):
        groups = node.args[-1] if is_op(node, aten.convolution) else _groups(node)
    return roofline(static_cost([node]), call_overhead(groups))


def _groups(node: fx.Node) -> int:
    index = 6
    value = node.args[index] if len(node.args) > index else node.kwargs.get("groups", 1)
    return value if isinstance(value, int) else 1


def static_cost(nodes) -> Cost:
    """Cost of existing nodes at the shapes recorded in `meta["val"]`; a symbolic size counts
    at its traced value (the same factor on both sides of a comparison)."""
    nodes = list(nodes)
    values = {
        n: _concrete(n.meta.get("val")) for node in nodes for n in (node, *node.all_input_nodes)
    }
    return sum((Cost(node_flops(n, values), node_bytes(n, values)) for n in nodes), Cost())


def hinted(shape) -> list[int]:
    """A shape with each symbolic size at its traced value (1 where there is none)."""
    return [optimization_hint(d, fallback=1) for d in shape]


def _concrete(value):
    if not isinstance(value, torch.Tensor):
        return value
    shape = hinted(value.shape)
    return torch.empty(shape, dtype=value.dtype, device="meta")


def conv_flops(batch: int, out_spatial, weight_shape, bias: bool) -> int:
    """FLOPs of a (non-transposed) conv from its shapes, before the conv exists."""
    out_channels = weight_shape[0]
    positions = batch * math.prod(out_spatial)
    return 2 * positions * math.prod(weight_shape) + (positions * out_channels if bias else 0)


def linear_flops(rows: int, in_features: int, out_features: int, bias: bool) -> int:
    """FLOPs of a linear over `rows` rows, before it exists."""
    return 2 * rows * in_features * out_features + (rows * out_features if bias else 0)


def conv_cost(
    out_shape: Sequence[int],
    weight_shape: Sequence[int],
    has_bias: bool,
    input_elements: int,
    element_size: int,
) -> Cost:
    """The cost of a conv that does not exist yet, batched or not, from its concrete shapes."""
    batched = len(out_shape) == len(weight_shape)
    batch, spatial = (out_shape[0], out_shape[2:]) if batched else (1, out_shape[1:])
    weights = math.prod(weight_shape) + (weight_shape[0] if has_bias else 0)
    elements = input_elements + math.prod(out_shape) + weights
    return Cost(conv_flops(batch, spatial, weight_shape, has_bias), elements * element_size)


def linear_cost(
    out_shape: Sequence[int], in_features: int, has_bias: bool, element_size: int
) -> Cost:
    """The cost of a linear that does not exist yet, from its concrete output shape."""
    out_features = out_shape[-1]
    rows = math.prod(out_shape[:-1])
    weights = in_features * out_features + (out_features if has_bias else 0)
    elements = rows * in_features + rows * out_features + weights
    flops = linear_flops(rows, in_features, out_features, has_bias)
    return Cost(flops, elements * element_size)


def flops(gm: fx.GraphModule, inputs: tuple, values: dict | None = None) -> int:
    values = values if values is not None else concrete_values(gm, inputs)
    return sum(node_flops(n, values) for n in gm.graph.nodes)


def stats(gm: fx.GraphModule, inputs: tuple) -> Stats:
    values = recorded_values(gm, inputs)
    return stats_from(gm, values if values is not None else concrete_values(gm, inputs))


def recorded_values(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, object] | None:
    """Every node's value at the sizes of `inputs`, as meta tensors and ints built from the
    recorded `meta["val"]` (a weight is its own value), without running the graph; None when
    a computed node records no value or a size does not resolve."""
    sizes: dict = {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, gm.graph.process_inputs(*inputs), strict=False):
        recorded = node.meta.get("val")
        if isinstance(recorded, torch.Tensor) and isinstance(value, torch.Tensor):
            for size, actual in zip(recorded.shape, value.shape, strict=False):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sizes[size.node.expr] = actual
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = constant(gm, node)
        elif node.op in ("placeholder", "call_function"):
            if "val" not in node.meta:
                return None
            values[node] = pytree.tree_map(lambda v: _at_sizes(v, sizes), node.meta["val"])
    leaves = pytree.tree_leaves(list(values.values()))
    return None if any(leaf is _UNRESOLVED for leaf in leaves) else values


_UNRESOLVED = object()


def _at_sizes(value, sizes: dict):
    if isinstance(value, torch.SymInt | int):
        return _size(value, sizes)
    if not isinstance(value, torch.Tensor):
        return value
    shape = [_size(d, sizes) for d in value.shape]
    if any(d is _UNRESOLVED for d in shape):
        return _UNRESOLVED
    return torch.empty(shape, dtype=value.dtype, device="meta")


def _size(size, sizes: dict):
    if not isinstance(size, torch.SymInt):
        return size
    expr = size.node.expr.xreplace(sizes)  # a bare symbol becomes the int bound to it
    if isinstance(expr, int):
        return expr
    return int(expr) if expr.is_number else _UNRESOLVED


def stats_from(gm: fx.GraphModule, values: dict) -> Stats:
    return Stats(op_counts(gm), param_count(gm), flops(gm, (), values))
