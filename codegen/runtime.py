"""`TVMModule`: a compiled Relax VM called like the model it was built from.

Tensors cross between PyTorch and TVM by DLPack, without copies: the VM reads the caller's input
memory and PyTorch takes ownership of the VM's output buffers. A non-contiguous input is made
contiguous first (DLPack needs a dense layout for the VM), which is the one copy this makes.

A call must match the build: the arguments bind to the compiled argument names (extra ones are an
`InputError`, never ignored), their structure matches, and Python scalars equal the values the
build baked in. A Relax VM keeps its registers and call frames in the VM object, so one module
serializes its calls (a lock); the kernels themselves run on TVM's own thread pool.
"""

from __future__ import annotations

import inspect
import json
import threading

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..ir.errors import InputError
from . import tvm_api as tv

METADATA_FUNCTION = "fxopt_metadata"


class TVMModule(nn.Module):
    """Run a TVM executable (or a loaded library) with the model's call signature.

    Inputs are the model's positional tensors; the output has the model's structure (a tensor,
    or the tuple / list / dict the model returns).
    """

    def __init__(self, module, device_kind: str = "llvm"):
        super().__init__()
        self._module = module  # keeps the library alive as long as the VM
        self._device_kind = device_kind
        self._vm = tv.virtual_machine(module, tv.device_for(device_kind))
        self.metadata = json.loads(str(self._vm[METADATA_FUNCTION]()))
        self._main = self._vm["main"]
        self._lock = threading.Lock()  # one VM: concurrent calls would share its registers
        self._out_spec = pytree.treespec_loads(self.metadata["out_spec"])
        self._dtypes = [getattr(torch, i["dtype"]) for i in self.metadata["inputs"]]
        self._shapes = [tuple(i["shape"]) for i in self.metadata["inputs"]]
        self._call = CallSpec.from_metadata(self.metadata)

    @property
    def device(self) -> torch.device:
        """The torch device the inputs must be on."""
        return torch.device("cpu" if self._device_kind in ("llvm", "c") else self._device_kind)

    def forward(self, *args, **kwargs):
        tensors = self._call.tensors(args, kwargs)
        self._check(tensors)
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        arrays = [tv.from_torch(t.detach()) for t in tensors]
        with self._lock:
            if self.device.type == "cpu":  # as many threads as PyTorch would use
                tv.use_threads(torch.get_num_threads())
            result = self._main(*arrays)
        outputs = tv.to_torch(result)
        flat = list(outputs) if isinstance(outputs, tuple) else [outputs]
        return pytree.tree_unflatten(flat, self._out_spec)

    def _check(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self._shapes):
            raise InputError(
                f"the compiled model takes {len(self._shapes)} tensor input(s), got "
                f"{len(tensors)}; call it with the arguments it was compiled with"
            )
        for index, (tensor, dtype, shape) in enumerate(
            zip(tensors, self._dtypes, self._shapes, strict=True)
        ):
            want = tuple("B" if s is None else s for s in shape)
            if tensor.device.type != self.device.type:
                raise InputError(
                    f"input {index} is on {tensor.device}, but the module was compiled for "
                    f"{self._device_kind}; move it with .to({str(self.device)!r})"
                )
            if tensor.dtype != dtype:
                raise InputError(
                    f"input {index} is {tensor.dtype}, the module was compiled for {dtype}; "
                    f"convert it with .to({dtype})"
                )
            if tensor.dim() != len(shape):
                raise InputError(
                    f"input {index} has {tensor.dim()} dimensions {tuple(tensor.shape)}, the "
                    f"module expects {len(shape)}: {want} (B: any batch size)"
                )
            for axis, (actual, expected) in enumerate(zip(tensor.shape, shape, strict=True)):
                if expected is not None and actual != expected:
                    raise InputError(
                        f"input {index} has size {actual} in dimension {axis}, the module was "
                        f"compiled for {want} (B: any batch size); compile again with inputs "
                        "of this shape"
                    )


class CallSpec:
    """How the build was called: argument names, their pytree structure, and the Python
    scalars torch.export baked in (flat leaf index -> value)."""

    def __init__(self, names: list[str], in_spec, constants: dict[int, object], tensors: list):
        self.names = names
        self.in_spec = in_spec
        self.constants = constants
        self.signature = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        # the common call, as many tensors as names and nothing else, needs no binding
        self.plain = not constants and in_spec == pytree.tree_structure((tuple(names), {}))
        self.count = len(tensors)
        shapes = iter(tensors)
        leaves = [
            _Text(repr(constants[i]) if i in constants else _tensor_text(next(shapes, None)))
            for i in range(in_spec.num_leaves)
        ]
        arguments = pytree.tree_unflatten(leaves, in_spec)[0]
        self.text = (
            "(" + ", ".join(f"{n}: {_text(a)}" for n, a in zip(names, arguments, strict=True)) + ")"
        )

    @classmethod
    def from_metadata(cls, metadata: dict) -> CallSpec:
        shapes = [i["shape"] for i in metadata["inputs"]]
        # a library exported before call specs were recorded: positional tensors only
        names = metadata.get("arguments") or [f"input{i}" for i in range(len(shapes))]
        in_spec = metadata.get("in_spec")
        in_spec = pytree.treespec_loads(in_spec) if in_spec else None
        if in_spec is None:
            in_spec = pytree.tree_structure((tuple(names), {}))
        constants = {int(i): v for i, v in metadata.get("constants", [])}
        return cls(names, in_spec, constants, shapes)

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensor inputs of a call, in build order; InputError if the call does not match."""
        if self.plain and not kwargs and len(args) == len(self.names):
            if all(isinstance(a, torch.Tensor) for a in args):
                return list(args)
        try:
            bound = self.signature.bind(*args, **kwargs).args
        except TypeError as error:
            raise self._mismatch(args, kwargs, f"{error}; ") from None
        leaves, spec = pytree.tree_flatten((bound, {}))
        if spec != self.in_spec:
            raise self._mismatch(args, kwargs, "")
        for index, value in self.constants.items():
            if type(leaves[index]) is not type(value) or leaves[index] != value:
                raise self._mismatch(args, kwargs, "the build baked its Python values in; ")
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def _mismatch(self, args: tuple, kwargs: dict, why: str) -> InputError:
        return InputError(
            f"the compiled model takes {self.count} tensor input(s) {self.text} (B: any batch "
            "size), got "
            f"{_text((*args, *[_Keyword(k, v) for k, v in kwargs.items()]))}; {why}call it as "
            "it was compiled, or compile again for this call"
        )


class _Keyword:
    def __init__(self, name: str, value):
        self.name, self.value = name, value


class _Text(str):
    """A leaf already written as text (the compiled side of a mismatch)."""


def _tensor_text(shape) -> str:
    sizes = ", ".join("B" if size is None else str(size) for size in shape or [])
    return "Tensor" if shape is None else f"Tensor({sizes})"


def _text(value) -> str:
    """Arguments as types and shapes: `(Tensor(2, 3), int 3, scale=float 2.0)`."""
    if isinstance(value, _Text):
        return value
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, _Keyword):
        return f"{value.name}={_text(value.value)}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, int | float | bool | str):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
