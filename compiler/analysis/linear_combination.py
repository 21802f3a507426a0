"""Linear combinations read off the graph: a value as sum_i scale_i * L_i(source_i) + shift.

The scales and the shift hold one number per channel (dim 1; they broadcast over the batch and
the positions). Each L_i is one of the linear ops the caller names (by default convs and average
pools) applied to its first argument, or the identity on a value the reading cannot see through;
`as_conv` reads each of them as a zero-padded conv, the identity a 1x..x1 one.
Addition, subtraction, negation, multiplication and division by per-channel constants, and eval
batch norm distribute over the terms, so RepVGG's `bn(conv(x)) + conv1(x) + bn(x)` and FastViT's
`x + gamma * (mixer(x) - norm(x))` both read as sums of terms of x. This is the graph algebra
behind structural re-parameterization (RepVGG, Ding et al. 2021); the reading never changes the
graph.

A value inside the combination that another op also reads is not looked into (it stays one
identity term), so whoever replaces the combination never removes a value still in use.

A conv or pool whose input is `scale * pad0(conv1x1(x)) + shift` (per-channel maps, at most one
symmetric zero pad, a stride-1 unpadded 1x1 conv, each read by the next alone) reads as a term of
x with an `Inner` map: zero padding commutes with a 1x1 conv whose output below the pad carries no
bias, and a shift above the pad reaches the border too, so the op reads a biased 1x1 conv of the
zero-padded x (DBB's 1x1 -> k x k and 1x1 -> avg-pool branches, its BN between pad and op).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from ..ir.graph import arg, constant, is_op, val
from ..ir.ops import CONVS, batch_norm, conv
from .affine import bn_scale_shift, per_channel

aten = torch.ops.aten

_SUMS = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
_RSUBS = (aten.rsub.Tensor, aten.rsub.Scalar)
_PRODUCTS = (aten.mul.Tensor, aten.mul.Scalar)
_QUOTIENTS = (aten.div.Tensor, aten.div.Scalar)


@dataclass(frozen=True)
class Inner:
    """What a term's op reads: `scale * pad0(conv(source)) + shift`, `conv` a 1x1 conv (bias-free
    below a pad) and `padding` the zero pad per spatial dim (0 without a pad)."""

    conv: fx.Node
    nodes: tuple[fx.Node, ...]  # the conv, then the pad and per-channel maps, producer first
    padding: tuple[int, ...]
    scale: torch.Tensor  # float64 on the CPU, one per channel of the conv's output
    shift: torch.Tensor


@dataclass(frozen=True)
class Term:
    """`scale * node`, where `node` is a linear op of `source` (through `inner`, if given), or
    `source` itself."""

    node: fx.Node
    source: fx.Node
    scale: torch.Tensor  # float64 on the CPU, one per channel
    inner: Inner | None = None

    @property
    def is_identity(self) -> bool:
        return self.node is self.source

    @property
    def ops(self) -> tuple[fx.Node, ...]:
        """The nodes between `source` and the term, producer first; none for the identity."""
        return () if self.is_identity else (*(self.inner.nodes if self.inner else ()), self.node)


@dataclass(frozen=True)
class LinearCombination:
    """`sum(term.scale * term.node for term in terms) + shift`; `nodes` are the combining ops
    read on the way (adds, scales, norms), inputs before users, the root last."""

    terms: tuple[Term, ...]
    shift: torch.Tensor  # float64 on the CPU, one per channel
    nodes: tuple[fx.Node, ...] = ()

    def scaled(self, factor: torch.Tensor) -> LinearCombination:
        terms = tuple(replace(term, scale=term.scale * factor) for term in self.terms)
        return LinearCombination(terms, self.shift * factor, self.nodes)

    def __add__(self, other: LinearCombination) -> LinearCombination:
        shift = self.shift + other.shift
        return LinearCombination(self.terms + other.terms, shift, self.nodes + other.nodes)

    @property
    def sources(self) -> set[fx.Node]:
        return {term.source for term in self.terms}


def linear_combination(
    gm: fx.GraphModule, root: fx.Node, leaves: Sequence[Any] | None = None
) -> LinearCombination | None:
    """`root` as a linear combination whose linear ops are the calls of `leaves` (by default
    `LINEAR_OPS`: convs and average pools), or None when `root` is no combining op, or a value
    on the way broadcasts or changes dtype (a sum of terms of different shapes is not a sum of
    their kernels)."""
    out = val(root)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2:
        return None
    if static_size(out.shape[1]) is None:  # one number per channel needs a channel count
        return None
    reader = _Reader(gm, out, LINEAR_OPS if leaves is None else tuple(leaves))
    if reader.step(root) is None:
        return None
    return reader.read(root, is_root=True)


Step = tuple[list[tuple[fx.Node, torch.Tensor]], torch.Tensor]  # (child, factor) pairs, shift


class _Reader:
    def __init__(self, gm: fx.GraphModule, like: torch.Tensor, leaves: tuple):
        self.gm, self.like, self.leaves = gm, like, leaves
        self.channels = static_size(like.shape[1])

    def read(self, node: fx.Node, is_root: bool = False) -> LinearCombination | None:
        if not _same_layout(val(node), self.like):
            return None
        if not is_root and len(node.users) != 1:
            return self.leaf(node, opaque=True)
        step = self.step(node)
        if step is None:
            return self.leaf(node)
        children, shift = step
        total = LinearCombination((), shift)
        for child, factor in children:
            part = self.read(child)
            if part is None:
                return None
            total = total + part.scaled(factor)
        return LinearCombination(total.terms, total.shift, total.nodes + (node,))

    def leaf(self, node: fx.Node, opaque: bool = False) -> LinearCombination:
        source, inner = node, None
        if is_op(node, *self.leaves) and not opaque:
            inner = read_inner(self.gm, node) if is_op(node, *LINEAR_OPS) else None
            source = inner.conv.args[0] if inner is not None else node.args[0]
        ones = torch.ones(self.channels, dtype=torch.float64)
        return LinearCombination((Term(node, source, ones, inner),), self.zeros())

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.channels, dtype=torch.float64)

    def step(self, node: fx.Node) -> Step | None:
        """How `node` combines its inputs, or None when it is no per-channel affine map."""
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in _SUMS or node.target in _RSUBS:
            alpha = arg(node, 2, "alpha", 1)
            if not _is_number(alpha):
                return None
            first, second = node.args[:2]
            if node.target in _RSUBS:  # rsub(a, b, alpha) = b - alpha * a
                return self.weighted([(second, 1.0), (first, -float(alpha))])
            sign = -1.0 if is_op(node, aten.sub) else 1.0
            return self.weighted([(first, 1.0), (second, sign * float(alpha))])
        if node.target in _PRODUCTS or node.target in _QUOTIENTS:
            return self.scaling(node)
        if is_op(node, aten.neg):
            return [(node.args[0], self.full(-1.0))], self.zeros()
        bn = batch_norm(self.gm, node)
        if bn is not None and bn.mean.numel() == self.channels:
            scale, shift = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
            return [(node.args[0], scale.cpu())], shift.cpu()
        return None

    def weighted(self, operands: list[tuple[Any, float]]) -> Step | None:
        """`sum(weight * operand)`: values become children, constants the shift."""
        children, shift = [], self.zeros()
        for operand, weight in operands:
            vector = self.vector(operand)
            if vector is not None:
                shift = shift + weight * vector
            elif isinstance(operand, fx.Node) and constant(self.gm, operand) is None:
                children.append((operand, self.full(weight)))
            else:
                return None
        return (children, shift) if children else None

    def scaling(self, node: fx.Node) -> Step | None:
        """`value * c`, `c * value` or `value / c` with a per-channel constant c."""
        value, other = node.args[:2]
        if node.target in _PRODUCTS and self.vector(other) is None:
            value, other = other, value
        factor = self.vector(other)
        if factor is None or not isinstance(value, fx.Node) or constant(self.gm, value) is not None:
            return None
        if node.target in _QUOTIENTS:
            if (factor == 0).any():
                return None
            factor = 1 / factor
        return [(value, factor)], self.zeros()

    def vector(self, operand: Any) -> torch.Tensor | None:
        """A constant operand as one finite float64 per channel, or None."""
        if _is_number(operand):
            value = torch.tensor(float(operand), dtype=torch.float64)
        else:
            value = constant(self.gm, operand)
            if value is None or value.is_complex() or not value.is_floating_point():
                return None
        vector = per_channel(value.detach().cpu(), self.like.dim(), 1, self.channels)
        return vector if vector is not None and torch.isfinite(vector).all() else None

    def full(self, number: float) -> torch.Tensor:
        return torch.full((self.channels,), number, dtype=torch.float64)


def static_size(size) -> int | None:
    """`size` as an int, also when it is a SymInt whose expression is a constant (size-oblivious
    tracing leaves inferred sizes such as the -1 of `x.view(B, -1, 1)` so); None when it is
    truly symbolic."""
    return size.node.maybe_as_int() if isinstance(size, torch.SymInt) else size


def read_inner(gm: fx.GraphModule, op: fx.Node) -> Inner | None:
    """What `op` reads as an `Inner` map, or None (no 1x1 conv under per-channel maps and one
    zero pad, a value on the way with another user, a shift below the pad, ...)."""
    node, like = op.args[0], val(op.args[0])
    if not isinstance(like, torch.Tensor) or like.dim() < 3 or static_size(like.shape[1]) is None:
        return None
    reader, dims = _Reader(gm, like, ()), like.dim() - 2
    scale, shift, padding, nodes = reader.full(1.0), reader.zeros(), None, []
    while isinstance(node, fx.Node) and len(node.users) == 1 and _same_channels(val(node), like):
        nodes.insert(0, node)
        if is_op(node, *CONVS, aten.convolution):
            return _inner_conv(gm, node, tuple(nodes), padding or (0,) * dims, scale, shift)
        pad = zero_padding(node, dims) if padding is None else None
        if pad is not None:
            padding, node = pad, node.args[0]
            continue
        step = reader.step(node)
        if step is None or len(step[0]) != 1:
            return None
        ((node, factor),), step_shift = step
        if padding is not None and step_shift.any():  # pad0 would cut it off at the border
            return None
        scale, shift = scale * factor, shift + scale * step_shift
    return None


def _inner_conv(gm, node, nodes, padding, scale, shift) -> Inner | None:
    """The `Inner` map ending in conv `node`, if that is a 1x1 conv that commutes with the pad."""
    c, source = conv(node), node.args[0]
    weight, dims = constant(gm, c.weight), len(padding)
    if c.transposed or weight is None or weight.dtype != val(node).dtype:
        return None
    if weight.dim() != dims + 2 or getattr(val(source), "ndim", 0) != dims + 2:
        return None
    unpadded = c.padding in ("valid", "same") or not any(c.padding)
    if any(k != 1 for k in weight.shape[2:]) or any(s != 1 for s in c.stride) or not unpadded:
        return None
    bias = constant(gm, c.bias) if c.bias is not None else torch.zeros(1)
    if bias is None or (any(padding) and bias.any()):  # pad0 sees 0 at the border, not the bias
        return None
    return Inner(node, nodes, padding, scale, shift)


def zero_padding(node: fx.Node, dims: int) -> tuple[int, ...] | None:
    """The padding per spatial dim of a symmetric constant-zero pad, or None."""
    if is_op(node, aten.constant_pad_nd):
        value = arg(node, 2, "value", 0)
    elif is_op(node, aten.pad) and arg(node, 2, "mode", "constant") == "constant":
        value = arg(node, 3, "value", None) or 0
    else:
        return None
    pads = list(arg(node, 1, "pad"))
    if value != 0 or len(pads) % 2 or len(pads) > 2 * dims:
        return None
    before, after = pads[0::2], pads[1::2]  # last dim first
    if any(not isinstance(p, int) or p < 0 for p in pads) or before != after:
        return None
    return (0,) * (dims - len(before)) + tuple(reversed(before))


def _same_channels(value: Any, like: torch.Tensor) -> bool:
    """Same dtype, rank and channels (the spatial sizes change across a pad)."""
    if not isinstance(value, torch.Tensor) or value.dtype != like.dtype:
        return False
    return value.dim() == like.dim() and str(value.shape[1]) == str(like.shape[1])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_layout(value: Any, like: torch.Tensor) -> bool:
    """Same dtype and the same sizes (symbolic ones compared by name, never guarded)."""
    if not isinstance(value, torch.Tensor) or value.dtype != like.dtype:
        return False
    return value.dim() == like.dim() and all(
        str(a) == str(b) for a, b in zip(value.shape, like.shape, strict=True)
    )


# --- each term as a conv: what the linear ops are, read as kernels over the same x -------------

AVG_POOLS = (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
LINEAR_OPS = (*CONVS, aten.convolution, *AVG_POOLS)  # the leaves `as_conv` reads


@dataclass(frozen=True)
class ConvTerm:
    """A term as a conv of its source; `groups` is None where the kernel adapts to any groups
    (the identity, an average pool: one channel in, the same one out)."""

    term: Term
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int | None = None
    divisor: int | None = None  # an average pool's divisor_override

    @property
    def centre(self) -> tuple[int, ...]:
        """Where the kernel's centre reads, relative to stride * output position (doubled, to
        stay an integer for even kernels); parallel convs merge only around one centre."""
        pairs = zip(self.kernel, self.padding, self.dilation, strict=True)
        return tuple(2 * p - d * (k - 1) for k, p, d in pairs)

    def taps(self, dim: int, padding: int) -> list[int]:
        """Where the taps along `dim` fall in a dense kernel read with `padding`."""
        start = padding - self.padding[dim]
        return [start + self.dilation[dim] * t for t in range(self.kernel[dim])]


def as_conv(gm: fx.GraphModule, term: Term, dims: int) -> ConvTerm | None:
    """`term`'s op as a `dims`-d zero-padded conv of its source, or None (a transposed conv, a
    weight that is not a constant, a pool whose mean no kernel gives, ...)."""
    if term.is_identity:
        ones = (1,) * dims
        return ConvTerm(term, ones, ones, (0,) * dims, ones)
    if is_op(term.node, *AVG_POOLS):
        found = _pool_as_conv(term, dims)
    elif is_op(term.node, *CONVS, aten.convolution):
        found = _conv_as_conv(gm, term, dims)
    else:
        return None
    if found is None or term.inner is None:
        return found
    return _through_inner(gm, found, term.inner)


def _through_inner(gm: fx.GraphModule, found: ConvTerm, inner: Inner) -> ConvTerm | None:
    """`found` after its inner 1x1 conv, as one conv of the source: the zero pad joins the
    padding; the groups are the finest split both convs respect (a pool is depthwise)."""
    c = conv(inner.conv)
    bias = constant(gm, c.bias) if c.bias is not None else None
    carried = inner.shift + (inner.scale * bias.detach().cpu().double() if bias is not None else 0)
    if len(inner.padding) != len(found.padding) or (any(found.padding) and carried.any()):
        return None  # the op's own padded border reads 0 where the merged conv adds the bias
    channels = val(found.term.node.args[0]).shape[1]
    groups = math.gcd(found.groups or channels, c.groups)
    padding = tuple(p + q for p, q in zip(found.padding, inner.padding, strict=True))
    return replace(found, padding=padding, groups=groups)


def _conv_as_conv(gm: fx.GraphModule, term: Term, dims: int) -> ConvTerm | None:
    c, out = conv(term.node), val(term.node)
    weight = constant(gm, c.weight)
    if c.transposed or weight is None or weight.dim() != dims + 2 or weight.dtype != out.dtype:
        return None
    if c.bias is not None and constant(gm, c.bias) is None:
        return None
    kernel, padding = tuple(weight.shape[2:]), c.padding
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":  # an odd total pads one more on the right: no centred equivalent
        totals = [d * (k - 1) for k, d in zip(kernel, c.dilation, strict=True)]
        padding = None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    if padding is None:
        return None
    return ConvTerm(term, kernel, c.stride, tuple(padding), c.dilation, c.groups)


def _pool_as_conv(term: Term, dims: int) -> ConvTerm | None:
    node = term.node
    kernel = _ints(arg(node, 1, "kernel_size"), dims)
    stride = _ints(arg(node, 2, "stride", None) or kernel, dims)
    padding = _ints(arg(node, 3, "padding", 0), dims)
    include_pad, divisor = arg(node, 5, "count_include_pad", True), arg(node, 6, "divisor_override")
    if None in (kernel, stride, padding) or arg(node, 4, "ceil_mode", False):
        return None
    if not include_pad and any(padding):  # border windows divide by fewer taps: no kernel
        return None
    return ConvTerm(term, kernel, stride, padding, (1,) * dims, None, divisor)


def _ints(value: Any, dims: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    value = [value] if isinstance(value, int) else list(value)
    value = value * dims if len(value) == 1 else value
    return tuple(value) if len(value) == dims else None
