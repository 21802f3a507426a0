"""`TVMModule`: a compiled Relax VM called like the model it was built from.

Tensors cross between PyTorch and TVM by DLPack, without copies: the VM reads the caller's input
memory and PyTorch takes ownership of the VM's output buffers. A non-contiguous input is made
contiguous first (DLPack needs a dense layout for the VM), which is the one copy this makes.
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import InputError
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
        self._out_spec = pytree.treespec_loads(self.metadata["out_spec"])
        self._dtypes = [getattr(torch, i["dtype"]) for i in self.metadata["inputs"]]
        self._shapes = [tuple(i["shape"]) for i in self.metadata["inputs"]]

    @property
    def device(self) -> torch.device:
        """The torch device the inputs must be on."""
        return torch.device("cpu" if self._device_kind in ("llvm", "c") else self._device_kind)

    def forward(self, *args, **kwargs):
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self._check(tensors)
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        result = self._main(*[tv.from_torch(t.detach()) for t in tensors])
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
