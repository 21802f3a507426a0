"""Testing helpers for passes and optimized models.

`assert_equivalent` needs only torch. `strategies` (random models and inputs) and `check_pass`
(property-based equivalence testing of a pass) need hypothesis, the `dev` extra, and are
imported on first use:

    from fxopt.testing import check_pass

    def test_my_pass():
        check_pass(my_pass)
"""

from __future__ import annotations

import importlib

from .. import verify  # not `from ..verify import check`: the submodule `check` would shadow it


def assert_equivalent(reference, candidate, inputs, rtol=None, atol=None, n_random: int = 0):
    """Assert that `candidate(*inputs)` matches `reference(*inputs)` within the tolerance
    (max |a-b| <= rtol * max|a| + atol, dtype-aware defaults), also on `n_random` fresh inputs of
    the same shapes. Returns the largest absolute error; raises VerificationError otherwise."""
    inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    return verify.check(reference, candidate, verify.input_sets(inputs, n_random), rtol, atol)


def graph_of(model, *inputs, dynamic_batch: bool = False):
    """The ATen-level GraphModule a pass sees for `model(*inputs)` (an eval-mode copy)."""
    import copy

    from ..capture import capture

    return capture(copy.deepcopy(model).eval(), inputs, dynamic_batch).graph_module


def apply_pass(pass_fn, model, *inputs, rtol=None, atol=None, dynamic_batch: bool = False):
    """Capture `model`, run `pass_fn` on the graph, assert the result still matches the eager
    model (on `inputs` and one fresh set), and return the pass's PassResult."""
    import copy

    from ..graph import clean

    reference = copy.deepcopy(model).eval()
    result = pass_fn(graph_of(reference, *inputs, dynamic_batch=dynamic_batch))
    clean(result.graph_module)
    assert_equivalent(reference, result.graph_module, inputs, rtol, atol, n_random=1)
    return result


def count_ops(gm, *ops) -> int:
    """How many nodes of `gm` call one of `ops`."""
    from ..graph import is_op

    return sum(is_op(node, *ops) for node in gm.graph.nodes)


_LAZY = {  # name -> module that defines it; these need hypothesis
    "strategies": None,
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
    "assert_equivalent",
    "check_pass",
    "count_ops",
    "graph_of",
    "strategies",
]
