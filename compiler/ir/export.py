"""Tracing a module into the ATen-level fx graph the passes see: torch.export (non-strict),
with the batch dimension symbolic when asked, and torch's own failure output kept quiet.

`fxopt.capture` captures models with it and `fxopt.rules.pattern_trace` traces patterns with it,
so a pattern holds the ops a captured model holds.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import fx, nn
from torch.fx.experimental import _config as shape_config
from torch.utils import _pytree as pytree


def as_tuple(inputs) -> tuple:
    """Example inputs as the tuple a model is called with: a tuple or list as it is, anything
    else (one tensor) as the only argument."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


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
    """torch.export prints the partial graph to stderr when it fails, its shape solver logs
    warnings, and fake tensors log the op that failed; fxopt reports the failure itself."""
    loggers = {logging.getLogger(name): level for name, level in _NOISY.items()}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


_NOISY = {  # logger -> the level it is raised to while exporting
    "torch.fx.experimental.symbolic_shapes": logging.ERROR,
    "torch._subclasses.fake_tensor": logging.CRITICAL,  # it logs a failing op as an error
}


def export(
    model: nn.Module, inputs: tuple, dynamic: bool, oblivious: bool = False
) -> fx.GraphModule:
    """`oblivious`: trace a symbolic size without assuming it is not 0 or 1, so that a branch
    on it becomes a guard (and, with the batch free from 0 up, an export error)."""
    mode = contextlib.nullcontext()
    if oblivious:
        mode = shape_config.patch(backed_size_oblivious=True)
    with _quiet_torch_logs(), mode:
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
