"""Make the optimized graph cheap to call, and keep the model's call contract.

`ep.module()` re-checks every call's inputs against the export's range constraints in a forward
pre-hook and a `_guards_fn` submodule, and reads each weight through a chain of submodule
lookups. On a small model at batch 1 that costs about a tenth of the run time. fxopt replaces the
checks with its own (`InputSpec`: the model's signature, then a shape-and-dtype check per tensor
and an equality check per other argument, which the graph was specialized to) and reads each
weight from a flat attribute. An output that shares memory with an input, a weight or another
output where the model's did not (a pass removed a `clone`) gets a copy of its own. An
activation whose input is a fresh temporary that nothing else reads (a conv's output) writes
its result into that input, as eager models do with `ReLU(inplace=True)`: one tensor less to
allocate and stream through the cache (mobileone_s0 at one thread: about 6% of its run time).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .ir.errors import InputError
from .ir.graph import CONSTANT_PREFIX, get_attribute
from .report import Report

_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument's dtype and shape; None marks the symbolic batch size."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]

    def __repr__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} tensor {self.shown}"

    @property
    def shown(self) -> tuple:
        return tuple("B" if s is None else s for s in self.shape)


@dataclass(frozen=True)
class InputSpec:
    """The call contract of an optimized graph. A call is bound to the model's signature as the
    model would bind it (defaults filled in; a missing or extra argument is an InputError), and
    each example argument is checked against what the graph was specialized to: every tensor's
    dtype and shape (None: the symbolic batch size, at least `min_batch`), every other value as
    it was. With `guards=False` (the Dynamo fallback, which re-specializes by itself) only the
    signature is checked."""

    model: str
    signature: inspect.Signature | None
    names: tuple[str, ...]  # the parameter each example argument binds to
    expected: tuple  # the example arguments, each tensor replaced by its TensorSpec
    min_batch: int = 0
    guards: bool = True
    flat: bool = field(init=False)  # every example argument is a tensor: the fast path

    def __post_init__(self) -> None:
        object.__setattr__(self, "flat", all(isinstance(e, TensorSpec) for e in self.expected))

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments to call the optimized graph with; InputError names one that differs."""
        if self.flat and self.guards and not kwargs and len(args) == len(self.expected):
            for name, value, want in zip(self.names, args, self.expected, strict=True):
                self._check_tensor(name, value, want)
            return args, kwargs
        if not self.guards:
            self._bound(args, kwargs)
            return args, kwargs
        positional = self._bind(args, kwargs)
        for name, value, want in zip(self.names, positional, self.expected, strict=True):
            self._check(name, value, want)
        return positional, {}

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        """The example's positional arguments of this call; every other argument must be the
        default the model was captured with."""
        n = len(self.expected)
        if self.signature is None:
            if kwargs or len(args) != n:
                raise InputError(f"{self.model} was optimized for {n} positional arguments")
            return args
        bound = self._bound(args, kwargs)
        bound.apply_defaults()
        entries = list(_entries(self.signature, bound))
        positional = [e for e in entries if e[3]]
        if len(positional) < n:
            raise InputError(
                f"{self.model} was optimized for {n} positional arguments, got "
                f"{len(positional)}; pass as many as the example inputs held"
            )
        for name, value, default, _ in positional[n:] + [e for e in entries if not e[3]]:
            if default is _EMPTY or not _same(value, default):
                raise InputError(
                    f"argument {name!r} was not among the example inputs, so the model was "
                    f"optimized for {_default(default, name)}; got {_show(value)}; optimize "
                    f"again with {name} in the example inputs"
                )
        return tuple(e[1] for e in positional[:n])

    def _bound(self, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
        if self.signature is None:
            return None
        try:
            return self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InputError(
                f"the call does not match {self.model}.forward{_plain(self.signature)}: "
                f"{error}; call the optimized model as you would call the model"
            ) from None

    def _check(self, name: str, value, want) -> None:
        if isinstance(want, TensorSpec):
            return self._check_tensor(name, value, want)
        found, spec = pytree.tree_flatten_with_path(value)
        wanted, want_spec = pytree.tree_flatten(want)
        same = spec == want_spec and all(
            isinstance(w, TensorSpec) or (not isinstance(leaf, torch.Tensor) and _same(leaf, w))
            for (_, leaf), w in zip(found, wanted, strict=True)
        )
        if not same:
            raise InputError(
                f"argument {name!r}: the model was optimized for {name}={_show(want)} (arguments "
                f"that are not tensors are fixed at their example value), got {_show(value)}; "
                "optimize again with this value in the example inputs (one optimized model per "
                "value)"
            )
        for (path, leaf), w in zip(found, wanted, strict=True):
            if isinstance(w, TensorSpec):
                self._check_tensor(name + pytree.keystr(path), leaf, w)

    def _check_tensor(self, name: str, value, want: TensorSpec) -> None:
        if isinstance(value, torch.Tensor) and value.dtype == want.dtype:
            if self._fits(value.shape, want.shape):
                return
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else None
        raise InputError(
            f"argument {name!r}: the model was optimized for {want.dtype} tensors of shape "
            f"{want.shown}{self._batch_note(want)}, got {got or _show(value)}; optimize again "
            "with example inputs of this shape"
        )

    def _fits(self, actual: torch.Size, expected: tuple) -> bool:
        if len(actual) != len(expected):
            return False
        return all(
            a >= self.min_batch if e is None else a == e
            for a, e in zip(actual, expected, strict=True)
        )

    def _batch_note(self, want: TensorSpec) -> str:
        if None not in want.shape:
            return ""
        if self.min_batch < 2:
            return " (B: any batch size)" if self.min_batch < 1 else " (B: any batch size >= 1)"
        return (
            f" (B: any batch size >= {self.min_batch}: the model computes differently at batch "
            "size 1, which a model optimized with a batch-1 example handles)"
        )


def input_spec(
    model: nn.Module, example: tuple, dynamic: bool, min_batch: int = 0, guards: bool = True
) -> InputSpec:
    """The call contract of `model` optimized for `example` (a positional tuple); `dynamic`:
    the leading size of every tensor is symbolic."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without Python signature
        signature = None

    def describe(x):
        if not isinstance(x, torch.Tensor):
            return x
        return TensorSpec(x.dtype, (None, *x.shape[1:]) if dynamic else tuple(x.shape))

    expected = tuple(pytree.tree_map(describe, a) for a in example)
    names = _names(signature, len(example))
    return InputSpec(type(model).__name__, signature, names, expected, min_batch, guards)


def _names(signature: inspect.Signature | None, n: int) -> tuple[str, ...]:
    names = []
    for param in signature.parameters.values() if signature is not None else ():
        if param.kind in _POSITIONAL:
            names.append(param.name)
        elif param.kind is param.VAR_POSITIONAL:
            names += [f"{param.name}[{i}]" for i in range(n - len(names))]
    names = names[:n]
    return tuple(names + [f"input {i}" for i in range(len(names), n)])


def _entries(signature: inspect.Signature, bound: inspect.BoundArguments):
    """(name, value, default, positional) for every argument of a bound call."""
    for param in signature.parameters.values():
        value = bound.arguments[param.name]
        if param.kind is param.VAR_POSITIONAL:
            yield from ((f"{param.name}[{i}]", v, _EMPTY, True) for i, v in enumerate(value))
        elif param.kind is param.VAR_KEYWORD:
            yield from ((key, v, _EMPTY, False) for key, v in value.items())
        else:
            yield param.name, value, param.default, param.kind in _POSITIONAL


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a value whose == does not give a truth value
        return a is b


def _show(value) -> str:
    shown = pytree.tree_map(
        lambda x: TensorSpec(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else x, value
    )
    text = repr(shown)
    return text if len(text) <= 80 else text[:77] + "..."


def _default(default, name: str) -> str:
    return f"its default {name}={_show(default)}" if default is not _EMPTY else f"no {name}"


def _plain(signature: inspect.Signature) -> str:
    """The signature without annotations: `(x, k=2, mask=None)`."""
    params = [p.replace(annotation=_EMPTY) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=_EMPTY))


# ATen overloads whose torch.* function takes the same arguments and selects the same overload;
# calling those skips OpOverload's Python __call__, a few microseconds per op.
_DIRECT = (
    "conv1d.default conv2d.default conv3d.default conv_transpose1d.default conv_transpose2d.input "
    "conv_transpose3d.input linear.default relu.default gelu.default silu.default sigmoid.default "
    "tanh.default hardtanh.default add.Tensor sub.Tensor mul.Tensor div.Tensor cat.default "
    "flatten.using_ints max_pool2d.default avg_pool2d.default adaptive_avg_pool2d.default "
    "mean.dim layer_norm.default batch_norm.default permute.default transpose.int "
    "reshape.default scaled_dot_product_attention.default softmax.int pixel_shuffle.default "
    "constant_pad_nd.default"
).split()


# Elementwise activations (ATen overload -> the in-place function taking the same arguments)
# that `finalize` runs in place on a temporary, and the ops whose output such a temporary may
# be: each returns memory of its own and saves no output for autograd.
_IN_PLACE = {
    "relu.default": torch.relu_,
    "sigmoid.default": torch.sigmoid_,
    "tanh.default": torch.tanh_,
    "hardtanh.default": torch._C._nn.hardtanh_,
    "hardswish.default": torch._C._nn.hardswish_,
    "hardsigmoid.default": torch._C._nn.hardsigmoid_,
    "silu.default": torch._C._nn.silu_,
    "gelu.default": torch._C._nn.gelu_,
    "leaky_relu.default": torch._C._nn.leaky_relu_,
}
_FRESH = (
    "conv1d.default conv2d.default conv3d.default convolution.default linear.default "
    "addmm.default mm.default bmm.default matmul.default add.Tensor sub.Tensor mul.Tensor "
    "layer_norm.default"
).split()


def _overload(name: str):
    """The ATen overload named "packet.overload" ("relu.default")."""
    packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet), overload)


def in_place_activations(gm: fx.GraphModule) -> int:
    """Run each activation in `_IN_PLACE` in place where its input comes from an op in `_FRESH`
    and nothing else reads that input; returns how many. For a graph that only runs: the
    targets are no longer ATen overloads."""
    in_place = {_overload(name): function for name, function in _IN_PLACE.items()}
    fresh = {_overload(name) for name in _FRESH}
    count = 0
    for node in gm.graph.nodes:
        source = node.args[0] if node.target in in_place and node.args else None
        if isinstance(source, fx.Node) and source.target in fresh and list(source.users) == [node]:
            node.target = in_place[node.target]
            count += 1
    return count


def _direct_functions() -> dict:
    table = {}
    for name in _DIRECT:
        packet = name.split(".")[0]
        function = getattr(torch, packet, None) or getattr(torch._C._nn, packet, None)
        if function is not None:
            table[_overload(name)] = function
    return table


def finalize(gm: fx.GraphModule, aliases: tuple | None = None) -> fx.GraphModule:
    """Drop export's per-call guards, flatten weight lookups, call common ops directly and run
    activations in place on temporaries (`in_place_activations`), in place; with `aliases`
    (`output_aliases` of the captured graph), copy each output that shares memory where the
    model's did not. The result is for running: passes and op counts
    expect ATen targets, so keep the graph it came from for reading. The caller verifies the
    result (and checks its inputs: `InputSpec`)."""
    gm._forward_pre_hooks.clear()
    if aliases is not None:
        copy_aliased_outputs(gm, aliases)
    in_place_activations(gm)
    direct = _direct_functions()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "get_attr" and "." in node.target:
            node.target = _flat_attribute(gm, node.target)
        elif node.op == "call_function" and node.target in direct:
            node.target = direct[node.target]
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _flat_attribute(gm: fx.GraphModule, target: str) -> str:
    name = f"{CONSTANT_PREFIX}_{target.replace('.', '_')}"
    if not hasattr(gm, name):
        gm.register_buffer(name, get_attribute(gm, target).detach())
    return name


def output_aliases(gm: fx.GraphModule) -> tuple:
    """What each output shares memory with: ("input", i) for the i-th input, ("weight",) for a
    weight, ("output", j) for the earlier output j, or None for memory of its own."""
    placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    first: dict[fx.Node, int] = {}
    found = []
    for index, node in enumerate(_outputs(gm)):
        root = _root(node) if isinstance(node, fx.Node) else None
        if root is None:
            found.append(None)
        elif root.op == "placeholder":
            found.append(("input", placeholders[root]))
        elif root.op == "get_attr":
            found.append(("weight",))
        else:
            found.append(("output", first[root]) if root in first else None)
            first.setdefault(root, index)
    return tuple(found)


def _outputs(gm: fx.GraphModule) -> list:
    found: list = []
    fx.node.map_aggregate(gm.graph.output_node().args[0], found.append)  # leaves, in order
    return found


def _root(node: fx.Node) -> fx.Node:
    """The node whose memory `node` is (a view of): through views, in-place ops and the items
    of ops that return views (split, chunk, unbind)."""
    while node.op == "call_function":
        source = node.args[0] if node.target is operator.getitem else node
        if not isinstance(source, fx.Node) or not _returns_alias(source):
            return node
        first = source.args[0] if source.args else None
        if not isinstance(first, fx.Node):
            return node
        node = first
    return node


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def copy_aliased_outputs(gm: fx.GraphModule, aliases: tuple) -> None:
    """Clone each output that shares memory where the captured model's output (`aliases`,
    from `output_aliases`) did not: ``y = fast(x); y += 1`` must not change `x`."""
    now = output_aliases(gm)
    if len(now) != len(aliases):
        return
    output = gm.graph.output_node()
    copies = iter([a is not None and a != b for a, b in zip(now, aliases, strict=True)])

    def maybe_copy(node):
        if not next(copies):
            return node
        with gm.graph.inserting_before(output):
            copied = gm.graph.call_function(torch.ops.aten.clone.default, (node,))
        copied.meta = {k: v for k, v in node.meta.items() if k == "val"}
        return copied

    output.args = (fx.node.map_aggregate(output.args[0], maybe_copy),)


class OptimizedModule(nn.Module):
    """The optimized model: the model's call signature and output structure, plus `.report`
    and `.graph_module`, the optimized ATen graph to read (the module that runs is a copy
    tuned for calling, sharing its weights). A call binds as the model's would; an argument
    outside what the graph was specialized to (`fxopt.finalize.InputSpec`) raises InputError."""

    def __init__(self, graph_module: nn.Module, report: Report, runner=None, inputs=None):
        super().__init__()
        object.__setattr__(self, "graph_module", graph_module)  # not a submodule: no double weights
        self.report = report
        self._runner = graph_module if runner is None else runner
        self._inputs: InputSpec | None = inputs

    def forward(self, *args, **kwargs):
        if self._inputs is not None:
            args, kwargs = self._inputs.bind(args, kwargs)
        return self._runner(*args, **kwargs)
