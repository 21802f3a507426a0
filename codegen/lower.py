"""Lower an optimized ATen graph to a TVM executable.

GraphModule -> torch.export (batch symbolic where the graph allows) -> Relax (weights bound as
constants, fused-block converters from `fxopt.codegen.block_converters`) -> LegalizeOps,
AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR -> fxopt's schedules -> dlight's GPU rules
(GPU targets) -> `tvm.compile` -> a Relax VM executable.

The executable also holds a function `fxopt_metadata` returning JSON (input dtypes and shapes,
output pytree spec, target), so an exported library describes its own call signature.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..ir.errors import BuildError, UnsupportedError, first_line
from ..ir.export import as_tuple, batch_size
from . import block_converters, schedules
from . import tvm_api as tv
from .runtime import METADATA_FUNCTION
from .tuning_db import apply_database, check_database


@dataclass
class Built:
    """A compiled module and what is needed to call it like the graph it came from."""

    executable: object
    target: object  # tvm.target.Target
    metadata: dict
    dynamic_batch: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


def build(
    gm: fx.GraphModule, example_inputs, target="llvm", dynamic_batch: bool = True, database=None
) -> Built:
    """Compile `gm` (called as ``gm(*example_inputs)``) with TVM for `target`.

    Parameters
    ----------
    gm : fx.GraphModule
        The optimized ATen graph (or any module torch.export can capture).
    example_inputs : Tensor or tuple
        Arguments as in ``gm(*example_inputs)``.
    target : str, dict or tvm.target.Target
        "llvm" (this CPU), "cuda" (sm_90 by default; needs nvcc, not a GPU) or a TVM target dict.
    dynamic_batch : bool
        Keep the leading batch dimension symbolic when the graph allows it.
    database : str or Path, optional
        A directory written by `fxopt.tune.tune`: functions it holds tuned schedules for
        (same shapes and target) use them, fxopt's schedules cover the rest. Default: none.
        Tuned shapes are static: with a symbolic batch nothing matches.

    Returns
    -------
    Built
        The executable, its target and the call metadata (see `TVMModule`).
    """
    start = time.perf_counter()
    inputs = as_tuple(example_inputs)
    tvm_target = tv.make_target(target)
    if database is not None:
        database = check_database(database)
    exported, dynamic, notes = export(gm, inputs, dynamic_batch)
    mod = import_program(exported)
    metadata = _metadata(exported, tvm_target, dynamic)
    metadata.update(_call_metadata(gm, inputs, exported))
    mod = _attach_metadata(mod, metadata)
    mod = lower(mod, tvm_target, database, notes)
    try:
        executable = tv.compile_module(mod, tvm_target)
    except Exception as error:
        raise BuildError(
            f"tvm.compile failed for target {tvm_target.kind.name}: {first_line(error)}; "
            "try target='llvm' or optimize with backend='eager'"
        ) from error
    return Built(executable, tvm_target, metadata, dynamic, time.perf_counter() - start, notes)


def export(gm, inputs: tuple, dynamic_batch: bool):
    """torch.export `gm`, the batch symbolic when asked and possible; (program, dynamic, notes)."""
    notes = []
    if dynamic_batch:
        if batch_size(inputs) is None:
            notes.append("static batch: the tensor inputs do not share a leading batch dimension")
        else:
            try:
                return _export_dynamic(gm, inputs), True, notes
            except Exception as error:  # export reports specialization in many error types
                notes.append(f"static batch: the graph fixes the batch size ({first_line(error)})")
    try:
        return torch.export.export(gm, inputs, strict=False), False, notes
    except Exception as error:
        raise BuildError(
            f"torch.export could not re-capture the optimized graph for TVM: "
            f"{first_line(error)}; optimize with backend='eager' instead"
        ) from error


def _export_dynamic(gm, inputs: tuple):
    dim = torch.export.Dim("batch")
    shapes = pytree.tree_map(lambda x: {0: dim} if isinstance(x, torch.Tensor) else None, inputs)
    # torch.export specializes a size-1 dimension, so trace with the batch doubled.
    traced = pytree.tree_map(
        lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x,
        inputs,
    )
    return torch.export.export(gm, traced, dynamic_shapes=shapes, strict=False)


def import_program(exported):
    """The Relax module of an ExportedProgram, with fxopt's fused-block converters."""
    try:
        return tv.import_exported_program(exported, converters())
    except Exception as error:
        ops = unsupported_ops(exported.graph_module)
        where = f" (ops TVM cannot convert: {', '.join(sorted(ops))})" if ops else ""
        raise UnsupportedError(
            f"TVM's torch frontend could not import the graph{where}: {first_line(error)}; "
            "fxopt.optimize(..., backend='tvm') keeps such ops in PyTorch"
        ) from error


def converters() -> dict:
    """fxopt's converters for the torch frontend: gaps in TVM 0.27, and the fused blocks."""
    return {
        "convolution.default": _convert_convolution,
        "slice.Tensor": _convert_slice,
        **block_converters.CONVERTERS,
    }


def _convert_slice(node: fx.Node, importer):
    # TVM 0.27 fails to legalize a slice along a negative axis when the shape is symbolic
    # ("axis < src_tensor_dim (-3 vs. 5)"), so the axis is made positive first.
    dim = node.args[1] if len(node.args) > 1 else 0
    if isinstance(dim, int) and dim < 0:
        rank = len(importer.shape_of(importer.env[node.args[0]]))
        node.args = (node.args[0], dim + rank, *node.args[2:])
    return importer._slice(node)


def _convert_convolution(node: fx.Node, importer):
    # aten.convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
    # groups), what the frontend's core-ATen decomposition makes of every conv; TVM 0.27
    # converts the transposed form in 1-d and 2-d only, so fxopt adds the 3-d one.
    args = importer.retrieve_args(node)
    if not (len(args) > 6 and args[6] and len(importer.shape_of(args[0])) == 5):
        return importer._convolution(node)
    x, weight, bias, stride, padding, dilation, _, output_padding, groups = args
    relax = tv.relax
    out = importer.block_builder.emit(
        relax.op.nn.conv3d_transpose(
            x,
            weight,
            strides=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            data_layout="NCDHW",
            kernel_layout="IODHW",
            out_dtype=str(node.meta["val"].dtype).removeprefix("torch."),
        )
    )
    if bias is None:
        return out
    bias = relax.op.reshape(bias, (1, -1, 1, 1, 1))
    return importer.block_builder.emit(relax.op.add(out, bias))


def unsupported_ops(gm: fx.GraphModule) -> dict[str, int]:
    """ATen ops in `gm` the TVM frontend has no converter for, with their counts."""
    known = tv.supported_aten_ops() | set(converters())
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = op_name(node)
        if name is not None and name not in known:
            counts[name] = counts.get(name, 0) + 1
    return counts


def op_name(node: fx.Node) -> str | None:
    """The frontend's name of an ATen call ("conv2d.default"), or None for other nodes."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return node.target.__name__


def lower(mod, target, database=None, notes: list | None = None):
    """fxopt's Relax pipeline: legalize and fuse, the tuned schedules of `database` (a
    directory written by `fxopt.tune`, optional), fxopt's schedules (fused blocks, then
    convolutions and matmuls), then dlight on GPU for the rest. A note on what the database
    matched is appended to `notes`."""
    try:
        mod = tv.run_passes(mod, tv.legalize_and_fuse_passes(), target)
        if database is not None:
            mod, tuned = apply_database(mod, target, database)
            if notes is not None:
                which = f" ({', '.join(tuned)})" if tuned else ""
                notes.append(f"tuning database {database}: {len(tuned)} tuned functions{which}")
        with target:
            # fused blocks first; they are marked scheduled
            mod = block_converters.schedule(mod, target)
            mod = schedules.apply(mod, target)
        if tv.is_gpu(target):
            mod = tv.run_passes(mod, [tv.gpu_default_schedule()], target)
    except Exception as error:
        raise BuildError(
            f"lowering for target {target.kind.name} failed: {first_line(error)}; "
            "try target='llvm' or optimize with backend='eager'"
        ) from error
    return mod


def _metadata(exported, target, dynamic: bool) -> dict:
    inputs = []
    for spec in exported.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        node = next(n for n in exported.graph.nodes if n.name == spec.arg.name)
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shape = [d if isinstance(d, int) else None for d in value.shape]
            inputs.append({"dtype": str(value.dtype).removeprefix("torch."), "shape": shape})
    return {
        "inputs": inputs,
        "out_spec": pytree.treespec_dumps(exported.call_spec.out_spec),
        "target": target.kind.name,
        "dynamic_batch": dynamic,
    }


def _call_metadata(gm, inputs: tuple, exported) -> dict:
    """How the build is called: the positional argument names, the (args, kwargs) pytree spec,
    and the Python scalars among the leaves (torch.export bakes them in; `TVMModule` checks a
    call passes the same values)."""
    try:
        parameters = inspect.signature(gm.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in positional]
    if len(names) < len(inputs):
        names = [f"input{i}" for i in range(len(inputs))]
    leaves = pytree.tree_leaves((inputs, {}))
    scalars = [[i, v] for i, v in enumerate(leaves) if isinstance(v, int | float | bool | str)]
    return {
        "arguments": names[: len(inputs)],
        "in_spec": pytree.treespec_dumps(exported.call_spec.in_spec),
        "constants": scalars,
    }


def _attach_metadata(mod, metadata: dict):
    relax = tv.relax
    builder = relax.BlockBuilder(mod)
    with builder.function(METADATA_FUNCTION, []):
        builder.emit_func_output(relax.expr.String(json.dumps(metadata)))
    return builder.get()
