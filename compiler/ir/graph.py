"""Small helpers for reading and writing the fx graph; passes use these, not gm attributes."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

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
    """The fake mode of the graph's example values (the first one found: a graph has one)."""
    for node in gm.graph.nodes:
        for leaf in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(leaf, FakeTensor):
                return detect_fake_mode([leaf])  # an active tracing context's mode comes first
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
    memo = _memo(gm)
    if memo is None:
        return _users_by_tensor(gm, {}).get(id(tensor), 0)
    if "constant_users" not in memo:
        memo["constant_users"] = _users_by_tensor(gm, memo.setdefault("lookups", {}))
    return memo["constant_users"].get(id(tensor), 0)


def _users_by_tensor(gm: fx.GraphModule, lookups: dict) -> dict[int, int]:
    counts: dict[int, int] = {}
    for other in gm.graph.find_nodes(op="get_attr"):
        tensor = _lookup(gm, other.target, lookups)
        if isinstance(tensor, torch.Tensor):
            counts[id(tensor)] = counts.get(id(tensor), 0) + len(other.users)
    return counts


def _lookup(gm: fx.GraphModule, target: str, lookups: dict) -> Any:
    """`get_attribute(gm, target)`, remembering in `lookups` the table (parameters, buffers or
    attributes of its module) that holds it; a remembered entry is used only while that table
    still holds the same object."""
    known = lookups.get(target)
    if known is not None and known[0].get(known[1]) is known[2]:
        return known[2]
    path, _, leaf = target.rpartition(".")
    owner = get_attribute(gm, path) if path else gm
    value = _child(owner, leaf) if owner is not None else None
    if isinstance(owner, nn.Module) and value is not None:
        state = vars(owner)
        for table in (state.get("_parameters", {}), state.get("_buffers", {}), state):
            if table.get(leaf) is value:
                lookups[target] = (table, leaf, value)
                break
    return value


def owns_weights(gm: fx.GraphModule, weight: Any, bias: Any = None) -> bool:
    """Whether a conv/linear's weight (and bias, if any) are floating-point constants that no
    other op reads, so a rewrite may replace them without touching another op's result."""
    return _owned(gm, weight) and (bias is None or _owned(gm, bias))


def _owned(gm: fx.GraphModule, node: Any) -> bool:
    tensor = constant(gm, node)
    return tensor is not None and tensor.is_floating_point() and constant_users(gm, node) == 1


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
    """Erase `node` if nothing uses it, then its inputs that become dead (no recompile). An
    input reached twice (it fed `node` and another erased input) is erased once."""
    if node._erased or node.users or node.op not in ("call_function", "get_attr"):
        return
    if _has_side_effects(node):
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


# The graph a rewrite scan is reading, with the whole-graph analyses computed for it so far.
_READING: ContextVar[tuple[fx.Graph, dict] | None] = ContextVar("fxopt_reading", default=None)


@contextlib.contextmanager
def unchanged(gm: fx.GraphModule, memo: dict) -> Iterator[None]:
    """Promise that `gm` is not edited inside the block, so whole-graph analyses
    (`mutated_nodes`, `constant_users`) are computed once into `memo` and reused. The rewrite
    driver holds this while patterns match and checks (pure) run, and calls `edited(memo)`
    after each build."""
    token = _READING.set((gm.graph, memo))
    try:
        yield
    finally:
        _READING.reset(token)


def edited(memo: dict) -> None:
    """Forget the analyses in `memo` after the graph may have changed. Attribute lookups stay:
    each is checked against the table holding it when it is used."""
    for analysis in ("mutated_nodes", "constant_users"):
        memo.pop(analysis, None)


def _memo(gm: fx.GraphModule) -> dict | None:
    reading = _READING.get()
    return reading[1] if reading is not None and reading[0] is gm.graph else None


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
        value = _child(value, part)
        if value is None:
            return None
    return value


def _child(owner: Any, name: str) -> Any:
    """`getattr(owner, name, None)`, reading a module's parameter, buffer and submodule tables
    directly: `nn.Module.__getattr__` is slow, and passes look weights up at every node."""
    if isinstance(owner, nn.Module):
        state = owner.__dict__
        for table in ("_modules", "_parameters", "_buffers"):  # one name is in one table at most
            found = state.get(table, {}).get(name)
            if found is not None:
                return found
    return getattr(owner, name, None)


def mutated_nodes(gm: fx.GraphModule) -> set[fx.Node] | frozenset[fx.Node]:
    """Nodes whose tensor an in-place op may write: every value written, with every value that
    may share its memory (views of it, what it is a view of, ops that may return an input).

    A pass that replaces a node by an equal value, or reads a constant's value at rewrite time,
    is only sound outside this set.
    """
    memo = _memo(gm)
    if memo is None:
        return _mutated_nodes(gm)
    if "mutated_nodes" not in memo:
        memo["mutated_nodes"] = frozenset(_mutated_nodes(gm))
    return memo["mutated_nodes"]


def written_in_place(gm: fx.GraphModule, touched) -> bool:
    """Whether an in-place op (one the capture kept: a write into an input or buffer) may
    write the memory of a `touched` value."""
    return bool(mutated_nodes(gm) & set(touched))


def _mutated_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while parent.get(node, node) is not node:
            node = parent[node]
        return node

    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    written = [input_node for node in calls for input_node in _written_inputs(node)]
    if not written:  # a functional graph (the usual case after capture): no alias analysis
        return set()
    for node in calls:
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
