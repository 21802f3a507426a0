"""Rules and the greedy driver that applies them until nothing changes.

A rule is data: a name, a pattern, a pure `check`, and a `build` that writes the replacement (or
declines), or a `replacement` function inlined in place of the match.

The protocol: `check(match)` analyses the match once and returns either its plan, any value
other than False, None or a `Declined` (True where there is nothing to hand over), or
`decline(reason)`. The driver hands the plan to `build` as `match.plan`, so a build never
recomputes what its check found; a build returns the node that replaces the root, or
`decline(reason)`. For example::

    def can_fold(match):
        scale = constant(match.gm, match["scale"])
        if scale is None:
            return decline("the scale is not a constant")
        return Folding(scale)                  # the plan

    def fold(match):
        return call(match.gm, aten.mul.Tensor, (match["x"], match.plan.scale))

A check written as a predicate (True or False) keeps working; its near-misses then read
"can_fold returned False", which says nothing a user can act on, so the built-in rules always
decline with a reason.

The driver visits every node in order, tries every rule there, and fires the first one that
applies; then it visits again, in graph order, only the nodes near each rewrite (its new nodes,
their inputs and the nodes below them), until a visit fires nothing: a fixed point. A rule set
that keeps firing forever is a bug and raises. Matches that a check or build declined in the
final graph are the pass's near-misses (`PassResult.declined`), each with the reason it gave.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from ..ir.errors import InputError, RewriteError, first_line
from ..ir.graph import (
    add_constant,
    call,
    clean,
    edited,
    erase_dead,
    get_attribute,
    is_op,
    unchanged,
    val,
)
from .pattern_trace import Traced, trace_replacement
from .patterns import Pattern

PatternSpec = Pattern | Sequence[Any] | Callable[[fx.Node], "Sequence[fx.Node] | None"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns; the attribute names follow torch.fx's own PassResult.

    `declined` maps a rule name to its near-misses in the final graph: ``"node: reason"`` for
    each match that the rule's check or build declined.
    """

    graph_module: fx.GraphModule
    modified: bool
    applied: Mapping[str, int] = field(default_factory=dict)
    declined: Mapping[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    """The nodes a pattern matched, producer first; `root` is the node being replaced.

    ``match[i]`` is the i-th matched node; ``match["w"]`` is the value bound to a pattern
    function's parameter (or `wildcards.scalar` name) ``w``, as in ``match.bindings``.
    `plan` is what the rule's check returned, for its build (None while the check runs).
    """

    gm: fx.GraphModule
    nodes: tuple[fx.Node, ...]
    bindings: Mapping[str, Any] = field(default_factory=dict)
    plan: Any = None

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]

    def __getitem__(self, key: int | str) -> Any:
        return self.bindings[key] if isinstance(key, str) else self.nodes[key]


class Declined:
    """A falsy verdict that says why: what `decline(reason)` returns."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"decline({self.reason!r})"


def decline(reason: str) -> Declined:
    """Decline a match and say why, from a rule's check or build.

    Parameters
    ----------
    reason : str
        Shown in `PassResult.declined`, the report's pass records and
        ``fxopt optimize --explain``.

    Returns
    -------
    Declined
        A falsy value: ``return fxopt.decline("weight is shared")``.
    """
    return Declined(reason)


def _always(match: Match) -> bool:
    return True


def _no_build(match: Match) -> None:
    return None


@dataclass(frozen=True)
class Rule:
    """A local rewrite.

    `pattern` is a `fxopt.pattern(fn)`, a chain of ops, producer first, each feeding the next
    one's first argument (an element may be a tuple of alternative ops), or a function from a
    node to the matched nodes (root last) or None. `check(match)` is pure; it returns the plan
    (what it found out and `build` needs, or True when there is nothing to hand over) or
    `fxopt.decline(reason)` to say why not. `build(match)` reads the plan as `match.plan`,
    inserts the replacement and returns the node that takes the root's place, or a `decline`;
    it must not change the graph when it declines. With a `fxopt.pattern`, `replacement` may
    stand in for `build`: a PyTorch function of (some of) the pattern's parameters, inlined in
    place of the root with the bound values. A bare False or None from `check` or `build` still
    declines, but the report can only say "check returned False" then.

    A group rewrite (sibling ops fused into one, every user of a value redirected at once)
    rewires the graph itself in `build` and returns the root: the driver then replaces nothing,
    and erases the root only if nothing reads it any more.
    """

    name: str
    pattern: PatternSpec
    check: Callable[[Match], Any] = _always
    build: Callable[[Match], Any] = _no_build
    replacement: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.replacement is None:
            return
        if not isinstance(self.pattern, Pattern):
            raise InputError(f"rule {self.name!r}: a replacement needs a fxopt.pattern pattern")
        if self.build is not _no_build:
            raise InputError(f"rule {self.name!r}: give build= or replacement=, not both")
        object.__setattr__(self, "build", Replacement(self.replacement, self.pattern))

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | None:
        if isinstance(self.pattern, Pattern):
            found = self.pattern.match(gm, node)
            return Match(gm, *found) if found else None
        nodes = _match_pattern(self.pattern, node)
        return Match(gm, tuple(nodes)) if nodes else None


def _match_pattern(pattern: PatternSpec, node: fx.Node) -> Sequence[fx.Node] | None:
    if callable(pattern):
        return pattern(node)
    chain = [node]
    for ops in reversed(pattern[1:]):
        if not is_op(chain[0], *_alternatives(ops)) or not chain[0].args:
            return None
        chain.insert(0, chain[0].args[0])
    return chain if is_op(chain[0], *_alternatives(pattern[0])) else None


def _alternatives(ops: Any) -> tuple:
    return tuple(ops) if isinstance(ops, tuple | list) else (ops,)


def rewrite(gm: fx.GraphModule, rules: Sequence[Rule], max_rounds: int | None = None) -> PassResult:
    """Apply `rules` greedily until none fires; return what fired and how often, and the
    near-misses of the final graph. `max_rounds` bounds the number of rewrites.

    The first walk visits every node in order; after it, only the nodes near a rewrite (see
    `_around`) are visited again, in graph order, until a walk over them fires nothing.
    """
    applied: Counter[str] = Counter()
    limit = max_rounds if max_rounds is not None else 4 * len(gm.graph.nodes) + 16
    notes: dict[fx.Node, list[tuple]] = {}  # each node's declined matches at its last visit
    memo: dict = {}
    pending = list(gm.graph.nodes)
    while pending:
        revisit: set[fx.Node] = set()
        for node in pending:
            revisit.discard(node)  # visited now, after whatever touched it
            notes.pop(node, None)
            if node._erased or not node.users:  # nothing reads it: replacing it changes nothing
                continue
            revisit |= _visit(gm, node, rules, memo, notes, applied, limit)
        pending = sorted(n for n in revisit if n.graph is gm.graph and not n._erased)  # in order
    if applied:
        clean(gm)
    declined: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        for rule, verdict, role, fn in notes.get(node, []) if node.users else []:
            declined.setdefault(rule, []).append(_near_miss(node, verdict, role, fn))
    return PassResult(gm, bool(applied), dict(applied), declined)


def _visit(
    gm: fx.GraphModule,
    node: fx.Node,
    rules: Sequence[Rule],
    memo: dict,
    notes: dict,
    applied: Counter,
    limit: int,
) -> set[fx.Node]:
    """Try the rules at `node` in order and fire the first that matches, checks and builds;
    note the declined matches in `notes`. Return the nodes to visit again: those around the
    rewrite, or none when nothing fired."""
    for rule in rules:
        with unchanged(gm, memo):  # matching and checks are pure: analyses are shared
            match = rule.match(gm, node)
            verdict = rule.check(match) if match is not None else None
        if match is None:
            continue
        if _declines(verdict):
            notes.setdefault(node, []).append((rule.name, verdict, "check", rule.check))
            continue
        match = replace(match, plan=verdict)
        with _recording(gm) as (created, freed):
            with gm.graph.inserting_before(match.root):
                replacement = rule.build(match)
            edited(memo)  # a build may edit the graph, even one that declines and undoes it
            if replacement is None or isinstance(replacement, Declined):
                notes.setdefault(node, []).append((rule.name, replacement, "build", rule.build))
                continue
            if replacement is not match.root:
                replacement.meta.setdefault("stack_trace", match.root.meta.get("stack_trace"))
                match.root.replace_all_uses_with(replacement)
            if not match.root._erased:
                erase_dead(gm, match.root)
        applied[rule.name] += 1
        if sum(applied.values()) >= limit:
            raise RewriteError(
                f"rules did not settle after {limit} rewrites (last to fire: {rule.name!r}); "
                "a rule that undoes another, or that matches its own output, is a bug"
            )
        return _around([replacement, *created, *freed])  # `node` is gone: its other rules too
    return set()


def _declines(verdict: Any) -> bool:
    """Whether a check's result declines: a `decline`, or a bare False or None (which the
    report can only show as "check returned False"). Anything else is the plan."""
    return verdict is None or verdict is False or isinstance(verdict, Declined)


@contextmanager
def _recording(gm: fx.GraphModule) -> Iterator[tuple[list[fx.Node], list[fx.Node]]]:
    """Record the nodes created inside the block, and the inputs of the nodes erased in it
    (their users changed), through torch.fx's node hooks."""
    created: list[fx.Node] = []
    freed: list[fx.Node] = []
    on_create = created.append

    def on_erase(node: fx.Node) -> None:
        freed.extend(node.all_input_nodes)

    gm._register_create_node_hook(on_create)
    gm._register_erase_node_hook(on_erase)
    try:
        yield created, freed
    finally:
        gm._unregister_create_node_hook(on_create)
        gm._unregister_erase_node_hook(on_erase)


# How far below a changed node a match can still see it: the longest chain between a pattern's
# first node and its root (an attention chain, a sum of several branches), with room to spare.
_REACH = 8


def _around(changed: Sequence[fx.Node]) -> set[fx.Node]:
    """The nodes whose match or check a rewrite may have changed: the live `changed` nodes
    (new nodes, the replacement, inputs that lost a user), their inputs (whose users changed),
    and every node up to `_REACH` uses below those (roots of patterns that contain them)."""
    near = {n for n in changed if not n._erased}
    near |= {i for n in near for i in n.all_input_nodes}
    frontier = list(near)
    for _ in range(_REACH):
        frontier = [user for n in frontier for user in n.users if user not in near]
        near.update(frontier)
    return near


def _near_miss(node: fx.Node, verdict: Any, role: str, fn: Callable) -> str:
    """`node (module path): reason`; without a reason, the check or build's name and result."""
    if isinstance(verdict, Declined):
        reason = verdict.reason
    elif fn is _no_build:
        reason = "the rule has no build or replacement"
    else:
        name = getattr(fn, "__name__", "<lambda>")
        reason = f"{role if name == '<lambda>' else name} returned {verdict!r}"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    path = stack[-1][0] if stack and isinstance(stack[-1], tuple) else ""
    return f"{node.name} ({path}): {reason}" if path else f"{node.name}: {reason}"


class Replacement:
    """The `build` of a rule given a `replacement` function: traced on first use with the
    pattern's example tensors (scalars as sentinels), then inlined at each match."""

    def __init__(self, fn: Callable[..., Any], pattern: Pattern):
        self.fn, self.pattern, self._traced = fn, pattern, None
        self.__name__ = getattr(fn, "__name__", "replacement")

    def traced(self) -> Traced:
        if self._traced is None:
            kinds, examples = self.pattern.binding_names, self.pattern.traced.examples
            self._traced = trace_replacement(self.fn, kinds, examples, self.pattern.name)
        return self._traced

    def __call__(self, match: Match) -> fx.Node | Declined:
        return _inline(match, self.traced(), self.__name__)


def _inline(match: Match, traced: Traced, name: str) -> fx.Node | Declined:
    """Insert `traced`'s ops at the insertion point, with the match's bound values."""
    gm, source, scalars = match.gm, traced.graph_module, traced.trace.scalars
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    (output,) = pytree.tree_leaves(source.graph.output_node().args[0])
    root = val(match.root)
    device = root.device if isinstance(root, torch.Tensor) else None

    def lookup(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return values[a]
        return match.bindings[scalars[a]] if type(a) is float and a in scalars else a

    created: list[fx.Node] = []
    try:
        bound = [match.bindings[n] for n in traced.tensor_names]
        values = dict(zip(placeholders, bound, strict=True))
        for node in _ancestors(source, output):
            if node.op == "get_attr":  # a tensor the replacement creates, on the model's device
                tensor = get_attribute(source, node.target).to(device)
                values[node] = add_constant(gm, tensor, f"{name}_{node.target}")
            else:
                args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lookup)
                values[node] = call(gm, node.target, args, kwargs)
            created.append(values[node])
        _check_like(values[output], match.root)
    except Exception as error:  # the bound values do not fit the replacement: decline
        _erase(gm, created)
        return decline(f"replacement {name} does not apply: {first_line(error)}")
    return values[output]


def _ancestors(source: fx.GraphModule, output: fx.Node) -> list[fx.Node]:
    """The get_attr and call nodes that `output` depends on, in graph order."""
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack += node.all_input_nodes
    return [n for n in source.graph.nodes if n in needed and n.op != "placeholder"]


def _check_like(new: Any, old: fx.Node) -> None:
    if not isinstance(new, fx.Node):
        raise TypeError(f"it returns {new!r}, not a graph value")
    a, b = val(new), val(old)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = len(a.shape) == len(b.shape) and all(
            statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)
        )
        if not same or a.dtype != b.dtype:
            raise ValueError(
                f"it computes {a.dtype} {list(a.shape)}, the match {b.dtype} {list(b.shape)}"
            )


def _erase(gm: fx.GraphModule, created: list[fx.Node]) -> None:
    for node in reversed(created):
        if not node.users:
            gm.graph.erase_node(node)
            if node.op == "get_attr" and hasattr(gm, node.target):
                delattr(gm, node.target)


__all__ = ["Declined", "Match", "PassResult", "Rule", "decline", "rewrite"]
