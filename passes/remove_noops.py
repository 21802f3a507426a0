"""remove_noops: eval dropout, identity copies, same-shape views, inverse permutes, x*1  =>  x.

Exact: yes; each removed op returns a tensor equal to its input in value, shape, dtype, device
and layout (only aliasing and the strides of a kept layout may differ).
Declines when: dropout runs in training mode, a copy or cast changes dtype, device or memory
format, `contiguous()` has an input that is not contiguous (a `.view` after it needs the copy), a
view changes the shape (or the shapes are symbolic and not provably equal), a permutation is not
the identity, a neutral scalar would promote the dtype, or the value or its input is written in
place somewhere (removing a copy would then let the write leak).
Reference: identities; fxopt pipeline clean-up before pattern passes.
"""

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.ir.graph import arg, is_op, mutated_nodes, val
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten

DROPOUTS = (aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
COPIES = (
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.to,
    aten._to_copy,
    aten.type_as,
)
VIEWS = (
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.flatten,
    aten.unflatten,
    aten.expand,
    aten.squeeze,
    aten.slice,
    aten.repeat,
)
PERMUTES = (aten.permute, aten.transpose)
NEUTRAL = {aten.mul: 1, aten.div: 1, aten.add: 0, aten.sub: 0}  # x op NEUTRAL == x
ARITHMETIC = tuple(getattr(op, overload) for op in NEUTRAL for overload in ("Tensor", "Scalar"))
_KEEP_FORMATS = (None, torch.preserve_format)


def same_shape(a: torch.Size, b: torch.Size) -> bool:
    """Provably equal shapes; symbolic sizes count only when equal without a new guard."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


def can_replace_by_input(node: fx.Node) -> bool:
    """`node` and its input carry the same kind of tensor and neither is written in place:
    True, or a `decline` saying which does not hold."""
    source, out = val(node.args[0]) if node.args else None, val(node)
    if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor):
        return decline("the value or its input is not a tensor")
    kind = (source.dtype, source.device, source.layout), (out.dtype, out.device, out.layout)
    if kind[0] != kind[1]:
        return decline(
            f"it changes dtype, device or layout ({describe(*kind[0])} to {describe(*kind[1])})"
        )
    if not same_shape(source.shape, out.shape):
        shapes = f"{list(source.shape)} to {list(out.shape)}"
        if len(source.shape) != len(out.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b
            for a, b in zip(source.shape, out.shape, strict=True)
        ):
            return decline(f"it changes the shape ({shapes})")
        return decline(f"the sizes are symbolic and not provably equal ({shapes})")
    if not node.users:
        return decline("nothing reads it")
    if {node, node.args[0]} & mutated_nodes(node.graph.owning_module):
        return decline("the value or its input is written in place")
    return True


def describe(dtype: torch.dtype, device: torch.device, layout: torch.layout) -> str:
    return f"{dtype} on {device}" + ("" if layout == torch.strided else f", {layout}")


def can_remove_dropout(match: Match) -> bool:
    if arg(match.root, 2, "train", True):
        return decline("dropout runs in training mode")
    return can_replace_by_input(match.root)


def memory_format(node: fx.Node) -> torch.memory_format | None:
    """The `memory_format` argument, positional or keyword, by the op's schema."""
    names = [a.name for a in node.target._schema.arguments]
    index = names.index("memory_format") if "memory_format" in names else len(node.args)
    return node.args[index] if index < len(node.args) else node.kwargs.get("memory_format")


def can_remove_copy(match: Match) -> bool:
    node, keep = match.root, _KEEP_FORMATS
    if is_op(node, aten.contiguous):
        keep = (None, torch.contiguous_format)  # contiguous() asks for this format explicitly
        if not known_contiguous(val(node.args[0])):
            return decline("the input is not contiguous (a view after it may need the copy)")
    if memory_format(node) not in keep:
        return decline(f"it changes the memory format to {memory_format(node)}")
    return can_replace_by_input(node)


def known_contiguous(value) -> bool:
    """Whether a (fake) tensor is contiguous for every size its symbols may take."""
    if not isinstance(value, torch.Tensor):
        return False
    try:
        result = value.is_contiguous()
    except Exception:  # a symbolic layout the fake tensor cannot decide
        return False
    return statically_known_true(result) if isinstance(result, torch.SymBool) else bool(result)


def can_remove_view(match: Match) -> bool:
    return can_replace_by_input(match.root)


def is_identity_permutation(node: fx.Node) -> bool:
    out = val(node)
    rank = out.dim() if isinstance(out, torch.Tensor) else 0
    if rank == 0:
        return False
    if is_op(node, aten.permute):
        return [d % rank for d in node.args[1]] == list(range(rank))
    return node.args[1] % rank == node.args[2] % rank


def can_remove_permute(match: Match) -> bool:
    if not is_identity_permutation(match.root):
        return decline("the permutation is not the identity")
    return can_replace_by_input(match.root)


def permutation(node: fx.Node) -> list[int]:
    """Output axis i of a permute/transpose reads input axis perm[i]."""
    rank = val(node).dim()
    if is_op(node, aten.permute):
        return [d % rank for d in node.args[1]]
    perm, (a, b) = list(range(rank)), (d % rank for d in node.args[1:3])
    perm[a], perm[b] = b, a
    return perm


def can_cancel_permutes(match: Match) -> bool:
    first, second = match[0], match.root
    if not isinstance(val(first), torch.Tensor) or not isinstance(val(second), torch.Tensor):
        return decline("a permuted value is not a tensor")
    outer, inner = permutation(second), permutation(first)
    if [inner[i] for i in outer] != list(range(len(outer))):
        return decline(f"the second permutation {outer} does not undo the first {inner}")
    if {first, second, first.args[0]} & mutated_nodes(second.graph.owning_module):
        return decline("a permuted value or its input is written in place")
    return True


def can_remove_arithmetic(match: Match) -> bool:
    node = match.root
    neutral = NEUTRAL.get(node.target.overloadpacket)
    other, alpha = node.args[1] if len(node.args) > 1 else None, node.kwargs.get("alpha", 1)
    name = node.target.overloadpacket.__name__
    if not isinstance(other, int | float) or not isinstance(alpha, int | float):
        return decline(f"the other operand of {name} is not a number")
    if other != neutral:
        return decline(f"{name} by {other}, not the neutral {neutral}")
    return can_replace_by_input(node)


def input_of(match: Match) -> fx.Node:
    return match.root.args[0]


RULES = [
    # dropout(x, p, train=False)  =>  x
    Rule("eval-dropout", pattern=(DROPOUTS,), check=can_remove_dropout, build=input_of),
    # clone / contiguous / alias / detach / to / type_as keeping dtype, device, format  =>  x
    Rule("identity-copy", pattern=(COPIES,), check=can_remove_copy, build=input_of),
    # view / reshape / flatten / expand / squeeze / slice / repeat to the same shape  =>  x
    Rule("same-shape-view", pattern=(VIEWS,), check=can_remove_view, build=input_of),
    # permute(x, identity) / transpose(x, d, d)  =>  x
    Rule("identity-permute", pattern=(PERMUTES,), check=can_remove_permute, build=input_of),
    # permute(permute(x, p), inverse of p)  =>  x  (SLAB's transpose -> bn -> transpose, folded)
    Rule(
        "inverse-permutes",
        pattern=(PERMUTES, PERMUTES),
        check=can_cancel_permutes,
        build=lambda match: match[0].args[0],
    ),
    # x * 1, x / 1, x + 0, x - 0 keeping the dtype  =>  x
    Rule("neutral-scalar", pattern=(ARITHMETIC,), check=can_remove_arithmetic, build=input_of),
]


@register_pass("remove_noops", exact=True)
def remove_noops(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
