"""`check_model`: one model through ``fxopt.optimize`` and against eager PyTorch, the check
`fxopt.testing.fuzz` runs on every model it draws (and a failure's script runs again)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..api import optimize
from ..ir.errors import FxoptError, InputError, VerificationError
from ..report import Report
from ..verify import max_error
from . import assert_equivalent

OTHER_BATCH = "fresh inputs at another batch size"
OTHER_ARGUMENTS = "other non-tensor arguments"
DEFAULTS = "the non-tensor arguments left at their defaults"
GUARDED = (OTHER_BATCH, OTHER_ARGUMENTS, DEFAULTS)  # calls a static capture may refuse


class Mismatch(AssertionError):
    """`check_model` found the optimized model behaving otherwise than eager: `kind` names
    what went wrong (shrinking keeps it), the message adds where and by how much."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}{detail}")
        self.kind = kind


@dataclass
class Checked:
    """What `check_model` saw: "ok" or the typed error's name, the report, and how many calls
    with other non-tensor arguments met InputError (a guard, allowed)."""

    outcome: str
    report: Report | None = None
    guarded: int = 0


def check_model(
    model: nn.Module,
    make_inputs: Callable[..., tuple],
    batch: int,
    seed: int,
    passes: Sequence[str] | None = None,
    vary_arguments: bool = False,
    allow_rollback: bool = False,
) -> Checked:
    """Optimize `model` on ``make_inputs(batch, seed)`` and compare it with eager on those
    inputs, on fresh ones, at batch ``batch + 2`` (which a static capture may refuse with
    InputError) and, with `vary_arguments`, with other non-tensor arguments and with them left
    at their defaults. A model whose forward writes a buffer may be refused with a
    VerificationError naming the buffer; it is then optimized with ``verify=False`` too, which
    must keep and report the write. Raises `Mismatch` on a difference."""
    example = make_inputs(batch, seed)
    saved_model, saved_example = _state(model), _clone(example)
    written = _written_buffers(model, example)
    calls = [("the example inputs", example), ("fresh inputs", make_inputs(batch, seed + 1))]
    if vary_arguments:
        calls.append((OTHER_ARGUMENTS, make_inputs(batch, seed + 3, True)))
        calls.append((DEFAULTS, _without_trailing_scalars(make_inputs(batch, seed + 4))))
    try:
        optimized = _optimize(model, example, passes, True, written)
    except FxoptError as refused:
        _check_untouched(model, saved_model, example, saved_example)
        if not written:
            return Checked(type(refused).__name__)
        checked = Checked(type(refused).__name__)
    else:
        _check_rollbacks(optimized.report, allow_rollback)
        checked = _check_optimized(model, optimized, calls, batch, seed, make_inputs, written)
    if written:  # verify=False must keep the write (and say so), not fold it away
        try:
            optimized = _optimize(model, example, passes, False, written)
        except FxoptError:
            _check_untouched(model, saved_model, example, saved_example)
            return checked
        unreported = [name for name in written if not _mentions(optimized.report.notes, name)]
        if unreported:
            raise Mismatch("a buffer write is not reported", f": {unreported} (verify=False)")
        checked.guarded += _check_optimized(
            model, optimized, calls, batch, seed, make_inputs, written
        ).guarded
    _check_untouched(model, saved_model, example, saved_example)
    return checked


def _optimize(model, example: tuple, passes, verify: bool, written: list[str]):
    """`optimize`; a Mismatch for an error that is not a typed fxopt error, and for a
    VerificationError other than the refusal of a model whose forward writes a buffer."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optimize(model, example, passes=passes, verify=verify)
    except VerificationError as error:
        if written and any(_mentions([str(error)], name) for name in written):
            raise
        raise Mismatch("optimize raised", f" {_describe(error)}") from error
    except FxoptError:
        raise
    except Exception as error:
        raise Mismatch("optimize raised an untyped error", f": {_describe(error)}") from error


def _check_rollbacks(report: Report, allow_rollback: bool) -> None:
    failed = [f"{p.name} ({p.status}: {p.message})" for p in report.passes if _failed(p)]
    if failed and not allow_rollback:
        raise Mismatch("optimize rolled a pass back", f": {'; '.join(failed)}")


def _check_optimized(model, optimized, calls, batch, seed, make_inputs, written) -> Checked:
    """Compare `optimized` with a copy of `model`, call by call (a stateful model's state
    moves on alike in both)."""
    report, reference = optimized.report, copy.deepcopy(model).eval()
    other = make_inputs(batch + 2, seed + 2)
    calls = [*calls[:2], (OTHER_BATCH, other), *calls[2:]]
    guarded = 0
    for label, args in calls:
        guards = (OTHER_ARGUMENTS, DEFAULTS) if report.dynamic_batch else GUARDED
        guarded += _check_call(label, reference, optimized, args, bool(written), guards)
    return Checked("ok", report, guarded)


def _mentions(texts: list[str], name: str) -> bool:
    return any(name in text for text in texts)


def _without_trailing_scalars(args: tuple) -> tuple:
    """`args` without the trailing non-tensor arguments, so that they take their defaults."""
    end = len(args)
    while end > 1 and not isinstance(args[end - 1], torch.Tensor):
        end -= 1
    return args[:end]


def _written_buffers(model: nn.Module, example: tuple) -> list[str]:
    """The buffers a call writes (found by calling a copy of the model)."""
    probe = copy.deepcopy(model).eval()
    saved = _state(probe)[1]
    with torch.no_grad():
        probe(*_clone(example))
    return [name for name, t in _state(probe)[1].items() if not _equal(t, saved[name])]


def _failed(record) -> bool:
    return record.status in ("rolled back", "failed")


def _check_call(label: str, reference, optimized, args: tuple, stateful: bool, guards) -> int:
    """Compare one call; 1 when one of the calls labelled `guards` met InputError (a guard
    the capture derived: allowed, see fxopt.finalize)."""
    before, eager_args = _clone(args), _clone(args)
    with torch.no_grad():
        try:  # first: a call the optimized model refuses must not move the reference's state
            actual = optimized(*args)
        except Exception as error:
            if isinstance(error, InputError) and label in guards:
                return 1
            raise Mismatch(
                "the optimized model raised", f" on {label}: {_describe(error)}"
            ) from error
        expected = reference(*eager_args)
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    leaves, spec = pytree.tree_flatten(actual)
    if spec != expected_spec:
        raise Mismatch("output structure differs", f" on {label}: {spec}, eager {expected_spec}")
    try:
        max_error(expected, actual)
    except VerificationError as error:
        if stateful or not _rounding(reference, optimized, args):
            raise Mismatch("wrong numbers", f" on {label}: {error}") from None
    for i, (a, b) in enumerate(zip(expected_leaves, leaves, strict=True)):
        if _aliases(b, args) and not _aliases(a, eager_args):
            raise Mismatch("an output aliases an input", f" (output {i}, on {label}); eager's not")
    if not _equal(args, before):
        raise Mismatch("the optimized model wrote into its inputs", f" on {label}")
    return 0


def _rounding(reference, optimized, args: tuple) -> bool:
    """Whether a float32 miss is rounding, judged in float64 as optimize judges it."""
    try:
        assert_equivalent(reference, optimized, args, float64=True)
    except VerificationError:
        return False
    return True


def _aliases(value, args: tuple) -> bool:
    if not isinstance(value, torch.Tensor) or not value.numel():
        return False
    storage = value.untyped_storage().data_ptr()
    return any(
        isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() == storage
        for t in pytree.tree_leaves(args)
    )


def _state(model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return model.training, {name: t.detach().clone() for name, t in tensors.items()}


def _check_untouched(model, saved_model, example, saved_example) -> None:
    training, tensors = _state(model)
    if training != saved_model[0]:
        raise Mismatch("optimize changed the caller's model's mode")
    changed = [n for n, t in tensors.items() if not _equal(t, saved_model[1].get(n))]
    if changed or tensors.keys() != saved_model[1].keys():
        raise Mismatch("optimize changed the caller's model", f": {changed or 'tensor names'}")
    if not _equal(example, saved_example):
        raise Mismatch("the example inputs were written into")


def _clone(args):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args)


def _equal(a, b) -> bool:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400] if lines else ''}"
