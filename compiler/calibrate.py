"""`fxopt.calibrate`: fit the constants that approximate passes introduced (feature maps,
low-rank factors, band kernels: the graph constants named ``_fxopt_const_calib_*``) so that the
optimized model's outputs match the original's on the user's inputs.

Distillation by relative mean squared error, sum ||y - y'||^2 / sum ||y||^2 over the outputs,
with Adam, in place on the optimized module. The original model is only read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .ir.errors import InputError, UnsupportedError
from .ir.graph import CONSTANT_PREFIX
from .pipeline import output_error
from .progress import Progress

# Approximate passes name the constants they introduce `calib_...`; `add_constant` prefixes it.
MARKER = f"{CONSTANT_PREFIX}_calib"


def calibrate(
    model: nn.Module,
    optimized: nn.Module,
    inputs,
    steps: int = 100,
    lr: float = 1e-2,
    held_out=None,
    fit_all: bool = False,
    progress: bool = True,
) -> dict:
    """Fit an approximate rewrite to the original model, in place.

    Parameters
    ----------
    model : nn.Module
        The original model; it is run in eval mode and never changed (its mode is restored).
    optimized : OptimizedModule
        What ``fxopt.optimize(model, ..., approximate=True)`` returned.
    inputs : Tensor, tuple or list
        Arguments as in ``model(*inputs)``, or a list of such batches (one per step, cycled).
    steps : int
        Adam steps (a few hundred at most are useful).
    lr : float
        Adam's learning rate.
    held_out : optional
        Inputs like `inputs`, never trained on, to report the error on.
    fit_all : bool
        Also fit every other floating-point weight of the optimized graph, not only the
        constants the approximate passes introduced.
    progress : bool
        Show a step counter on a terminal.

    Returns
    -------
    dict
        ``steps``, ``parameters`` (scalars fitted), ``seconds``, and for ``inputs`` (and
        ``held_out``) the relative L2 error ``before`` and ``after`` and the max abs errors
        ``max_abs_before``, ``max_abs_after``. Also appended to ``optimized.report.calibration``.
    """
    graph = getattr(optimized, "graph_module", None)
    if graph is None:
        raise InputError("calibrate expects the module fxopt.optimize returned")
    if getattr(getattr(optimized, "report", None), "backend", None) == "tvm":
        raise UnsupportedError(
            "calibrate cannot update weights compiled into a TVM build; optimize with "
            "backend='eager', calibrate, and build from that"
        )
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    tensors = fitted_tensors(graph, fit_all)
    if not tensors:
        raise InputError(
            "the optimized model has no constants to calibrate: run an approximate pass that "
            "introduces some (linearize_attention with feature_map='learnable', lowrank_linear, "
            "lowrank_conv, decompose_large_kernel), or pass fit_all=True"
        )
    batches, checks = _batches(inputs), _batches(held_out) if held_out is not None else []
    start = time.perf_counter()
    targets, held_targets = _reference(model, batches), _reference(model, checks)
    summary = {"steps": steps, "parameters": sum(t.numel() for t in tensors.values()), "lr": lr}
    before = _error(optimized, batches, targets), _error(optimized, checks, held_targets)
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    _fit(graph, tensors, batches, targets, steps, lr, Progress(progress))
    _sync(optimized, tensors)
    after = _error(optimized, batches, targets), _error(optimized, checks, held_targets)
    if after[0]["rel_l2"] > before[0]["rel_l2"]:  # diverged (lr too high): keep what we had
        with torch.no_grad():
            for name, value in saved.items():
                tensors[name].copy_(value)
        _sync(optimized, tensors)
        after = before
        summary["note"] = "the fit made the error worse (try a smaller lr); restored"
    summary["inputs"] = _pair(before[0], after[0])
    summary["held_out"] = _pair(before[1], after[1]) if checks else None
    summary["seconds"] = time.perf_counter() - start
    report = getattr(optimized, "report", None)
    if report is not None and hasattr(report, "calibration"):
        report.calibration.append(summary)
    return summary


def fitted_tensors(graph: nn.Module, fit_all: bool = False) -> dict[str, torch.Tensor]:
    """The graph's floating-point constants to fit, by attribute name."""
    found = {}
    for name, tensor in list(graph.named_parameters()) + list(graph.named_buffers()):
        if tensor.is_floating_point() and (fit_all or name.startswith(MARKER)):
            found[name] = tensor
    return found


def _batches(inputs) -> list[tuple]:
    if isinstance(inputs, list):
        return [b if isinstance(b, tuple) else (b,) for b in inputs]
    return [inputs if isinstance(inputs, tuple) else (inputs,)]


def _reference(model: nn.Module, batches: list[tuple]) -> list:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [model(*b) for b in batches]
    finally:
        model.train(training)


def _loss(output, target) -> torch.Tensor:
    pairs = [
        (a, b)
        for a, b in zip(pytree.tree_leaves(output), pytree.tree_leaves(target), strict=True)
        if isinstance(b, torch.Tensor) and b.is_floating_point()
    ]
    error = sum((a.float() - b.float()).square().sum() for a, b in pairs)
    return error / sum(b.float().square().sum() for _, b in pairs).clamp_min(1e-30)


def _fit(graph, tensors: dict, batches, targets, steps: int, lr: float, progress: Progress):
    leaves = list(tensors.values())
    flags = [t.requires_grad for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(leaves, lr=lr)
    try:
        for step in range(steps):
            i = step % len(batches)
            loss = _loss(graph(*batches[i]), targets[i])
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for t, g in zip(leaves, grads, strict=True):
                t.grad = g
            optimizer.step()
            if step % 10 == 0 or step == steps - 1:
                progress.show(f"calibrate: step {step + 1}/{steps}, loss {loss.item():.3e}", True)
    finally:
        for t, flag in zip(leaves, flags, strict=True):
            t.requires_grad_(flag)
            t.grad = None
        progress.close()


def _sync(optimized: nn.Module, tensors: dict) -> None:
    """Copy fitted values into the running module where it holds its own copy of a tensor
    (it normally shares them with `graph_module`)."""
    runner = getattr(optimized, "_runner", None)
    runner = getattr(runner, "_orig_mod", runner)  # torch.compile wraps the module
    if not isinstance(runner, nn.Module):
        return
    own = dict(runner.named_parameters()) | dict(runner.named_buffers())
    for name, tensor in tensors.items():
        flat = own.get(name)
        flat = own.get("_fxopt_const_" + name.replace(".", "_")) if flat is None else flat
        if flat is not None and flat.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                flat.copy_(tensor)


def _error(optimized: nn.Module, batches: Sequence[tuple], targets: list) -> dict[str, float]:
    worst = {"max_abs": 0.0, "rel_l2": 0.0}
    with torch.no_grad():
        for args, target in zip(batches, targets, strict=True):
            found = output_error(target, optimized(*args))
            worst = {k: max(worst[k], found[k]) for k in worst}
    return worst


def _pair(before: dict, after: dict) -> dict[str, float]:
    return {
        "before": before["rel_l2"],
        "after": after["rel_l2"],
        "max_abs_before": before["max_abs"],
        "max_abs_after": after["max_abs"],
    }
