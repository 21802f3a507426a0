"""Make a captured graph functional: in-place ops on values the model itself created become
their functional forms, so passes see `out = add(out, branch)` where the model wrote
`out += branch(x)`.

torch.export (non-strict, pre-dispatch) keeps the model's in-place calls (`aten.add_`,
`aten.relu_`, `aten.copy_`, ...). Rewriting `y = a.op_(b)` as `y = op(a, b)`, and every later
read of `a` as a read of `y`, is exact when nothing else can observe the write: `a` is a value
the graph computed (not an input, parameter or buffer, nor a view of one), and no other value
sharing `a`'s memory (the tensor `a` is a view of, other views of it) is read after the write.
Writes that fail those conditions stay in place and are described (`Kept`), so the driver can
report them; `torch.export`'s own
functionalization is not used because it also decomposes the composite ops passes match on
(`aten.batch_norm`, `aten.flatten`, `aten.dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten


@dataclass(frozen=True)
class Kept:
    """An in-place op left in the graph, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"in-place {self.op} ({self.node}) kept: {self.reason}"


def functionalize(gm: fx.GraphModule) -> list[Kept]:
    """Rewrite `gm`'s in-place ops on graph-created values as functional ops, in place of
    `gm`'s graph; return the in-place ops that had to stay, with the reason for each."""
    aliases = _Aliases()
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    kept: list[Kept] = []
    changed = False
    for node in list(gm.graph.nodes):
        written = _written_argument(node)
        if written is None:
            aliases.add(node)
            continue
        reason = _why_not(node, written, aliases, position)
        functional = None if reason else _functional_op(node.target)
        if reason is None and functional is None:
            reason = f"{_name(node.target)} has no functional form"
        if reason:
            kept.append(Kept(node.name, _name(node.target), reason))
            aliases.add(node)
            continue
        for new in _replace(gm, node, written, functional, position):
            aliases.add(new)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return kept


class _Aliases:
    """Union-find over nodes that may share memory, built in graph order."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.members: dict[fx.Node, list[fx.Node]] = {}

    def find(self, node: fx.Node) -> fx.Node:
        while self.parent.get(node, node) is not node:
            node = self.parent[node]
        return node

    def add(self, node: fx.Node) -> None:
        self.parent[node] = node
        self.members[node] = [node]
        for source in _aliased_inputs(node):
            self._union(source, node)

    def group(self, node: fx.Node) -> list[fx.Node]:
        return self.members.get(self.find(node), [node])

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra] += self.members.pop(rb)


def _why_not(node: fx.Node, written: fx.Node, aliases: _Aliases, position) -> str | None:
    group = aliases.group(written)
    external = [m for m in group if m.op in ("placeholder", "get_attr")]
    if external:
        kind = "an input" if external[0].op == "placeholder" else "a parameter or buffer"
        return f"it writes into {kind} ({external[0].target}), which the caller can see"
    if any(m.op != "call_function" for m in group):
        return "it writes into a value of unknown origin"
    here = position[node]
    for member in group:
        if member is written:
            continue
        if any(position.get(user, here) > here for user in member.users):
            return f"{member.name} shares its memory and is read after the write"
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, written: fx.Node, functional, position):
    """Insert `functional(*node.args)` (cast back to the written dtype if it promotes), make
    it stand for `node` and for every later read of `written`, erase `node`; return the new
    nodes."""
    here = position[node]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        value = _fake_result(functional, node)
        result = new
        if value is not None and value.dtype != written.meta["val"].dtype:
            # `a += b` keeps a's dtype; `a + b` promotes: cast back to what the write produced
            new.meta["val"] = value
            result = gm.graph.call_function(
                aten._to_copy.default, (new,), {"dtype": written.meta["val"].dtype}
            )
            result.meta = dict(node.meta)
    position[new] = position[result] = here
    node.replace_all_uses_with(result)
    for user in list(written.users):
        if position.get(user, -1) > here:
            user.replace_input_with(written, result)
    gm.graph.erase_node(node)
    return [new] if result is new else [new, result]


def _fake_result(op, node: fx.Node):
    """The functional op's result on the in-place node's fake values (None where unknown).
    Floating tensors of one dtype with real scalars cannot promote: the in-place node's value
    stands for it without running the op (a few ms each, on every relu_ of a model)."""
    values = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    if _cannot_promote(torch.utils._pytree.tree_leaves(values)):
        return node.meta.get("val")
    fakes = [v for v in torch.utils._pytree.tree_leaves(values) if hasattr(v, "fake_mode")]
    try:
        if fakes:
            with fakes[0].fake_mode:
                return op(*values[0], **values[1])
        return op(*values[0], **values[1])
    except Exception:  # an op the fake mode cannot run: keep the in-place node's value
        return None


def _cannot_promote(leaves: list) -> bool:
    dtypes = {v.dtype for v in leaves if isinstance(v, torch.Tensor)}
    scalars = [v for v in leaves if isinstance(v, int | float | complex)]
    return (
        len(dtypes) == 1
        and next(iter(dtypes)).is_floating_point
        and not any(isinstance(v, complex) for v in scalars)
    )


def _written_argument(node: fx.Node) -> fx.Node | None:
    """The node an in-place ATen op `x.op_(...)` writes (its first argument), else None."""
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable or not schema.arguments:
        return None
    first = schema.arguments[0].alias_info
    others = [a for a in schema.arguments[1:] if a.alias_info is not None and a.alias_info.is_write]
    if first is None or not first.is_write or others or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def _functional_op(op):
    """`aten.add.Tensor` for `aten.add_.Tensor`, when it exists with the same arguments."""
    packet = getattr(op, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    functional_packet = getattr(aten, name[:-1], None)
    functional = getattr(functional_packet, op._overloadname, None)
    if functional is None:
        return None
    before = [a.name for a in op._schema.arguments]
    after = [a.name for a in functional._schema.arguments]
    return functional if before == after else None


def _aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs `node`'s result may share memory with: per the schema's alias annotations,
    and conservatively all inputs for ops without a schema (getitem of a list of views)."""
    if node.op != "call_function":
        return []
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.all_input_nodes
    returned = set()
    for result in schema.returns:
        if result.alias_info is not None:
            returned |= set(result.alias_info.before_set)
    if not returned:
        return []
    found: list[fx.Node] = []
    for index, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not returned & set(info.before_set):
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        fx.node.map_arg(value, found.append)
    return found


def _name(op) -> str:
    return str(getattr(op, "overloadpacket", op))
