"""Testing helpers for passes and optimized models.

`assert_equivalent` needs only torch. `strategies` (random models and inputs) and `check_pass`
(property-based equivalence testing of a pass) need hypothesis, the `dev` extra, and are
imported on first use:

    from fxopt.testing import check_pass

    def test_my_pass():
        check_pass(my_pass)
"""

from __future__ import annotations

import copy
import functools
import importlib

import torch
from torch import fx

from .. import verify
from ..capture import capture
from ..ir.export import as_tuple
from ..ir.graph import clean, constant, is_op
from ..precision import float64_copy, float64_inputs, judge
from .resolve import resolve_pass


def assert_equivalent(
    reference, candidate, inputs, rtol=None, atol=None, n_random: int = 0, float64: bool = False
):
    """Assert that `candidate(*inputs)` matches `reference(*inputs)` within the tolerance
    (max |a-b| <= rtol * max|a| + atol, dtype-aware defaults), also on `n_random` fresh inputs of
    the same shapes. Returns the largest absolute error; raises VerificationError otherwise.

    With `float64`, a miss at the default tolerance is judged as ``optimize`` judges one (see
    `fxopt.precision`): both run again in float64 (an OptimizedModule as its ``graph_module``),
    and the candidate passes when it agrees with the reference there and is no further from the
    float64 result in float32 than the reference is, each within the same bound."""
    inputs = as_tuple(inputs)
    sets = verify.input_sets(inputs, n_random)
    try:
        return verify.check_equivalent(reference, candidate, sets, rtol, atol)
    except verify.VerificationError as error:
        if not float64 or rtol is not None or atol is not None:
            raise
        return _float64_verdict(error, reference, candidate, sets)


def _float64_verdict(error, reference, candidate, sets) -> float:
    ref32, cand32 = verify.outputs(reference, sets), verify.outputs(candidate, sets)
    candidate = getattr(candidate, "graph_module", candidate)  # an OptimizedModule's graph
    doubles = [float64_inputs(args) for args in sets]
    try:
        ref64 = verify.outputs(float64_copy(reference), doubles)
        cand64 = verify.outputs(float64_copy(candidate), doubles)
    except Exception as crash:  # a model that cannot run in float64 has no verdict
        raise verify.VerificationError(f"{error} (no float64 check: {crash})") from None
    moved = []  # the reference with its weights rounded, built only if an output needs it

    def rounded(i: int):
        if not moved:
            moved.extend(verify.outputs(float64_copy(reference, rounding_seed=0), doubles))
        return moved[i]

    for i, outputs in enumerate(zip(ref32, cand32, ref64, cand64, strict=True)):
        try:
            judge(*outputs, functools.partial(rounded, i))
        except verify.VerificationError as verdict:
            raise verify.VerificationError(f"{error}; float64 check, set {i}: {verdict}") from None
    return max(
        verify.max_error(a, b, rtol=float("inf")) for a, b in zip(ref32, cand32, strict=True)
    )


def graph_of(model, *inputs, dynamic_batch: bool = False):
    """The ATen-level GraphModule a pass sees for `model(*inputs)` (an eval-mode copy)."""
    return capture(copy.deepcopy(model).eval(), inputs, dynamic_batch).graph_module


def apply_pass(pass_fn, model, *inputs, rtol=None, atol=None, dynamic_batch: bool = False):
    """Capture `model`, run `pass_fn` on the graph, assert the result still matches the eager
    model (on `inputs` and one fresh set), and return the pass's PassResult."""
    reference = copy.deepcopy(model).eval()
    result = pass_fn(graph_of(reference, *inputs, dynamic_batch=dynamic_batch))
    clean(result.graph_module)
    assert_equivalent(reference, result.graph_module, inputs, rtol, atol, n_random=1)
    return result


def assert_declines(pass_or_rule, model, *inputs, reason: str | None = None):
    """Assert that a pass declines: run it on `model`'s graph (or on `model` itself when it is a
    GraphModule) and check that it reports no change, that the graph's code and constants are
    as they were and, given `reason`, that one of its near-misses says so (a substring of a
    `PassResult.declined` entry). Returns the PassResult, for checks of its own.

    `pass_or_rule` is what `check_pass` takes: a pass name, a pass function, a Rule or a list of
    rules."""
    _, run_pass = resolve_pass(pass_or_rule)
    gm = model if isinstance(model, fx.GraphModule) else graph_of(model, *inputs)
    code, before = gm.code, _constants(gm)
    result = run_pass(gm)
    assert not result.modified, f"the pass reports a change: {dict(result.applied)}"
    assert result.graph_module.code == code, "the pass declined but changed the graph"
    after = _constants(result.graph_module)
    changed = [name for name, t in before.items() if not torch.equal(t, after[name])]
    assert not changed, f"the pass declined but changed the constants {changed}"
    if reason is not None:
        reasons = [r for found in result.declined.values() for r in found]
        assert any(reason in r for r in reasons), f"no near-miss says {reason!r}: {reasons}"
    return result


def _constants(gm) -> dict:
    """A copy of every tensor the graph reads through `get_attr`, by target."""
    found = ((node.target, constant(gm, node)) for node in gm.graph.find_nodes(op="get_attr"))
    return {target: t.detach().clone() for target, t in found if t is not None}


def count_ops(gm, *ops) -> int:
    """How many nodes of `gm` call one of `ops`."""
    return sum(is_op(node, *ops) for node in gm.graph.nodes)


_LAZY = {  # name -> module that defines it; these need hypothesis
    "check": None,  # check_pass's module (the pytest plugin sets its example count)
    "strategies": None,
    "fuzz": None,  # differential fuzzing of optimize itself
    "check_pass": ".check",
    "CheckSummary": ".check",
    "PassCheckError": ".check",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "CheckSummary",
    "PassCheckError",
    "apply_pass",
    "assert_declines",
    "assert_equivalent",
    "check_pass",
    "count_ops",
    "fuzz",
    "graph_of",
    "strategies",
]
