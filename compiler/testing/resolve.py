"""What the testing kit accepts as a pass: a registered name, a function or rules.

`check_pass` and `assert_declines` both take one; this module needs only torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import fx

from ..rules.registry import get_pass
from ..rules.rewrite import PassResult, Rule, rewrite


def resolve_pass(pass_or_rule) -> tuple[str, Callable[[fx.GraphModule], PassResult]]:
    """(name, gm -> PassResult) for a pass name, a pass function, a Rule or a list of rules."""
    if isinstance(pass_or_rule, str):
        return pass_or_rule, get_pass(pass_or_rule).fn
    if isinstance(pass_or_rule, Rule):
        pass_or_rule = [pass_or_rule]
    if isinstance(pass_or_rule, Sequence) and all(isinstance(r, Rule) for r in pass_or_rule):
        rules = list(pass_or_rule)
        return "rules " + ", ".join(r.name for r in rules), lambda gm: rewrite(gm, rules)
    if not callable(pass_or_rule):
        raise TypeError(f"expected a pass name, function or rules, got {pass_or_rule!r}")
    return pass_name(pass_or_rule), pass_or_rule


def pass_name(fn) -> str:
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in fn.keywords.items()]
        return f"{pass_name(fn.func)}({', '.join(args)})"
    return getattr(fn, "pass_name", None) or getattr(fn, "__qualname__", None) or repr(fn)
