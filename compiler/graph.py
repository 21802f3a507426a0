"""Small helpers for reading and writing the fx graph; passes use these, not gm attributes."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten

CONSTANT_PREFIX = "_fxopt_const"


def is_op(node: Any, *ops: Any) -> bool:
    """Whether `node` calls one of `ops` (overloads or overload packets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is op or packet is op for op in ops)


def constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node, or None if `node` is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = get_attribute(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, name: str = "c") -> fx.Node:
    """Register `tensor` on `gm` under a fresh name and insert a `get_attr` node for it.

    The node goes where the graph's insertion point is (use `gm.graph.inserting_before`).
    """
    stem = name.replace(".", "_").replace(CONSTANT_PREFIX, "").strip("_") or "c"
    base = f"{CONSTANT_PREFIX}_{stem}"
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    target = f"{base}_{i}"
    gm.register_buffer(target, tensor.detach().clone())
    node = gm.graph.get_attr(target)
    node.meta["val"] = fake_like(gm, tensor)
    return node


def fake_like(gm: fx.GraphModule, tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor of the graph's fake mode with `tensor`'s shape, dtype and strides."""
    mode = fake_mode(gm)
    if mode is None:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return mode.from_tensor(tensor, static_shapes=True)


def fake_mode(gm: fx.GraphModule):
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])


def call(gm: fx.GraphModule, op: Any, args: Sequence[Any], kwargs: dict | None = None) -> fx.Node:
    """Insert `op(*args, **kwargs)` at the insertion point and fill its `meta["val"]`."""
    kwargs = kwargs or {}
    node = gm.graph.call_function(op, tuple(args), kwargs)
    mode = fake_mode(gm)
    fake_args, fake_kwargs = fx.node.map_arg((tuple(args), kwargs), lambda n: n.meta.get("val"))
    if mode is None:
        node.meta["val"] = op(*fake_args, **fake_kwargs)
    else:
        with mode:
            node.meta["val"] = op(*fake_args, **fake_kwargs)
    return node


def val(node: Any) -> Any:
    """The example value (a fake tensor, SymInt, ...) recorded on `node`, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The single user of `node`, or None when it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` of `node`, found positionally or by keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def attribute_uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many `get_attr` nodes read each attribute target."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def constant_users(gm: fx.GraphModule, node: fx.Node) -> int:
    """All graph uses of the tensor behind `node`, over every `get_attr` that reads it."""
    tensor = constant(gm, node)
    if tensor is None:
        return len(node.users)
    total = 0
    for other in gm.graph.nodes:
        if other.op == "get_attr" and constant(gm, other) is tensor:
            total += len(other.users)
    return total


def owns_weights(gm: fx.GraphModule, weight: Any, bias: Any = None) -> bool:
    """Whether a conv/linear's weight (and bias, if any) are floating-point constants that no
    other op reads, so a rewrite may replace them without touching another op's result."""
    tensor = constant(gm, weight)
    if tensor is None or not tensor.is_floating_point() or constant_users(gm, weight) != 1:
        return False
    return bias is None or (constant(gm, bias) is not None and constant_users(gm, bias) == 1)


def constants(gm: fx.GraphModule) -> Iterable[torch.Tensor]:
    """The distinct tensors the graph reads through `get_attr`."""
    seen: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        tensor = constant(gm, node)
        if tensor is not None:
            seen.setdefault(id(tensor), tensor)
    return seen.values()


def clean(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead nodes and the attributes no node reads any more, then recompile."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_method", "get_attr") and not node.users:
            if node.op == "get_attr" or not _has_side_effects(node):
                graph.erase_node(node)
    _drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    return gm


def erase_dead(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase `node` if nothing uses it, then its inputs that become dead (no recompile)."""
    if node.users or node.op not in ("call_function", "get_attr") or _has_side_effects(node):
        return
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for source in inputs:
        erase_dead(gm, source)


def _has_side_effects(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    return node.target in _SIDE_EFFECT_TARGETS


_SIDE_EFFECT_TARGETS = {
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch._assert,
}


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, leaf)


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with its own graph that shares the weight tensors (passes never edit
    tensors in place, so sharing is safe and the copy is cheap)."""
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notice
        return copy.deepcopy(gm, memo)


def get_attribute(gm: fx.GraphModule, target: str) -> Any:
    """The object at dotted path `target` under `gm`, or None."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def mutated_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose tensor an in-place op may write: every value written, with every value that
    may share its memory (views of it, what it is a view of, ops that may return an input).

    A pass that replaces a node by an equal value, or reads a constant's value at rewrite time,
    is only sound outside this set.
    """
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while parent.get(node, node) is not node:
            node = parent[node]
        return node

    written: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for input_node in _written_inputs(node):
            written.append(input_node)
        if _may_alias_inputs(node):
            for input_node in node.all_input_nodes:
                parent[find(input_node)] = find(node)
    roots = {find(node) for node in written}
    return {node for node in gm.graph.nodes if find(node) in roots} if roots else set()


def _written_inputs(node: fx.Node) -> list[fx.Node]:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    found = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        fx.node.map_arg(value, found.append)
    return found


def _may_alias_inputs(node: fx.Node) -> bool:
    """Whether `node`'s result may share memory with an input (conservative for unknown ops)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True  # operator.getitem of a list of views, Python functions: assume so
    if any(r.alias_info is not None for r in schema.returns):
        return True
    tags = getattr(node.target, "tags", ())
    return torch.Tag.maybe_aliasing_or_mutating in tags or is_op(node, aten.type_as)
