"""fold_constants: ops computed only from weights  =>  one constant per value the model reads.

Exact: yes; a deterministic op gives the same result at rewrite time as at run time, on the same
tensors, dtype and device (masked weights, reshaped or transposed kernels, Kronecker factors,
kernels generated from parameters).
Declines when: an op is random (schema tag `nondeterministic_seeded`, except dropout that is not
training), reads uninitialized memory (`empty*`), writes in place or is not an ATen op, a value
in the subgraph is written in place anywhere, a result is not a single tensor, or folding grows
memory: the result has more than 1M elements and more than 4x the elements of the tensors it
reads (an `expand` of a small constant to a huge tensor stays an `expand`).
Reference: classic constant folding; DCLS, PHNN (weights generated from parameters).
"""

import torch
from torch import fx

from fxopt.analysis.preconditions import is_deterministic
from fxopt.ir.graph import add_constant, clean, constant, mutated_nodes, val
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import PassResult

aten = torch.ops.aten

MAX_GROWTH, MAX_ELEMENTS = 4, 1 << 20


def grows_memory(node: fx.Node) -> bool:
    """Whether storing `node`'s value costs far more than the tensors it reads."""
    out = val(node)
    if not isinstance(out, torch.Tensor):
        return False
    read = sum(v.numel() for n in node.all_input_nodes if isinstance(v := val(n), torch.Tensor))
    return out.numel() > MAX_ELEMENTS and out.numel() > MAX_GROWTH * read


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on constants and literals only, and that may be folded."""
    written, found = mutated_nodes(gm), set()
    for node in gm.graph.nodes:
        if node in written:
            continue
        if node.op == "get_attr" and constant(gm, node) is not None:
            found.add(node)
        elif node.op == "call_function" and set(node.all_input_nodes) <= found:
            if is_deterministic(node) and not grows_memory(node):
                found.add(node)
    return found


def can_fold(node: fx.Node, constants: set[fx.Node]) -> bool:
    """A computed tensor that a non-constant node reads. Values the graph returns stay computed:
    returning a stored tensor would let a caller's in-place edit leak into the next call."""
    if node.op != "call_function" or not isinstance(val(node), torch.Tensor):
        return False
    return any(user not in constants and user.op != "output" for user in node.users)


def ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    found, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def evaluate(gm: fx.GraphModule, targets: list[fx.Node]) -> dict[fx.Node, object]:
    """The values of `targets` and the constants they are computed from."""
    needed, values = ancestors(targets), {}
    with torch.no_grad():
        for node in (n for n in gm.graph.nodes if n in needed):
            if node.op == "get_attr":
                values[node] = constant(gm, node)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                values[node] = node.target(*args, **kwargs)
    return values


@register_pass("fold_constants", exact=True)
def fold_constants(gm: fx.GraphModule) -> PassResult:
    constants = constant_nodes(gm)
    targets = [node for node in gm.graph.nodes if node in constants and can_fold(node, constants)]
    if not targets:
        return PassResult(gm, False, {})
    values = evaluate(gm, targets)
    for node in targets:
        with gm.graph.inserting_before(node):
            folded = add_constant(gm, values[node], node.name)
        node.replace_all_uses_with(folded, delete_user_cb=lambda user: user.op != "output")
    clean(gm)
    return PassResult(gm, True, {"constant-subgraph": len(targets)})
