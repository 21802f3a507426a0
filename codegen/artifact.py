"""`Artifact`: what `fxopt.compile` returns, and `load` for what it exports.

`Artifact.export(path)` writes one shared library holding everything needed to run the model:
the VM bytecode, the generated kernels (host code, and the CUDA fatbin for cuda targets), the
weights (bound as constants at import, so they are baked into the library), and the call
metadata (input dtypes and shapes, output structure, target) as the JSON returned by the
library's `fxopt_metadata` function. There is no side file. `load` needs only the TVM runtime
(`TVM_USE_RUNTIME_LIB=1` works).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FxoptError, InputError, UnsupportedError
from . import tvm_api as tv
from .lower import Built
from .runtime import TVMModule


class Artifact:
    """A TVM build of a model: `.module` runs it, `.export(path)` deploys it."""

    def __init__(self, built: Built, report=None):
        self.built = built
        self.report = report
        self._module: TVMModule | None = None

    @property
    def target(self):
        """The TVM target it was built for."""
        return self.built.target

    @property
    def module(self) -> TVMModule:
        """The runnable module (needs a device of the target's kind to call)."""
        if self._module is None:
            self._module = TVMModule(self.built.executable, self.built.target.kind.name)
        return self._module

    def export(self, path) -> Path:
        """Write one `.so` holding kernels, weights and call metadata; return its path."""
        path = Path(path)
        if path.suffix != ".so":
            raise InputError(f"export path {str(path)!r} must end in .so (a shared library)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tv.export_library(self.built.executable, os.fspath(path))
        return path

    def source(self) -> str:
        """The generated source (device code first, e.g. CUDA kernels, then host LLVM IR)."""
        return tv.source_of(self.built.executable)

    def __repr__(self) -> str:
        return f"Artifact(target={self.built.target.kind.name!r}, {self.built.seconds:.1f} s build)"


def load(path) -> TVMModule:
    """Load a library written by `Artifact.export` as a `TVMModule` (TVM runtime only)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; export it with artifact.export(path)")
    try:
        library = tv.load_library(os.fspath(path))
    except Exception as error:
        raise UnsupportedError(
            f"the TVM runtime could not load {str(path)!r}: {_first_line(error)}; a library "
            "built for cuda needs a TVM runtime with CUDA support (and a GPU to run)"
        ) from error
    try:
        return TVMModule(library, tv.device_kind_of(library))
    except FxoptError:
        raise
    except Exception as error:
        raise InputError(
            f"{str(path)!r} is not a library fxopt exported ({_first_line(error)}); "
            "export one with fxopt.compile(model, inputs).export(path)"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def compile_model(model, example_inputs, target="llvm", dynamic_batch: bool = True) -> Artifact:
    """`fxopt.compile`: optimize (default pipeline and `fuse_blocks`, verified), build with TVM,
    and check the build against the optimized graph when the target's device is here."""
    from .. import optimize
    from ..pipeline import DEFAULT_PIPELINE
    from ..verify import check, input_sets
    from .lower import build

    inputs = (
        tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    )
    passes = [*DEFAULT_PIPELINE, "fuse_blocks"]  # as optimize(backend="tvm") runs them
    optimized = optimize(model, inputs, passes=passes, dynamic_batch=dynamic_batch)
    report = optimized.report
    if report.capture != "torch.export":
        raise UnsupportedError(
            f"fxopt.compile needs one whole-model graph, but torch.export could not capture "
            f"{type(model).__name__} ({'; '.join(report.notes)}); use fxopt.optimize instead"
        )
    built = build(optimized.graph_module, inputs, target, report.dynamic_batch)
    report.seconds["tvm build"] = built.seconds
    report.notes += [f"tvm: {note}" for note in built.notes]
    artifact = Artifact(built, report)
    if built.target.kind.name == "llvm":
        other = _other_batch(inputs) if built.dynamic_batch else None
        sets = input_sets(inputs, n_random=1, other_batch=other)
        report.final_error = check(optimized, artifact.module, sets)
    else:
        report.notes.append(f"tvm: built for {built.target.kind.name}; not run here (no device)")
    return artifact


def _other_batch(inputs: tuple) -> int | None:
    from ..capture import batch_size

    batch = batch_size(inputs)
    return None if batch is None else batch + 2
