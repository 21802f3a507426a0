"""The `fxopt` Dynamo backend, and the fallback `optimize` takes when torch.export cannot
capture the whole model (data-dependent control flow): Dynamo splits the model into graphs,
each graph is captured and optimized like a whole model, and graph breaks run eagerly.

Weights are frozen: parameters and buffers are read once, at compile time, as constants. This is
an inference backend; re-compile after changing weights.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import fx, nn

from .capture import capture
from .finalize import finalize
from .pipeline import DEFAULT_PIPELINE
from .report import Report
from .verify import check, input_sets

log = logging.getLogger("fxopt")


class _Frozen(nn.Module):
    """A Dynamo graph with its weight inputs bound as buffers, called with the other inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs, weight_positions: list[int]):
        super().__init__()
        self.gm = gm
        self.count = len(example_inputs)
        self.weight_positions = weight_positions
        for i in weight_positions:
            self.register_buffer(f"w{i}", example_inputs[i].detach())

    def forward(self, *args):
        it = iter(args)
        full = [
            getattr(self, f"w{i}") if i in self.weight_positions else next(it)
            for i in range(self.count)
        ]
        return self.gm(*full)


def _is_weight(node: fx.Node, value) -> bool:
    source = repr(getattr(node.meta.get("grapharg"), "source", ""))
    return isinstance(value, nn.Parameter) or "'_buffers'" in source or "'_parameters'" in source


def make_backend(names=DEFAULT_PIPELINE, verify: bool = True, report: Report | None = None):
    """A Dynamo backend that optimizes each captured graph with the named passes."""
    from .api import optimize_graph

    def backend(gm: fx.GraphModule, example_inputs):
        if not all(isinstance(x, torch.Tensor) for x in example_inputs):
            log.warning("fxopt backend: symbolic inputs; running this graph unoptimized")
            return gm.forward
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        weights = [
            i
            for i, (n, x) in enumerate(zip(placeholders, example_inputs, strict=True))
            if _is_weight(n, x)
        ]
        runtime = [i for i in range(len(example_inputs)) if i not in weights]
        args = tuple(example_inputs[i] for i in runtime)
        frozen = _Frozen(gm, example_inputs, weights).eval()
        graph_report = report if report is not None else Report("dynamo graph", "eager")
        captured = capture(frozen, args, dynamic_batch=False)
        graph_report.notes += [n for n in captured.kept_in_place if n not in graph_report.notes]
        optimized = captured.graph_module
        sets = input_sets(args) if verify else []
        optimized = finalize(optimize_graph(optimized, args, names, verify, graph_report, None))
        if verify:
            check(frozen, optimized, sets)

        def run(*flat):
            return optimized(*[flat[i] for i in runtime])

        return run

    return backend


def fxopt_backend(gm: fx.GraphModule, example_inputs):
    """`torch.compile(model, backend="fxopt")`: the default pipeline on each graph."""
    return make_backend()(gm, example_inputs)


def optimize_with_dynamo(
    model: nn.Module, inputs: tuple, names, verify: bool, report: Report, start: float
):
    from .api import OptimizedModule

    report.capture = "dynamo fallback"
    explanation = torch._dynamo.explain(model)(*inputs)
    report.graph_breaks = [_describe_break(b) for b in explanation.break_reasons]
    compiled = torch.compile(model, backend=make_backend(names, verify, report), dynamic=False)
    with torch.no_grad():
        compiled(*inputs)  # compiles every graph now, so the report is complete
        if verify:
            report.final_error = check(model, compiled, input_sets(inputs, n_random=1))
    report.seconds["total"] = time.perf_counter() - start
    return OptimizedModule(model, report, compiled)


def _describe_break(reason) -> str:
    frame = reason.user_stack[-1] if getattr(reason, "user_stack", None) else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return f"{str(reason.reason).splitlines()[0][:120]}{where}"


def register() -> None:
    from torch._dynamo.backends.registry import register_backend

    try:
        register_backend(name="fxopt")(fxopt_backend)
    except Exception:  # already registered (module reloaded)
        pass
