"""The message `check_pass` fails with: what went wrong, by how much, which rules fired, and
the smallest failing model as a script that reproduces it."""

from __future__ import annotations

import textwrap

import torch
from torch.utils import _pytree as pytree

from ..verify import tolerance
from .source import parameter_count, script

SET_NAMES = ("the example inputs", "fresh values of the same shape", "another batch size")


def measure_error(reference, candidate, sets, rtol, atol) -> tuple[float, float] | None:
    """(max |difference|, its bound) on the first input set where the bound is exceeded."""
    with torch.no_grad():
        for args in sets:
            try:
                pairs = zip(
                    pytree.tree_leaves(reference(*args)),
                    pytree.tree_leaves(candidate(*args)),
                    strict=True,
                )
            except Exception:
                return None
            for a, b in pairs:
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                    continue
                if a.shape != b.shape or not a.is_floating_point() or not a.numel():
                    continue
                default_rtol, default_atol = tolerance(a.dtype)
                a, b = a.double(), b.double()
                bound = (default_rtol if rtol is None else rtol) * a.abs().max().item()
                bound += default_atol if atol is None else atol
                error = (a - b).abs().max().item()
                if not error <= bound:  # NaN counts as exceeded
                    return error, bound
    return None


def model_text(model, example_inputs) -> str:
    """The model as a script when it was drawn from a spec, else its repr and input shapes."""
    spec = getattr(model, "fxopt_spec", None)
    code = getattr(example_inputs, "code", None)
    if spec is not None:
        return script(spec, code)
    shapes = [tuple(t.shape) for t in pytree.tree_leaves(example_inputs) if hasattr(t, "shape")]
    return f"{model!r}\n# input shapes: {shapes}\n"


def failure_message(name: str, model, example_inputs, outcome, first) -> tuple[str, str]:
    """(message, reproducing script) for a failing example."""
    spec = getattr(model, "fxopt_spec", None)
    text = model_text(model, example_inputs)
    size = plural(parameter_count(model), "parameter")
    if spec is not None:
        size = f"{plural(spec.count_blocks(), 'block')}, {size}"
    lines = [f"check_pass({name}): {outcome.stage}.", f"  {outcome.error}"]
    if outcome.trace:
        lines.append(textwrap.indent(outcome.trace, "  "))
    if outcome.measured is not None:
        error, bound = outcome.measured
        lines.append(f"  max |difference| {error:.3g}, bound {bound:.3g} ({error / bound:.3g}x)")
    lines += [
        f"  rules fired: {outcome.applied or 'none'}",
        f"  input sets: {', '.join(SET_NAMES[: 3 if outcome.other_batch else 2])}",
        f"  first counterexample after {plural(first.examples, 'example')} "
        f"({first.seconds:.1f} s); smallest found: {size}.",
        "  to reproduce, save the script below as repro.py and run",
        "    from repro import model, inputs",
        "    from fxopt.verify import check_equivalent, input_sets",
        "    graph = fxopt.testing.graph_of(model, *inputs, dynamic_batch=True)",
        "    gm = <the pass>(graph).graph_module",
        f"    sets = input_sets(inputs, n_random=1, other_batch={outcome.other_batch})",
        "    check_equivalent(model, gm, sets)",
        "",
        text.rstrip(),
    ]
    return "\n".join(lines), text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
