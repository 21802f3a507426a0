"""Make the optimized graph cheap to call.

`ep.module()` re-checks every call's inputs against the export's range constraints in a forward
pre-hook and a `_guards_fn` submodule, and reads each weight through a chain of submodule
lookups. On a small model at batch 1 that costs about a tenth of the run time. fxopt replaces the
checks with one shape-and-dtype check per input (the same protection: a graph traced at fixed
sizes must not run at others) and reads each weight from a flat attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import InputError
from .graph import CONSTANT_PREFIX, get_attribute


@dataclass(frozen=True)
class InputSpec:
    """Dtype and shape per flattened tensor input; None marks a symbolic (free) size."""

    tensors: tuple[tuple[int, torch.dtype, tuple[int | None, ...]], ...]

    def check(self, args: tuple, kwargs: dict) -> None:
        flat = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        leaves = args if flat else pytree.tree_leaves((args, kwargs))
        for index, dtype, shape in self.tensors:
            value = leaves[index] if index < len(leaves) else None
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {index}: expected a tensor, got {type(value).__name__}")
            if value.dtype != dtype or not _fits(value.shape, shape):
                want = tuple("B" if s is None else s for s in shape)
                raise InputError(
                    f"input {index}: the model was optimized for {dtype} tensors of shape "
                    f"{want} (B: any batch size), got {value.dtype} {tuple(value.shape)}; "
                    "optimize again with example inputs of this shape"
                )


def _fits(actual: torch.Size, expected: tuple) -> bool:
    if len(actual) != len(expected):
        return False
    return all(e is None or a == e for a, e in zip(actual, expected, strict=True))


def input_spec(gm: fx.GraphModule) -> InputSpec:
    tensors = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shape = tuple(d if isinstance(d, int) else None for d in value.shape)
            tensors.append((index, value.dtype, shape))
    return InputSpec(tuple(tensors))


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


def _direct_functions() -> dict:
    table = {}
    for name in _DIRECT:
        packet, overload = name.split(".")
        function = getattr(torch, packet, None) or getattr(torch._C._nn, packet, None)
        if function is not None:
            table[getattr(getattr(torch.ops.aten, packet), overload)] = function
    return table


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's per-call guards, flatten weight lookups and call common ops directly, in
    place. The result is for running: passes and op counts expect ATen targets, so keep the
    graph it came from for reading. The caller verifies the result."""
    gm._forward_pre_hooks.clear()
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
