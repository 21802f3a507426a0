"""Capture a model as an ATen-level fx graph with torch.export (non-strict), made functional
where the model's in-place ops are unobservable.

The batch dimension is made symbolic when every tensor input shares it and the model allows it;
otherwise the capture falls back to static shapes and says why.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .functionalize import functionalize


@dataclass
class Capture:
    graph_module: fx.GraphModule
    dynamic_batch: bool
    note: str | None = None  # why the batch is static, when it is
    kept_in_place: list[str] = field(default_factory=list)  # in-place ops not made functional


def capture(model: nn.Module, example_inputs: tuple, dynamic_batch: bool = True) -> Capture:
    """Export an eval-mode `model` (the caller passes a private copy) to a functional
    GraphModule (see `fxopt.functionalize`)."""
    captured = _capture(model, example_inputs, dynamic_batch)
    captured.kept_in_place = [str(k) for k in functionalize(captured.graph_module)]
    return captured


def _capture(model: nn.Module, example_inputs: tuple, dynamic_batch: bool) -> Capture:
    note = None
    if dynamic_batch:
        batch = batch_size(example_inputs)
        if batch is None:
            note = "static batch: the tensor inputs do not share a leading batch dimension"
        else:
            try:
                return Capture(_export(model, example_inputs, dynamic=True), True)
            except Exception as error:  # export reports shape specialization in many types
                note = f"static batch: the model fixes the batch size ({_first_line(error)})"
    else:
        note = "static batch: dynamic_batch=False"
    try:
        return Capture(_export(model, example_inputs, dynamic=False), False, note)
    except Exception as error:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {_first_line(error)}"
        ) from error


def batch_size(inputs: tuple) -> int | None:
    """The leading dimension shared by every tensor input, or None."""
    sizes = {
        t.shape[0]
        for t in pytree.tree_leaves(inputs)
        if isinstance(t, torch.Tensor) and t.dim() > 0
    }
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if len(sizes) != 1 or any(t.dim() == 0 for t in tensors):
        return None
    return sizes.pop()


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export prints the partial graph to stderr when it fails, and its shape solver
    logs warnings; fxopt reports the failure itself."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(model: nn.Module, inputs: tuple, dynamic: bool) -> fx.GraphModule:
    with _quiet_torch_logs():
        return _export_now(model, inputs, dynamic)


def _export_now(model: nn.Module, inputs: tuple, dynamic: bool) -> fx.GraphModule:
    if not dynamic:
        return torch.export.export(model, inputs, strict=False).module()
    dim = torch.export.Dim("batch")
    shapes = pytree.tree_map(lambda x: {0: dim} if isinstance(x, torch.Tensor) else None, inputs)
    # torch.export specializes a size-1 dimension, so trace with the batch doubled.
    traced_inputs = pytree.tree_map(
        lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x,
        inputs,
    )
    return torch.export.export(model, traced_inputs, dynamic_shapes=shapes, strict=False).module()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
