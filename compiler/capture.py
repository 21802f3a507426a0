"""Capture a model as an ATen-level fx graph with torch.export (non-strict), made functional
where the model's in-place ops are unobservable.

The batch dimension is made symbolic when every tensor input shares it and the model allows it;
otherwise the capture falls back to static shapes and says why. torch.export assumes a symbolic
size is not 0 or 1 while it traces, so a model that branches on ``x.shape[0] == 1`` would run
its batch >= 2 path at batch 1. The capture checks the graph against the model at batch 1 (and
0); where they differ it traces again with sizes 0 and 1 in view (size-oblivious), and keeps the
batch symbolic only where the graph agrees with the model (`Capture.min_batch`).

The model captured is a private copy (`private_copy`) of the module the user meant (`unwrap`),
and `ModelState` puts its buffers back where they were after optimize has run it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .functionalize import functionalize
from .ir.errors import CaptureError, InputError, first_line
from .ir.export import batch_size, export
from .verify import max_error


@dataclass
class Capture:
    graph_module: fx.GraphModule
    dynamic_batch: bool
    note: str | None = None  # why the batch is static, when it is
    kept_in_place: list[str] = field(default_factory=list)  # in-place ops not made functional
    min_batch: int = 0  # the smallest batch size the symbolic batch stands for


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The Python module behind a `torch.compile` wrapper, with a note saying so; InputError for
    TorchScript, which torch.export cannot capture."""
    notes = []
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
        notes.append(f"optimized the {type(model).__name__} that torch.compile wrapped")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or "
            "torch.jit.trace); fxopt captures Python modules with torch.export: pass the "
            "nn.Module that was scripted or traced"
        )
    return model, notes


def private_copy(model: nn.Module) -> tuple[nn.Module, str | None]:
    """A deep copy of `model`; where an attribute cannot be copied (a lock, a non-leaf tensor
    that spectral_norm keeps), the copy shares it and the note says so."""
    try:
        return copy.deepcopy(model), None
    except Exception as error:
        why = first_line(error)
        shared = _uncopyable(model)
        try:
            return copy.deepcopy(model, {id(v): v for v in shared.values()}), (
                f"{type(model).__name__} cannot be deep-copied ({why}); the copy fxopt works on "
                f"shares {', '.join(sorted(shared))} with it"
            )
        except Exception:
            raise InputError(
                f"{type(model).__name__} cannot be copied ({why}); fxopt works on a copy to "
                "leave the model unchanged: give the attribute a __deepcopy__, or remove it "
                "before optimizing"
            ) from error


def _uncopyable(model: nn.Module) -> dict[str, object]:
    found = {}
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                found[f"{prefix}.{key}".lstrip(".")] = value
    return found


class ModelState:
    """The buffers of `work` (a private copy of `model`) before anything ran it. optimize runs
    the model and its graphs many times, and a forward may update a buffer (a call counter);
    `restore` sets them back from `model`, so that the optimized model starts where the model
    would. The graphs share these tensors."""

    def __init__(self, work: nn.Module, model: nn.Module) -> None:
        source = dict(model.named_buffers(remove_duplicate=False))
        self.entries = []  # (name, module, key, tensor, the model's tensor)
        for prefix, module in work.named_modules(remove_duplicate=False):
            for key, tensor in module._buffers.items():
                name = f"{prefix}.{key}".lstrip(".")
                if tensor is not None:
                    self.entries.append((name, module, key, tensor, source.get(name)))

    def changed(self) -> list[str]:
        """The buffers a run of the model changed (or replaced)."""
        return [
            name
            for name, module, key, tensor, source in self.entries
            if module._buffers.get(key) is not tensor or not _equal(tensor, source)
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for _, module, key, tensor, source in self.entries:
                module._buffers[key] = tensor
                if not _equal(tensor, source):
                    tensor.copy_(source)


def _equal(tensor: torch.Tensor, source: torch.Tensor | None) -> bool:
    return source is None or tensor is source or torch.equal(tensor, source)


def capture(
    model: nn.Module, example_inputs: tuple, dynamic_batch: bool = True, expected=None
) -> Capture:
    """Export an eval-mode `model` (the caller passes a private copy) to a functional
    GraphModule (see `fxopt.functionalize`). `expected`, when given, is the model's output on
    the example, which the batch checks then need not compute again."""
    captured = _capture(model, example_inputs, dynamic_batch, expected)
    captured.kept_in_place = [str(k) for k in functionalize(captured.graph_module)]
    return captured


def _capture(model: nn.Module, example_inputs: tuple, dynamic_batch: bool, expected) -> Capture:
    note = None
    if dynamic_batch:
        batch = batch_size(example_inputs)
        if batch is None:
            note = "static batch: the tensor inputs do not share a leading batch dimension"
        else:
            try:
                return _dynamic_capture(model, example_inputs, batch, expected)
            except _Static as why:
                note = f"static batch: {why}"
    else:
        note = "static batch: dynamic_batch=False"
    try:
        return Capture(export(model, example_inputs, dynamic=False), False, note)
    except Exception as error:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first_line(error)}"
        ) from error


def _dynamic_capture(model: nn.Module, inputs: tuple, batch: int, expected=None) -> Capture:
    try:
        gm = export(model, inputs, dynamic=True)
    except Exception as error:  # export reports shape specialization in many types
        raise _Static(f"the model fixes the batch size ({first_line(error)})") from error
    at_one = expected if batch == 1 else None  # the example is batch 1: its output is known
    if _agrees_at_batch(model, gm, inputs, 1, at_one):  # batch 0 is neither traced nor assumed
        return Capture(gm, True, min_batch=0 if _agrees_at_batch(model, gm, inputs, 0) else 1)
    # the trace assumed batch > 1 where the model depends on it: a size-oblivious trace keeps
    # batch 1 in view, and must run the example and agree with the model at batch 1
    try:
        oblivious = export(model, inputs, dynamic=True, oblivious=True)
        if _agrees_at_batch(model, oblivious, inputs, 1, at_one) and _runs(oblivious, inputs):
            return Capture(oblivious, True)
    except Exception:  # the model branches on a batch of 1 (or 0)
        pass
    if batch < 2:
        raise _Static("the model computes differently at batch size 1 than at others")
    note = (
        "dynamic batch >= 2: the model computes differently at batch size 1 (it branches on "
        "the batch size); a batch-1 call raises InputError, a batch-1 example captures it"
    )
    return Capture(gm, True, note, min_batch=2)


def _runs(gm: fx.GraphModule, inputs: tuple) -> bool:
    copies = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, inputs)
    try:
        with torch.no_grad():
            gm(*copies)
    except Exception:
        return False
    return True


class _Static(Exception):
    """Why the batch stays static."""


def _agrees_at_batch(
    model: nn.Module, gm: fx.GraphModule, inputs: tuple, rows: int, expected=None
) -> bool:
    """Whether the graph traced at batch >= 2 computes what the model computes on the first
    `rows` rows of the example (on copies: either may write into its inputs); `expected`, when
    given, is the model's output on those rows."""

    def first_rows():
        return pytree.tree_map(
            lambda x: x[:rows].clone() if isinstance(x, torch.Tensor) else x, inputs
        )

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty batch makes some reductions warn
            reference = model(*first_rows()) if expected is None else expected
            max_error(reference, gm(*first_rows()))
    except Exception:  # a mismatch (VerificationError), or either fails at that batch
        return False
    return True
