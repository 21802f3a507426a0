"""The `fxopt` Dynamo backend, and the fallback `optimize` takes when torch.export cannot
capture the whole model (data-dependent control flow): Dynamo splits the model into graphs,
each graph is captured and optimized like a whole model, and graph breaks run eagerly.

Weights are constants of each optimized graph, so that passes can fold them, and every call checks
that they are still the weights it was optimized for. Dynamo does not guard on which module a
graph came from: two instances of one class share the graph it captured, each passing its own
parameters and buffers. The guard compares each weight by identity, storage and version counter;
another module's weights, or weights changed in place (`with torch.no_grad(): w.mul_(2)`,
`load_state_dict`, `w.data = ...`), get the graph optimized again for them. A graph is optimized
at most `MAX_OPTIMIZATIONS` times; past that, calls with new weights run the captured graph
unoptimized, with a warning. A write through `w.data.mul_(...)` bypasses the version counter and
is not seen: call `torch.compiler.reset()` and compile again after one.
"""

from __future__ import annotations

import logging
import operator
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


class _WeightGuard:
    """The weight tensors a graph was optimized for: identity, storage and version counter."""

    def __init__(self, flat, positions: list[int]):
        self.positions = positions
        self.tensors = [flat[i] for i in positions]
        self.pointers = [t.data_ptr() for t in self.tensors]
        self.versions = [t._version for t in self.tensors]

    def same_tensors(self, flat) -> bool:
        return all(map(operator.is_, [flat[i] for i in self.positions], self.tensors))

    def matches(self, flat) -> bool:  # every call runs this: lists, not generators, are faster
        current = [flat[i] for i in self.positions]
        return (
            all(map(operator.is_, current, self.tensors))
            and [t._version for t in current] == self.versions
            and [t.data_ptr() for t in current] == self.pointers
        )


def _is_weight(node: fx.Node, value) -> bool:
    source = repr(getattr(node.meta.get("grapharg"), "source", ""))
    return isinstance(value, nn.Parameter) or "'_buffers'" in source or "'_parameters'" in source


MAX_OPTIMIZATIONS = 8  # per captured graph: new weight sets beyond this run unoptimized


class _PerWeights:
    """The optimized forms of one Dynamo graph, one per set of weights it has been called with."""

    def __init__(self, gm: fx.GraphModule, weights: list[int], runtime: list[int], optimize_for):
        self.gm, self.weights, self.runtime, self.optimize_for = gm, weights, runtime, optimize_for
        self.variants: list[tuple[_WeightGuard, nn.Module]] = []
        self.optimizations = 0

    def add(self, flat, report: Report) -> nn.Module:
        self.optimizations += 1
        optimized = self.optimize_for(flat, report)
        self.variants = [v for v in self.variants if not v[0].same_tensors(flat)]  # now stale
        self.variants.insert(0, (_WeightGuard(flat, self.weights), optimized))
        return optimized

    def __call__(self, *flat):
        for guard, optimized in self.variants:
            if guard.matches(flat):
                return optimized(*[flat[i] for i in self.runtime])
        if self.optimizations < MAX_OPTIMIZATIONS:
            log.info("fxopt backend: optimizing a graph again, for weights it has not seen")
            optimized = self.add(flat, Report("dynamo graph", "eager"))
            return optimized(*[flat[i] for i in self.runtime])
        if self.optimizations == MAX_OPTIMIZATIONS:
            self.optimizations += 1
            log.warning(
                "fxopt backend: a graph met %d sets of weights; new weights now run it "
                "unoptimized (call torch.compiler.reset() to start over)",
                MAX_OPTIMIZATIONS,
            )
        return self.gm(*flat)


def make_backend(names=DEFAULT_PIPELINE, verify: bool = True, report: Report | None = None):
    """A Dynamo backend that optimizes each captured graph with the named passes, once per set of
    weights it is called with (see the module docstring)."""
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

        def optimize_for(flat, graph_report: Report) -> nn.Module:
            args = tuple(flat[i] for i in runtime)
            frozen = _Frozen(gm, flat, weights).eval()
            captured = capture(frozen, args, dynamic_batch=False)
            graph_report.notes += [n for n in captured.kept_in_place if n not in graph_report.notes]
            sets = input_sets(args) if verify else []
            optimized = optimize_graph(
                captured.graph_module, args, names, verify, graph_report, None
            )
            optimized = finalize(optimized)
            if verify:
                check(frozen, optimized, sets)
            return optimized

        graphs = _PerWeights(gm, weights, runtime, optimize_for)
        graphs.add(
            example_inputs, report if report is not None else Report("dynamo graph", "eager")
        )
        return graphs

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
