"""Rules and the greedy driver that applies them until nothing changes.

A rule is data: a name, a pattern, a pure `check`, and a `build` that writes the replacement
(or returns None to decline). The driver walks the graph, tries every rule at every node, and
stops at a fixed point. A rule set that keeps firing forever is a bug and raises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .errors import RewriteError
from .graph import clean, erase_dead, is_op

Pattern = Sequence[Any] | Callable[[fx.Node], "Sequence[fx.Node] | None"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns; the attribute names follow torch.fx's own PassResult."""

    graph_module: fx.GraphModule
    modified: bool
    applied: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    """The nodes a pattern matched, producer first; `root` is the node being replaced."""

    gm: fx.GraphModule
    nodes: tuple[fx.Node, ...]

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]

    def __getitem__(self, index: int) -> fx.Node:
        return self.nodes[index]


@dataclass(frozen=True)
class Rule:
    """A local rewrite.

    `pattern` is either a chain of ops, producer first, each feeding the next one's first
    argument (an element may be a tuple of alternative ops), or a function from a node to the
    matched nodes (root last) or None. `check(match)` is pure. `build(match)` inserts the
    replacement and returns the node that takes the root's place, or None to decline; it must
    not change the graph when it declines.
    """

    name: str
    pattern: Pattern
    check: Callable[[Match], bool] = lambda match: True
    build: Callable[[Match], fx.Node | None] = lambda match: None

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | None:
        nodes = _match_pattern(self.pattern, node)
        return Match(gm, tuple(nodes)) if nodes else None


def _match_pattern(pattern: Pattern, node: fx.Node) -> Sequence[fx.Node] | None:
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
    """Apply `rules` greedily until none fires; return what fired and how often."""
    applied: Counter[str] = Counter()
    limit = max_rounds if max_rounds is not None else 4 * len(gm.graph.nodes) + 16
    for _ in range(limit):
        fired = _apply_once(gm, rules)
        if fired is None:
            if applied:
                clean(gm)
            return PassResult(gm, bool(applied), dict(applied))
        applied[fired] += 1
    raise RewriteError(
        f"rules did not settle after {limit} rewrites (last to fire: {fired!r}); "
        "a rule that undoes another, or that matches its own output, is a bug"
    )


def _apply_once(gm: fx.GraphModule, rules: Sequence[Rule]) -> str | None:
    for node in list(gm.graph.nodes):
        if not node.users:  # nothing reads it: replacing it changes nothing (and would repeat)
            continue
        for rule in rules:
            match = rule.match(gm, node)
            if match is None or not rule.check(match):
                continue
            with gm.graph.inserting_before(match.root):
                replacement = rule.build(match)
            if replacement is None:
                continue
            replacement.meta.setdefault("stack_trace", match.root.meta.get("stack_trace"))
            match.root.replace_all_uses_with(replacement)
            erase_dead(gm, match.root)
            return rule.name
    return None
