"""Tracing pattern and replacement functions to ATen graphs, the way fxopt captures models.

A function is traced with torch.export (non-strict) on example tensors. Scalar parameters and
`wildcards.scalar` calls are sentinel floats that `fxopt.pattern` finds again in the graph.
Parameters without an example tensor get a small float tensor whose shape is chosen when the
first op reads it: the first shape in `_SHAPES` that the op accepts.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..ir.errors import InputError, first_line
from ..ir.export import export
from .wildcards import PatternTrace, kind_of, tracing

# every dimension 4; a 1x1 kernel after the 4x4 one keeps the spatial size of a conv chain
_SHAPES = ((4,), (4, 4), (4,) * 4, (4, 4, 1, 1), (4,) * 3, (4, 4, 1), (4,) * 5, (4, 4, 1, 1, 1))
_MAX_TRIES = 4096


@dataclass(frozen=True)
class Param:
    """A parameter of a pattern or replacement function; `kind` as in `Wildcard.kind`."""

    name: str
    kind: str = "any"


@dataclass(frozen=True)
class Traced:
    """A traced pattern or replacement function."""

    graph_module: fx.GraphModule
    tensor_names: tuple[str, ...]  # the graph's placeholders, in order
    trace: PatternTrace
    examples: dict[str, torch.Tensor]


def parameters(fn: Callable) -> list[Param]:
    """`fn`'s parameters, with the wildcard kind their annotation or default declares."""
    try:
        signature = inspect.signature(fn, eval_str=True)
    except Exception as error:  # a string annotation that names something not imported
        raise InputError(f"{fn.__name__}: cannot read its annotations ({error})") from None
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InputError(f"{fn.__name__}: a pattern function takes named parameters only")
        params.append(Param(p.name, kind_of(p.annotation, p.default)))
    return params


def trace_function(fn: Callable, params: list[Param], examples: Mapping[str, Any]) -> Traced:
    """Trace `fn` with torch.export (non-strict), scalars as sentinels, tensors as examples."""
    tensor_names = tuple(p.name for p in params if p.kind != "scalar")
    unknown = set(examples) - set(tensor_names)
    if unknown:
        raise InputError(f"{fn.__name__}: examples for unknown parameters {sorted(unknown)}")
    scalar_names = [p.name for p in params if p.kind == "scalar"]

    def run(tensors: dict) -> tuple[Any, PatternTrace]:
        with tracing(PatternTrace()) as trace:
            scalars = {name: trace.scalar(name) for name in scalar_names}
            return fn(**tensors, **scalars), trace

    given = {k: v if isinstance(v, torch.Tensor) else torch.randn(v) for k, v in examples.items()}
    found = infer_examples(fn, run, tensor_names, given)
    traces: list[PatternTrace] = []  # export restores module attributes, so keep it outside
    module = _Call(run, tensor_names, traces.append)
    try:
        gm = export(module, tuple(found[n] for n in tensor_names), dynamic=False)
    except Exception as error:
        raise InputError(f"could not trace {fn.__name__}: {first_line(error)}") from error
    return _check_scalars_used(Traced(gm, tensor_names, traces[-1], found), fn)


def _check_scalars_used(traced: Traced, fn: Callable) -> Traced:
    nodes = traced.graph_module.graph.nodes
    used = {a for n in nodes for a in pytree.tree_leaves((n.args, n.kwargs)) if type(a) is float}
    scalars = traced.trace.scalars.items()
    missing = [name or "scalar()" for sentinel, name in scalars if sentinel not in used]
    if missing:
        raise InputError(
            f"{fn.__name__}: scalars {missing} do not reach an op unchanged (Python arithmetic "
            "on them would be baked in when tracing); pass them to ops as they are"
        )
    return traced


def trace_replacement(fn: Callable, kinds: dict[str, str], examples: dict, pattern: str) -> Traced:
    """Trace a replacement function: its parameters are some of the pattern's bindings (`kinds`),
    tensors traced with the pattern's `examples`, scalars as sentinels that must reach an op."""
    params = parameters(fn)
    unknown = [p.name for p in params if p.name not in kinds]
    if unknown:
        raise InputError(
            f"replacement {fn.__name__}: {unknown} bound by no parameter or wildcards.scalar "
            f"of pattern {pattern}"
        )
    params = [Param(p.name, kinds[p.name]) for p in params]
    tensors = {p.name: examples[p.name] for p in params if p.kind != "scalar"}
    return trace_function(fn, params, tensors)


class _Call(nn.Module):
    def __init__(self, run: Callable, names: tuple[str, ...], keep: Callable):
        super().__init__()
        self.run, self.names, self.keep = run, names, keep

    def forward(self, *tensors):
        out, trace = self.run(dict(zip(self.names, tensors, strict=True)))
        self.keep(trace)
        return out


def infer_examples(fn: Callable, run: Callable, names: tuple, given: dict) -> dict:
    """Example tensors for `names`: the given ones, and for the others the first small shape
    (from `_SHAPES`) that the first op reading the parameter accepts."""
    unknown = [n for n in names if n not in given]
    if not unknown:
        return dict(given)
    search = _ShapeSearch({n: torch.empty(0).as_subclass(_Unshaped) for n in unknown})
    token = _SEARCH.set(search)
    try:
        run({**given, **search.placeholders})
    except _NoShape as error:
        raise InputError(
            f"could not guess example shapes for {fn.__name__}: {error}; pass "
            f"fxopt.pattern({fn.__name__}, examples={{'x': (1, 3, 8, 8), ...}})"
        ) from None
    except Exception as error:
        raise InputError(f"could not run {fn.__name__}: {first_line(error)}") from error
    finally:
        _SEARCH.reset(token)
    return {**given, **{n: search.example(p) for n, p in search.placeholders.items()}}


class _NoShape(Exception):
    pass


class _Unshaped(torch.Tensor):
    """A pattern parameter whose shape is chosen when an op first reads it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _SEARCH.get().call(func, args, kwargs or {})


_SEARCH: contextvars.ContextVar = contextvars.ContextVar("fxopt_shape_search")  # this thread's


class _ShapeSearch:
    def __init__(self, placeholders: dict[str, torch.Tensor]):
        self.placeholders, self.values = placeholders, {}

    def example(self, placeholder) -> torch.Tensor:
        return self.values.get(id(placeholder), torch.randn(_SHAPES[0]))

    def call(self, func, args, kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        todo = list({id(a): a for a in leaves if isinstance(a, _Unshaped)}.values())
        todo = [a for a in todo if id(a) not in self.values]
        error = None
        for shapes in itertools.islice(itertools.product(_SHAPES, repeat=len(todo)), _MAX_TRIES):
            trial = {id(a): torch.randn(s) for a, s in zip(todo, shapes, strict=True)}
            values = {**self.values, **trial}
            try:
                result = _call_plain(func, args, kwargs, values)
            except Exception as e:  # a shape the op rejects: try the next one
                error = e
                continue
            self.values = values
            return result
        raise _NoShape(f"{getattr(func, '__name__', func)} rejects the shapes tried ({error})")


def _call_plain(func: Callable, args: tuple, kwargs: dict, values: dict[int, torch.Tensor]):
    plain_args, plain_kwargs = pytree.tree_map(lambda a: values.get(id(a), a), (args, kwargs))
    with torch._C.DisableTorchFunctionSubclass():
        return func(*plain_args, **plain_kwargs)
