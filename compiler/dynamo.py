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
import re
import time

import torch
from torch import fx, nn

from .capture import capture
from .finalize import OptimizedModule, finalize, output_aliases
from .ir.errors import CaptureError
from .pipeline import PassPlan, optimize_graph, plan
from .report import Report
from .verify import check_equivalent, input_sets

log = logging.getLogger("fxopt")


class _Frozen(nn.Module):
    """A Dynamo graph with its weight inputs bound as buffers, called with the other inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs, weight_positions: list[int]):
        super().__init__()
        self.gm = gm
        self.count = len(example_inputs)
        placeholders = gm.graph.find_nodes(op="placeholder")
        self.names = _weight_names([placeholders[i] for i in weight_positions])
        self.weight_positions = dict(zip(weight_positions, self.names, strict=True))
        for i, name in self.weight_positions.items():
            self.register_buffer(name, example_inputs[i].detach())

    def forward(self, *args):
        it = iter(args)
        full = [
            getattr(self, self.weight_positions[i]) if i in self.weight_positions else next(it)
            for i in range(self.count)
        ]
        return self.gm(*full)


def _weight_names(placeholders: list[fx.Node]) -> list[str]:
    """Buffer names for Dynamo's weight inputs, after the model's own (``L['self']._modules
    ['p1']._parameters['weight']`` is ``p1_weight``), so the report names what a user wrote."""
    names: list[str] = []
    for i, node in enumerate(placeholders):
        source = getattr(node.meta.get("grapharg"), "source", None)
        text = getattr(source, "name", "")
        parts = re.findall(r"\['([^']+)'\]", text() if callable(text) else str(text))
        name = "_".join(p for p in parts if p != "self") or f"w{i}"
        name = re.sub(r"\W", "_", name)
        names.append(name if name not in names and name.isidentifier() else f"w{i}_{name}")
    return names


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


def _detached_copy(value):
    """A copy of a graph input for capturing and verifying the graph: torch.export run inside
    Dynamo's backend must not touch the tensors Dynamo is about to build its guards from (seen
    on a resume frame whose inputs are a tensor and a view of it: Dynamo's own "guard failed on
    the same frame it was created" assertion)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


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


def make_backend(steps: PassPlan | None = None, verify: bool = True, report: Report | None = None):
    """A Dynamo backend that optimizes each captured graph with the passes of `steps` (default:
    the default pipeline), once per set of weights it is called with (see the module
    docstring)."""
    steps = steps if steps is not None else plan()

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
            args = tuple(_detached_copy(flat[i]) for i in runtime)
            frozen = _Frozen(gm, flat, weights).eval()
            captured = capture(frozen, args, dynamic_batch=False)
            graph_report.notes += [n for n in captured.kept_in_place if n not in graph_report.notes]
            sets = input_sets(args) if verify else []
            aliases = output_aliases(captured.graph_module)  # a pass may drop a copy
            optimized = optimize_graph(
                captured.graph_module, args, steps, verify, graph_report, None
            )
            optimized = finalize(optimized, aliases)
            if verify:
                check_equivalent(frozen, optimized, sets)
            return optimized

        graphs = _PerWeights(gm, weights, runtime, optimize_for)
        graphs.add(
            example_inputs, report if report is not None else Report("dynamo graph", "eager")
        )
        return graphs

    return backend


def fxopt_backend(gm: fx.GraphModule, example_inputs, options=None):
    """`torch.compile(model, backend="fxopt")`: the default pipeline on each graph.
    ``torch.compile(..., options={"canonicalize_attention": {"always": True}})`` gives its
    passes settings, as ``optimize(..., options=...)`` does."""
    return make_backend(plan(options=options))(gm, example_inputs)


def optimize_with_dynamo(
    model: nn.Module, inputs: tuple, steps: PassPlan, verify: bool, report: Report, start: float
):
    report.capture = "dynamo fallback"
    explanation = torch._dynamo.explain(model)(*inputs)
    report.graph_breaks = [_describe_break(b) for b in explanation.break_reasons]
    compiled = torch.compile(model, backend=make_backend(steps, verify, report), dynamic=False)
    try:
        with torch.no_grad():
            compiled(*inputs)  # compiles every graph now, so the report is complete
            if verify:
                report.final_error = check_equivalent(
                    model, compiled, input_sets(inputs, n_random=1)
                )
    except torch._dynamo.exc.TorchDynamoException as error:
        raise _typed(error, model) from error
    report.seconds["total"] = time.perf_counter() - start
    return OptimizedModule(model, report, compiled)


def _typed(error: Exception, model: nn.Module) -> Exception:
    """The error a Dynamo failure stands for: what fxopt's backend raised (a typed error, or a
    bug to see as it is), or a CaptureError when Dynamo itself could not trace the model (eager
    ran the example)."""
    if isinstance(error, torch._dynamo.exc.BackendCompilerFailed):
        return error.inner_exception
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return CaptureError(
        f"neither torch.export nor Dynamo could capture {type(model).__name__} (eager runs the "
        f"example): {type(error).__name__}: {first}"
    )


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
