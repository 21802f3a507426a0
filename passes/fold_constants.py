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

from fxopt.analysis.preconditions import UNINITIALIZED, is_deterministic
from fxopt.ir.graph import add_constant, constant, is_op, mutated_nodes, val
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

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


def why_not_constant(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why `node`, which reads only constants, is not folded (see `constant_nodes`)."""
    if node in mutated_nodes(gm):
        return "the value is written in place"
    if is_op(node, *UNINITIALIZED):
        return "it reads uninitialized memory (empty)"
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable:
        return "the op writes in place or is not an ATen op"
    if not is_deterministic(node):
        return "the op is random (nondeterministic_seeded, or dropout in training)"
    if grows_memory(node):
        return (
            f"folding grows memory: over {MAX_ELEMENTS} elements and over {MAX_GROWTH}x the "
            "elements it reads"
        )
    return "a value it reads is written in place"


def constant_rule(constants: set[fx.Node]) -> Rule:
    """The rule for one run: `constants` are the nodes computed from constants alone in the
    graph the pass started from (each folded value keeps that set valid: the value becomes a
    constant, and the nodes that read it did not qualify before either)."""

    def is_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
        if node in constants:
            return True
        written = node in mutated_nodes(gm)
        return node.op == "get_attr" and not written and constant(gm, node) is not None

    def computed_from_constants(node: fx.Node) -> tuple[fx.Node] | None:
        """Pattern: an op whose inputs are all constants, read by an op that is not (a value
        read only inside the constant subgraph folds with the value that reads it)."""
        if node.op != "call_function":
            return None
        gm = node.graph.owning_module
        if not all(is_constant(gm, n) for n in node.all_input_nodes):
            return None
        if node in constants and not can_fold_into(node):
            return None
        return (node,)

    def can_fold_into(node: fx.Node) -> bool:
        return any(user not in constants and user.op != "output" for user in node.users)

    def can_fold(match: Match) -> bool:
        node = match.root
        if node not in constants:
            return decline(why_not_constant(match.gm, node))
        if not isinstance(val(node), torch.Tensor):
            return decline("the result is not a single tensor")
        return True

    def fold(match: Match) -> fx.Node:
        """Values the graph returns stay computed: returning a stored tensor would let a
        caller's in-place edit leak into the next call. So the root is returned (a group
        rewrite): its other users read the constant."""
        gm, node = match.gm, match.root
        folded = add_constant(gm, evaluate(gm, [node])[node], node.name)
        node.replace_all_uses_with(folded, delete_user_cb=lambda user: user.op != "output")
        return node

    # the ops computed from weights alone, read by other ops  =>  one constant each
    return Rule("constant-subgraph", pattern=computed_from_constants, check=can_fold, build=fold)


@register_pass("fold_constants", exact=True)
def fold_constants(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, [constant_rule(constant_nodes(gm))])
