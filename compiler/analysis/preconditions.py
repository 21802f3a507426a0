"""Preconditions that more than one pass checks, kept here so that no pass imports another.

`can_skip_padding` (a conv never reads a padded zero: fold_bn_into_next, merge_sequential_convs,
merge_conv_into_linear), `is_deterministic` (an op computes the same value every time:
fold_constants, and the attention matchers), and the checks both merge_sequential_convs and
merge_conv_into_linear make on sums. Whether a pass owns the constants it merges
(`owns_weights`) and whether a value is written in place (`written_in_place`) are graph queries
in `fxopt.ir.graph`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ir.graph import arg, is_op, val
from ..ir.ops import Conv

aten = torch.ops.aten


def can_skip_padding(c: Conv, kernel: tuple[int, ...]) -> bool:
    """The conv never reads a padded zero, so every tap sees a normalized input value."""
    if c.padding == "same":
        return all(k == 1 for k in kernel)
    return c.padding == "valid" or all(p == 0 for p in c.padding)


UNINITIALIZED = (
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.empty_permuted,
)
DROPOUTS = (aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)


def is_deterministic(node: fx.Node) -> bool:
    """An ATen op (or tuple indexing) that computes the same value every time it runs."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or is_op(node, *UNINITIALIZED):
        return False
    if is_op(node, *DROPOUTS):
        return node.args[2] is False if len(node.args) > 2 else not node.kwargs.get("train")
    return torch.Tag.nondeterministic_seeded not in node.target.tags


ADDS = (aten.add.Tensor,)


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """(a, b, alpha) of `a + alpha * b` when both are graph values; None otherwise."""
    if not is_op(node, *ADDS) or len(node.args) != 2:
        return None
    alpha = arg(node, 2, "alpha", 1)
    if not all(isinstance(a, fx.Node) for a in node.args) or isinstance(alpha, bool):
        return None
    return (*node.args, float(alpha)) if isinstance(alpha, int | float) else None


def same_shape(*nodes: fx.Node) -> bool:
    shapes = [val(n).shape for n in nodes]
    return all(len(s) == len(shapes[0]) for s in shapes) and all(
        statically_known_true(a == b) for s in shapes[1:] for a, b in zip(s, shapes[0], strict=True)
    )


def add_of_values(node: fx.Node) -> list[fx.Node] | None:
    return [node] if add_operands(node) is not None else None
