"""Run one `check_pass` example: capture the model, run the pass, compare with eager."""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..ir.errors import VerificationError
from ..ir.graph import clean
from ..verify import check_equivalent, input_sets, max_error, tolerance
from . import graph_of
from .failure import measure_error


def example_key(model: nn.Module, example_inputs) -> tuple | None:
    """What identifies an example, for drawn specs: equal specs and inputs, equal results."""
    spec, code = getattr(model, "fxopt_spec", None), getattr(example_inputs, "code", None)
    return (repr(spec), code) if spec is not None and code is not None else None


@dataclass
class Outcome:
    """How an example failed: the stage, the error (and where it was raised, for an exception
    from the pass or the rewritten graph), the rules that fired, and the error and its bound."""

    stage: str
    error: str
    applied: dict
    measured: tuple[float, float] | None = None
    trace: str = ""
    other_batch: int | None = None  # the batch size of the last input set checked, if any

    @classmethod
    def raised(cls, stage: str, error: Exception, applied: dict) -> Outcome:
        frames = traceback.format_tb(error.__traceback__)[-3:]
        return cls(stage, describe(error), applied, trace="".join(frames).rstrip())


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


SKIP = "skip"


def run_example(run_pass, model: nn.Module, example_inputs, rtol, atol, summary):
    """Capture, run the pass, compare with eager: None when the pass kept the outputs, an
    Outcome when it did not, SKIP for a model too ill-conditioned to judge."""
    reference = model.eval()
    if not is_well_conditioned(reference, example_inputs):
        summary.skipped += 1
        return SKIP
    gm = graph_of(reference, *example_inputs, dynamic_batch=True)
    try:
        result = run_pass(gm)
        rewritten = clean(result.graph_module)
    except Exception as error:  # a pass must decline, never raise
        return Outcome.raised("the pass raised", error, {})
    applied = {rule: count for rule, count in result.applied.items() if count}
    if result.modified or applied:
        summary.fired += 1
        summary.applied.update(applied)
    other = other_batch(gm, example_inputs)
    sets = input_sets(tuple(example_inputs), n_random=1, other_batch=other)
    try:
        check_equivalent(reference, rewritten, sets, rtol, atol)
    except VerificationError as error:
        measured = measure_error(reference, rewritten, sets, rtol, atol)
        return Outcome("the outputs differ", describe(error), applied, measured, "", other)
    except Exception as error:
        outcome = Outcome.raised("the rewritten graph raised", error, applied)
        outcome.other_batch = other
        return outcome
    return None


def is_well_conditioned(model: nn.Module, example_inputs) -> bool:
    """Whether float32 rounding alone stays within a quarter of the tolerance: the model agrees
    with its float64 copy. Where it does not, no rewrite can be judged exact up to rounding."""
    leaves = pytree.tree_leaves(example_inputs)
    if not any(getattr(leaf, "dtype", None) == torch.float32 for leaf in leaves):
        return True
    rtol, atol = tolerance(torch.float32)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(*pytree.tree_map(_widen, example_inputs))
        rounded = pytree.tree_map(_widen, model(*example_inputs))
        try:
            max_error(exact, rounded, rtol / 4, atol / 4)
        except VerificationError:
            return False
    return True


def _widen(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


def other_batch(gm: fx.GraphModule, example_inputs) -> int | None:
    """Another batch size to check at, when the captured batch is symbolic."""
    values = [node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder"]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            if isinstance(value.shape[0], torch.SymInt):
                return example_inputs[0].shape[0] + 2
    return None
