"""`fxopt.optimize`: capture, rewrite with verification, and hand back a module that computes
the same thing faster. The caller's model is never modified."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .capture import ModelState, capture, private_copy, unwrap
from .codegen import partition
from .codegen.tuning_db import check_database
from .codegen.tvm_api import check_target
from .dynamo import optimize_with_dynamo
from .finalize import OptimizedModule, finalize, input_spec, output_aliases
from .ir.errors import CaptureError, InputError, VerificationError
from .ir.export import as_tuple, batch_size
from .ir.graph import snapshot
from .pipeline import DEFAULT_APPROXIMATE_MAX_ERROR, PassPlan, final_error, optimize_graph, plan
from .precision import Float64Reference
from .report import Report
from .verify import input_sets, outputs

BACKENDS = ("eager", "inductor", "tvm")


@dataclass(frozen=True)
class _Call:
    """One `optimize` call's choices, checked."""

    steps: PassPlan
    backend: str
    target: object
    verify: bool
    dynamic_batch: bool
    tuning_db: object  # a checked database directory, or None


def optimize(
    model: nn.Module,
    example_inputs,
    backend: str = "eager",
    target=None,
    passes: Sequence[str] | None = None,
    approximate: bool = False,
    verify: bool = True,
    dynamic_batch: bool = True,
    tuning_db=None,
    options: Mapping[str, object] | None = None,
    approximate_max_error: float = DEFAULT_APPROXIMATE_MAX_ERROR,
) -> OptimizedModule:
    """Return a faster module that computes what `model` computes in eval mode.

    Parameters
    ----------
    model : nn.Module
        The trained model (a ``torch.compile`` wrapper stands for the module it wraps). It is
        copied; its parameters, buffers and mode are left unchanged, and the optimized model
        starts from its buffers' values.
    example_inputs : Tensor or tuple
        Arguments as in ``model(*example_inputs)``; the model runs on copies of them.
        Arguments that are not tensors are fixed at these values (a call with others raises
        InputError), and so is every tensor's shape but the batch size.
    backend : {"eager", "inductor", "tvm"}
        Run the rewritten fx graph as is, or through ``torch.compile``, or through TVM.
    target : str or dict, optional
        TVM target; only for ``backend="tvm"``.
    passes : list of str, optional
        Pass names to run instead of the default pipeline (or one name). With ``backend="tvm"`` and
        ``passes=None``, ``fuse_blocks`` runs last, so that depthwise -> pointwise blocks
        become one generated kernel; name it yourself when you pass a list.
    approximate : bool
        Allow passes that are not output-equivalent (``lowrank_linear``, ``lowrank_conv``,
        ``decompose_large_kernel``, ``linearize_attention``). They run only when named in
        `passes`; with ``passes=None`` the exact default pipeline runs, and naming one without
        ``approximate=True`` raises InputError. An approximate pass is not held to the exact
        tolerance: the report records its error on the example and random inputs and its own
        summary, and rolls it back only when its relative L2 error exceeds
        `approximate_max_error` or an output is not finite. Fit the result to the model with
        `fxopt.calibrate`.
    verify : bool
        Check every pass against the graph before it and roll back a pass that fails. A model
        whose outputs differ between two runs on the same inputs (random, or stateful) cannot
        be checked: VerificationError says so.
    dynamic_batch : bool
        Keep the batch dimension symbolic where the model allows it.
    tuning_db : str or Path, optional
        Only for ``backend="tvm"``: a directory written by ``fxopt tune``; functions it holds
        tuned schedules for (same shapes and target) use them, fxopt's schedules the rest.
        Tuned shapes are static, so the batch is kept static (`dynamic_batch` is ignored). A
        missing directory raises InputError.
    options : dict, optional
        Settings per pass, for this call only: ``{"lowrank_linear": {"energy": 0.99}}`` (or
        the pass's settings object). Each pass named must be one the call runs, and each
        setting one the pass has (``fxopt passes`` lists them); InputError otherwise.
    approximate_max_error : float
        The relative L2 error above which an approximate pass is rolled back (default 1.0: no
        better than returning zeros, so only a broken rewrite is).

    Returns
    -------
    OptimizedModule
        Call it like the model; ``.report`` says what was done.
    """
    start = time.perf_counter()
    model, unwrapped = unwrap(model)
    inputs = _check_arguments(model, example_inputs, backend, target)
    if tuning_db is not None:
        if backend != "tvm":
            raise InputError(f"tuning_db= applies to backend='tvm' only, not {backend!r}")
        tuning_db, dynamic_batch = check_database(tuning_db), False  # tuned shapes are static
    steps = plan(passes, approximate, options, approximate_max_error)
    if backend == "tvm" and passes is None:  # dw -> pw pairs, inverted residuals: one kernel each
        steps = replace(steps, names=(*steps.names, "fuse_blocks"))
    call = _Call(steps, backend, target, verify, dynamic_batch, tuning_db)
    report = Report(model=type(model).__name__, backend=backend, notes=unwrapped)
    work = _eval_copy(model, report)
    _check_weights(work)
    inputs = _copies(inputs)  # the model may write into its inputs; the caller's stay as given
    state = ModelState(work, model)
    try:
        return _optimize(model, work, inputs, state, report, call, start)
    finally:
        state.restore()  # the optimized model starts from the model's state


def _optimize(model, work, inputs, state, report, call: _Call, start) -> OptimizedModule:
    verify, backend = call.verify, call.backend
    t = time.perf_counter()
    # eager outputs from before any pass runs: a pass that writes into a weight in place
    # changes `work` too, since the graph shares its tensors
    expected = _eager_outputs(work, inputs, state) if verify else None
    eager = time.perf_counter() - t
    try:
        t = time.perf_counter()
        example = expected[0] if expected else None  # the model's output on the example
        captured = capture(work, inputs, call.dynamic_batch, example)
        report.seconds["capture"] = time.perf_counter() - t
    except CaptureError as error:
        if not verify:
            _run(work, inputs)  # InputError if the example is the problem
        report.notes.append(f"whole-model capture failed, using the Dynamo fallback: {error}")
        if backend == "tvm":
            report.notes.append("tvm: not used; the Dynamo fallback runs its graphs in PyTorch")
        optimized = optimize_with_dynamo(work, inputs, call.steps, verify, report, start)
        optimized._inputs = input_spec(model, inputs, dynamic=False, guards=False)
        return optimized
    gm = captured.graph_module
    report.dynamic_batch = captured.dynamic_batch
    if captured.note:
        report.notes.append(captured.note)
    report.notes += captured.kept_in_place
    aliases = output_aliases(gm)  # the model's own: a pass may drop a copy the caller relies on
    reference = Float64Reference(gm) if verify else None  # the graph before any pass
    other = other_batch(inputs, captured)
    gm = optimize_graph(gm, inputs, call.steps, verify, report, other, reference)
    t = time.perf_counter()
    fast = finalize(snapshot(gm), aliases)  # `gm` stays the readable ATen graph; `fast` runs
    report.seconds["finalize"] = time.perf_counter() - t
    if verify:
        t = time.perf_counter()
        report.final_error = final_error(expected, fast, [inputs], report, (reference, gm))
        report.seconds["final check"] = eager + time.perf_counter() - t
    runner = _backend_runner(fast, call, gm, inputs, captured.dynamic_batch, report)
    if verify and backend == "tvm" and runner is not fast:
        sets = input_sets(inputs, n_random=0, other_batch=other_batch(inputs, captured))
        runner = _verified_tvm_runner(work, fast, runner, sets, report)
    report.seconds["total"] = time.perf_counter() - start
    spec = input_spec(model, inputs, captured.dynamic_batch, captured.min_batch)
    return OptimizedModule(gm, report, runner, spec)


def other_batch(inputs: tuple, captured) -> int | None:
    """A second batch size to verify at, when the batch is symbolic."""
    batch = batch_size(inputs)
    return None if not captured.dynamic_batch or batch is None else batch + 2


def _check_arguments(model, example_inputs, backend: str, target) -> tuple:
    if not isinstance(model, nn.Module):
        raise InputError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if target is not None and backend != "tvm":
        raise InputError(f"target= applies to backend='tvm' only, not backend={backend!r}")
    if target is not None:  # a bad target must not fall back to PyTorch unnoticed
        check_target(target)  # InputError saying what targets look like
    inputs = _example_tuple(example_inputs)
    _check_signature(model, inputs)
    _check_devices(model, inputs)
    return inputs


def _example_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise InputError(
            "example_inputs is None; pass the model's arguments: a tensor, or a tuple as in "
            "model(*example_inputs) (an empty tuple for a model that takes none)"
        )
    return as_tuple(example_inputs)


def _check_signature(model: nn.Module, inputs: tuple) -> None:
    if type(model).forward is nn.Module.forward:
        raise InputError(f"{type(model).__name__} defines no forward(); nothing to optimize")
    try:
        inspect.signature(model.forward).bind(*inputs)
    except TypeError as error:
        raise InputError(
            f"example inputs do not match {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {error}; pass a tuple with one entry per "
            "positional argument"
        ) from None
    for leaf in pytree.tree_leaves(inputs):
        if not isinstance(leaf, torch.Tensor | int | float | bool | str | type(None)):
            raise InputError(
                f"example inputs may hold tensors and Python scalars (nested in tuples, lists "
                f"or dicts), not {type(leaf).__name__}"
            )


def _check_devices(model: nn.Module, inputs: tuple) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        raise InputError(
            "the model or inputs are on the meta device and hold no values to compute with; "
            "materialize them first (model.to_empty(device='cpu') and load_state_dict)"
        )


def _eval_copy(model: nn.Module, report: Report) -> nn.Module:
    if model.training:
        message = (
            f"{type(model).__name__} is in training mode; fxopt optimizes its eval-mode "
            "behaviour (batch norm uses running statistics, dropout is off); call "
            "model.eval() first to silence this"
        )
        warnings.warn(message, stacklevel=3)
        report.notes.append("model was in training mode: optimized its eval-mode behaviour")
    work, note = private_copy(model)
    if note:
        report.notes.append(note)
    return work.eval()


def _check_weights(model: nn.Module) -> None:
    """NaN anywhere, or Inf in a parameter, is a broken weight; Inf in a buffer is a mask
    (a causal mask of -inf above the diagonal)."""
    buffers = dict(model.named_buffers())
    for name, tensor in list(model.named_parameters()) + list(buffers.items()):
        if not tensor.is_floating_point() or torch.isfinite(tensor.detach().sum()):
            continue  # a finite sum has no NaN or Inf terms; one pass, no mask (a tenth the time)
        bad = "NaN" if torch.isnan(tensor).any() else None if name in buffers else "Inf"
        if bad:
            raise InputError(
                f"{name} holds {bad} values; results could not be verified. "
                "Fix or re-load the weights before optimizing"
            )


def _copies(inputs):
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, inputs
    )


def _run(model: nn.Module, inputs: tuple):
    """The model's outputs on a copy of `inputs`; InputError when the model rejects them."""
    try:
        return outputs(model, [_copies(inputs)])[0]
    except Exception as error:
        text = str(error).strip().splitlines()
        raise InputError(
            f"{type(model).__name__} rejected the example inputs: {type(error).__name__}: "
            f"{text[0] if text else ''}; pass arguments the model accepts, as in "
            "model(*example_inputs)"
        ) from error


def _eager_outputs(model: nn.Module, inputs: tuple, state: ModelState) -> list:
    """The model's outputs on the example, the reference every check compares with. The model
    runs twice: outputs that differ between two runs cannot be compared with at all."""
    first, second = _run(model, inputs), _run(model, inputs)
    try:
        torch.testing.assert_close(second, first, equal_nan=True)
    except (TypeError, ValueError):  # an output it cannot compare (a str): the checks do
        pass
    except AssertionError as error:
        lines = [line for line in str(error).splitlines() if "Greatest absolute" in line]
        changed = state.changed()
        why = (
            f"its forward changes buffer(s) {', '.join(changed[:3])}"
            if changed
            else "it draws random numbers (torch.rand, dropout with training=True, ...)"
        )
        raise VerificationError(
            f"{type(model).__name__} is not deterministic: two runs on the same example inputs "
            f"differ ({(lines or ['outputs differ'])[0].strip()}); {why}. fxopt checks the "
            "optimized model against the model's outputs: make them depend on the inputs only, "
            "or pass verify=False (the optimized model then starts from the model's state)"
        ) from None
    return [first]


def _backend_runner(fast: fx.GraphModule, call: _Call, gm, inputs, dynamic, report):
    if call.backend == "inductor":
        return torch.compile(fast, backend="inductor")
    if call.backend == "tvm":
        runner = _tvm_runner(gm, inputs, call, dynamic, report)
        return fast if runner is None else runner
    return fast


def _tvm_runner(gm: fx.GraphModule, inputs: tuple, call: _Call, dynamic: bool, report: Report):
    """Lower the optimized ATen graph with TVM (ops TVM lacks stay in PyTorch), noting the
    build in the report."""
    target = call.target if call.target is not None else _default_target(inputs)
    t = time.perf_counter()
    try:
        lowered = partition.lower_for_optimize(gm, inputs, target, dynamic, call.tuning_db)
    except Exception as error:  # TVM gaps vary widely; the fx graph always runs
        _tvm_fallback(report, f"the TVM build failed ({type(error).__name__}: {error})")
        return None
    report.seconds["tvm build"] = time.perf_counter() - t
    fallback = ", ".join(f"{op} x{n}" for op, n in sorted(lowered.fallback_ops.items()))
    report.notes.append(
        f"tvm: built for {lowered.target} in {report.seconds['tvm build']:.1f} s; "
        + (f"kept in PyTorch: {fallback}" if fallback else "every op runs in TVM")
    )
    report.notes += [f"tvm: {note}" for note in lowered.notes]
    return lowered.module


def _verified_tvm_runner(model: nn.Module, fast: fx.GraphModule, runner, sets: list, report):
    """Check the TVM build end to end against the eval-mode model (stricter than against the
    final fx graph: the pass and TVM rounding errors add up), at the example batch
    and another when the batch is symbolic. If it fails, run the fx graph instead and say so:
    optimize never returns a module that failed verification."""
    t = time.perf_counter()
    try:
        report.final_error = final_error(model, runner, sets, report)
    except (VerificationError, InputError) as error:
        _tvm_fallback(report, f"the TVM build failed verification ({error})")
        runner = fast
    report.seconds["tvm check"] = time.perf_counter() - t
    return runner


def _tvm_fallback(report: Report, why: str) -> None:
    report.notes.append(f"tvm: {why}; the optimized graph runs in PyTorch instead")
    warnings.warn(f"fxopt: {why}; running the optimized graph in PyTorch", stacklevel=4)


def _default_target(inputs: tuple) -> str:
    """Where the inputs live: "cuda" for CUDA tensors, else "llvm" (this CPU)."""
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return "cuda" if any(t.is_cuda for t in tensors) else "llvm"
