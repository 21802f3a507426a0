"""Run what TVM can take in TVM and keep the rest in PyTorch.

`lower_for_optimize` builds the whole graph when it can. Otherwise the fx graph is split
(`torch.fx.passes.split_module`) into maximal runs of ops the torch frontend converts ("TVM
islands", each built with `lower.build`) and runs of the other ops ("PyTorch islands", left as
fx code). An island whose build fails stays in PyTorch too, so an unsupported op never makes
`optimize(..., backend="tvm")` fail; the result lists each op that stayed in PyTorch, and how often.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from ..ir.errors import first_line
from ..ir.graph import get_attribute
from . import tvm_api as tv
from .lower import build, op_name, unsupported_ops
from .runtime import TVMModule


@dataclass
class Lowered:
    """The runnable module and what the TVM build did."""

    module: nn.Module
    target: str
    seconds: float = 0.0
    fallback_ops: dict[str, int] = field(default_factory=dict)  # op -> count kept in PyTorch
    notes: list[str] = field(default_factory=list)
    islands: int = 1  # TVM islands built


def lower_for_optimize(
    gm: fx.GraphModule, inputs: tuple, target, dynamic_batch: bool, database=None
) -> Lowered:
    """Build `gm` with TVM for `target`, partitioning around ops TVM cannot take; `database`
    as in `fxopt.codegen.lower.build`."""
    kind = _kind(target)
    try:
        # the whole graph first: the frontend decomposes ops to core ATen, so an op missing
        # from its table (`unsupported_ops`) may still import
        built = build(gm, inputs, target, dynamic_batch, database)
    except Exception as error:  # an import, legalization or codegen gap: partition
        note = f"whole-graph TVM build failed ({first_line(error, 200)}); partitioning"
        return _with_note(_partitioned(gm, inputs, target, dynamic_batch, database), note)
    module = TVMModule(built.executable, built.target.kind.name)
    return Lowered(module, kind, built.seconds, {}, built.notes)


def _partitioned(gm, inputs, target, dynamic_batch, database) -> Lowered:
    kind = _kind(target)
    missing = unsupported_ops(gm)
    split, islands = split_islands(_without_guards(gm), set(missing))
    island_inputs = record_inputs(split, inputs)
    lowered = Lowered(split, kind, 0.0, dict(missing), [], 0)
    for name, is_tvm in islands.items():
        submodule = getattr(split, name)
        if not is_tvm or name not in island_inputs:
            continue
        args = island_inputs[name]
        # a size passed in as a Python int would be baked in: build such an island static
        dynamic = dynamic_batch and all(isinstance(a, torch.Tensor) for a in args)
        try:
            built = build(submodule, args, target, dynamic, database)
        except Exception as error:  # keep the island in PyTorch, and say which ops it holds
            lowered.notes.append(f"{name} stays in PyTorch: {first_line(error, 200)}")
            for op, count in _op_counts(submodule).items():
                lowered.fallback_ops[op] = lowered.fallback_ops.get(op, 0) + count
            continue
        setattr(split, name, TVMModule(built.executable, built.target.kind.name))
        lowered.seconds += built.seconds
        lowered.islands += 1
        lowered.notes += [f"{name}: {note}" for note in built.notes]
    split.recompile()
    return lowered


def _kind(target) -> str:
    """ "llvm" or "cuda" for a target given as a name, a TVM target dict or a `Target`."""
    return tv.make_target(target).kind.name


def split_islands(gm: fx.GraphModule, unsupported: set[str]):
    """Split `gm` into consecutive runs of TVM-convertible and other ops.

    Returns the split GraphModule and {submodule name: True for a TVM island}.
    """
    partition_of: dict[fx.Node, int] = {}
    kinds: dict[int, bool] = {}
    current, current_kind = 0, None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        is_tvm = op_name(node) not in unsupported
        if current_kind is not None and is_tvm != current_kind:
            current += 1
        current_kind = is_tvm
        partition_of[node] = current
        kinds[current] = is_tvm

    def callback(node: fx.Node) -> int:
        if node in partition_of:
            return partition_of[node]
        users = [u for u in node.users if u in partition_of]  # get_attr: with its first user
        return partition_of[users[0]] if users else 0

    split = split_module(gm, gm, callback, keep_original_order=True)
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)  # the model's input/output pytrees
    _move_weights_into_islands(split)
    islands = {f"submod_{index}": is_tvm for index, is_tvm in kinds.items()}
    return split, {name: kind for name, kind in islands.items() if hasattr(split, name)}


def _move_weights_into_islands(split: fx.GraphModule) -> None:
    """split_module passes weights to each island as arguments; make them the island's own
    attributes again, so TVM binds them as constants."""
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        island = getattr(split, call.target)
        placeholders = [n for n in island.graph.nodes if n.op == "placeholder"]
        body = next(n for n in island.graph.nodes if n.op != "placeholder")
        kept = []
        for arg, placeholder in zip(call.args, placeholders, strict=True):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                kept.append(arg)
                continue
            name = f"_weight_{placeholder.name}"
            island.register_buffer(name, get_attribute(split, arg.target).detach())
            with island.graph.inserting_before(body):
                attribute = island.graph.get_attr(name)
            attribute.meta = dict(placeholder.meta)
            placeholder.replace_all_uses_with(attribute)
            island.graph.erase_node(placeholder)
        call.args = tuple(kept)
        island.recompile()
    split.graph.eliminate_dead_code()
    split.delete_all_unused_submodules()  # the weights' holders now live in the islands
    split.recompile()


def record_inputs(split: fx.GraphModule, inputs: tuple) -> dict[str, tuple]:
    """Run `split` once and record the positional inputs each submodule receives."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, child in split.named_children():

        def hook(module, args, name=name):
            seen.setdefault(name, tuple(args))

        handles.append(child.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            split(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _without_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` without torch.export's input guards (a `_guards_fn` call and a pre-hook),
    which would otherwise land in an island; the optimized module checks inputs itself."""
    gm = copy.deepcopy(gm)
    gm._forward_pre_hooks.clear()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = op_name(node)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _with_note(lowered: Lowered, note: str) -> Lowered:
    lowered.notes.insert(0, note)
    return lowered
