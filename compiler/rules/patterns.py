"""Patterns written as PyTorch code.

`pattern(fn)` traces a plain PyTorch function with torch.export, as fxopt captures models, so the
pattern holds the ATen ops a captured model holds (`F.conv2d` and `nn.Conv2d` both become
`aten.conv2d`). A pattern matches on dataflow: anchored at the node that computes the function's
result, it walks the inputs and compares ops and arguments. Arguments are compared after filling
in the op's defaults; a parameter binds whatever it meets (not None), a literal matches an equal
literal, and `fxopt.wildcards` loosens either. An intermediate node used outside the match
rules the match out; the root may have any users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..ir.errors import InputError
from ..ir.graph import constant, get_attribute, is_op
from .pattern_trace import Param, Traced, parameters, trace_function
from .wildcards import is_mark


@dataclass(frozen=True)
class Slot:
    """A scalar wildcard inside an op's arguments, bound to `name` (unbound when None)."""

    name: str | None


@dataclass(frozen=True, eq=False)
class Op:
    """One call in a pattern: arguments by schema name, and the ops it may also be."""

    target: Any
    arguments: dict[str, Any]
    alternatives: tuple = ()


@dataclass(frozen=True, eq=False)
class Const:
    """A tensor the pattern function creates itself; matches an equal constant."""

    tensor: torch.Tensor


def pattern(fn: Callable | None = None, *, examples: Mapping[str, Any] | None = None):
    """A pattern from a plain PyTorch function, for ``Rule(name, pattern=..., ...)``.

    Parameters
    ----------
    fn : callable
        ``fn(**params) -> Tensor``, written with ``torch``/``F`` calls. Each parameter binds the
        value it matches (``match["w"]``); a parameter annotated with a wildcard
        (``c: wildcards.Constant``, ``k: wildcards.Scalar``) or defaulting to one
        (``c=wildcards.any_constant()``) is constrained.
    examples : dict, optional
        Example tensors (or shapes) by parameter name, used for tracing only. A parameter without
        one is a float tensor whose shape fxopt guesses from the first op that reads it (every
        dimension 4, or a 1x1 kernel); give examples when that guess fails or when the pattern
        depends on shapes. Usable as a decorator, with or without arguments.

    Returns
    -------
    Pattern
        Traced on first use.

    Examples
    --------
    >>> conv_bn = fxopt.pattern(lambda x, w, b, mean, var, gamma, beta: F.batch_norm(
    ...     F.conv2d(x, w, b), mean, var, gamma, beta, False, 0.1, wildcards.scalar("eps")))
    """
    if fn is None:
        return lambda f: Pattern(f, examples)
    return Pattern(fn, examples)


class Pattern:
    """A pattern traced from `fn`; `match(gm, node)` anchors it at `node`."""

    def __init__(self, fn: Callable, examples: Mapping[str, Any] | None = None):
        self.fn, self.name = fn, getattr(fn, "__name__", "pattern")
        self.params = parameters(fn)
        self._examples = dict(examples or {})
        self._traced: Traced | None = None
        self._root: Op | None = None
        self._ops: list[Op] = []

    def __repr__(self) -> str:
        return f"pattern({self.name})"

    @property
    def traced(self) -> Traced:
        """The traced function (traced on first use)."""
        return self._trace()[0]

    @property
    def binding_names(self) -> dict[str, str]:
        """Every name a match binds, with its kind (parameters, then `wildcards.scalar` names)."""
        names = {p.name: p.kind for p in self.params}
        for op in self._trace()[1]:
            for value in pytree.tree_leaves(list(op.arguments.values())):
                if isinstance(value, Slot) and value.name is not None:
                    names.setdefault(value.name, "scalar")
        return names

    def _trace(self) -> tuple[Traced, list[Op]]:
        if self._traced is None:
            self._traced = trace_function(self.fn, self.params, self._examples)
            self._root, self._ops = _to_ops(self._traced, self.params, self.name)
        return self._traced, self._ops

    def match(self, gm: fx.GraphModule, node: fx.Node) -> tuple[tuple, dict] | None:
        """The matched nodes (producer first, `node` last) and the bindings, or None."""
        self._trace()
        if not _same_op(self._root, node):
            return None
        matcher = _Matcher(gm)
        if not matcher.value(self._root, node):
            return None
        nodes = tuple(matcher.nodes[op] for op in self._ops)
        inner = set(nodes)
        if any(user not in inner for n in nodes[:-1] for user in n.users):
            return None  # an intermediate value is read outside the match
        return nodes, matcher.bindings


def _to_ops(traced: Traced, params: list[Param], name: str) -> tuple[Op, list[Op]]:
    """The traced graph as `Op`s, the root last; sentinels become `Slot`s, marks alternatives."""
    gm, scalars = traced.graph_module, traced.trace.scalars
    kinds = {p.name: p.kind for p in params}
    values: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, param in zip(placeholders, traced.tensor_names, strict=True):
        values[node] = Param(param, kinds[param])

    def literal(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return values[value]
        if isinstance(value, float) and value in scalars:
            return Slot(scalars[value])
        return value

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = Const(get_attribute(gm, node.target))
        elif is_mark(node):
            ops = traced.trace.alternatives[node.args[1]]
            values[node] = replace(values[node.args[0]], alternatives=ops)
        elif node.op == "call_function":
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), literal)
            values[node] = Op(node.target, _arguments(node.target, args, kwargs))
    outputs = pytree.tree_leaves(gm.graph.output_node().args[0])
    if len(outputs) != 1 or not isinstance(values.get(outputs[0]), Op):
        raise InputError(f"pattern {name} must return one tensor computed by an op")
    root = values[outputs[0]]
    reachable = _reachable(root)
    return root, [v for v in values.values() if isinstance(v, Op) and id(v) in reachable]


def _reachable(root: Op) -> set[int]:
    seen, stack = set(), [root]
    while stack:
        op = stack.pop()
        if id(op) not in seen:
            seen.add(id(op))
            leaves = pytree.tree_leaves(list(op.arguments.values()))
            stack += [a for a in leaves if isinstance(a, Op)]
    return seen


def _arguments(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in (positions as names for non-ATen calls)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    out = {}
    for i, argument in enumerate(schema.arguments):
        if i < len(args):
            out[argument.name] = args[i]
        elif argument.name in kwargs:
            out[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            out[argument.name] = argument.default_value
    return out


def _same_op(op: Op, node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if op.alternatives:
        return is_op(node, *op.alternatives)
    return _packet(node.target) is _packet(op.target)


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


class _Matcher:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.nodes, self.bindings = gm, {}, {}

    def value(self, p: Any, g: Any) -> bool:
        if isinstance(p, Op):
            return self.op(p, g)
        if isinstance(p, Param):
            return g is not None and _kind_accepts(self.gm, p.kind, g) and self.bind(p.name, g)
        if isinstance(p, Slot):
            return _is_number(g) and self.bind(p.name, g)
        if isinstance(p, Const):
            c = constant(self.gm, g)
            if c is None or c.shape != p.tensor.shape or c.dtype != p.tensor.dtype:
                return False
            return bool(torch.equal(c.to(p.tensor.device), p.tensor))
        if isinstance(p, list | tuple):
            if not isinstance(g, list | tuple):
                return False
            if len(p) != len(g):  # [1] against [1, 1]: an int[N] argument given as one value
                return _uniform(p) and _uniform(g) and self.value(p[0], g[0])
            return all(self.value(a, b) for a, b in zip(p, g, strict=True))
        return _same_literal(p, g)

    def op(self, p: Op, g: Any) -> bool:
        if p in self.nodes:
            return self.nodes[p] is g
        if not _same_op(p, g):
            return False
        self.nodes[p] = g
        args = _arguments(g.target, g.args, g.kwargs)
        for name, value in p.arguments.items():
            if name not in args:
                if p.alternatives:  # another op of the alternatives lacks this argument
                    continue
                return False
            if not self.value(value, args[name]):
                return False
        return True

    def bind(self, name: str | None, g: Any) -> bool:
        if name is None:
            return True
        if name in self.bindings:
            return _same_literal(self.bindings[name], g)
        self.bindings[name] = g
        return True


def _kind_accepts(gm: fx.GraphModule, kind: str, g: Any) -> bool:
    if kind == "constant":
        return constant(gm, g) is not None
    return _is_number(g) if kind == "scalar" else True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uniform(values: Any) -> bool:
    return len(values) > 0 and all(_same_literal(v, values[0]) for v in values)


def _same_literal(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same_literal, a, b))
    try:
        return bool(a == b)
    except Exception:  # tensors, symbolic values: not the same literal
        return False
