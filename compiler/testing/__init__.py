"""Testing helpers for passes and optimized models.

`assert_equivalent` needs only torch; `strategies` needs hypothesis (the `dev` extra) and is
imported on first use.
"""

from __future__ import annotations

import importlib

from ..verify import check, input_sets


def assert_equivalent(reference, candidate, inputs, rtol=None, atol=None, n_random: int = 0):
    """Assert that `candidate(*inputs)` matches `reference(*inputs)` within the tolerance
    (max |a-b| <= rtol * max|a| + atol, dtype-aware defaults), also on `n_random` fresh inputs of
    the same shapes. Returns the largest absolute error; raises VerificationError otherwise."""
    inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    return check(reference, candidate, input_sets(inputs, n_random), rtol, atol)


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


def __getattr__(name: str):
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(name)


__all__ = ["apply_pass", "assert_equivalent", "count_ops", "graph_of", "strategies"]
