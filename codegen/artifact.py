"""`Artifact`: what `fxopt.compile` returns, and `load` for what it exports.

`Artifact.export(path)` writes one shared library holding everything needed to run the model:
the VM bytecode, the generated kernels (host code, and the CUDA fatbin for cuda targets), the
weights (bound as constants at import, so they are baked into the library), and the call
metadata (input dtypes and shapes, output structure, target) as the JSON returned by the
library's `fxopt_metadata` function. There is no side file: the library ends with a checksum
trailer (`fxopt-sha256:` and the SHA-256 of every byte before it; the dynamic loader ignores bytes
past the ELF segments). `load` checks it before the library is mapped, since a damaged library
either crashes the process (SIGBUS, SIGSEGV) or returns garbage from damaged weights. `export`
writes into a temporary folder next to the target and renames the library into place.
`load` needs only the TVM runtime (`TVM_USE_RUNTIME_LIB=1` works).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..ir.errors import BuildError, FxoptError, InputError, UnsupportedError, first_line
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
        folder = _reserve(path)
        partial = os.path.join(folder, path.name)
        try:
            _write_library(self.built.executable, partial)
            os.replace(partial, path)  # atomic: a reader never sees half a library
        except OSError as error:
            raise _unwritable(path, error) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
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
    check_library(path)
    try:
        library = tv.load_library(os.fspath(path))
    except Exception as error:
        raise UnsupportedError(
            f"the TVM runtime could not load {str(path)!r}: {first_line(error)}; a library "
            "built for cuda needs a TVM runtime with CUDA support (and a GPU to run)"
        ) from error
    try:
        return TVMModule(library, tv.device_kind_of(library))
    except FxoptError:
        raise
    except Exception as error:
        raise InputError(
            f"{str(path)!r} is not a library fxopt exported ({first_line(error)}); "
            "export one with fxopt.compile(model, inputs).export(path)"
        ) from error


def _reserve(path: Path) -> str:
    """A new folder next to `path` to write the library in (then renamed into place, so a
    reader never sees half a library); InputError when the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent)
    except OSError as error:
        raise _unwritable(path, error) from None


def _write_library(executable, path: str) -> None:
    try:
        tv.export_library(executable, path)
    except Exception as error:  # the TVM export and the system linker fail in many types
        raise BuildError(f"TVM could not write a library: {first_line(error)}") from error
    with open(path, "ab") as library:
        library.write(_trailer(_digest(path, os.path.getsize(path))))


CHECKSUM_TAG = b"fxopt-sha256:"
_TRAILER_SIZE = len(CHECKSUM_TAG) + 64


def check_library(path: Path) -> None:
    """Raise InputError unless `path` ends with a checksum trailer matching its contents; the
    check reads the file and never maps it, so a damaged library cannot crash the process."""
    redo = "re-export it with fxopt.compile(model, inputs).export(path)"
    try:
        with open(path, "rb") as library:
            size = library.seek(0, os.SEEK_END)
            library.seek(max(0, size - _TRAILER_SIZE))
            trailer = library.read()
        tagged = trailer.startswith(CHECKSUM_TAG)
        actual = _trailer(_digest(path, size - _TRAILER_SIZE)) if tagged else None
    except OSError as error:
        raise InputError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    if not tagged:
        raise InputError(
            f"{str(path)!r} carries no fxopt checksum: it is truncated, or not a library "
            f"Artifact.export wrote (or one from an fxopt that wrote none); {redo}"
        )
    if actual != trailer:
        raise InputError(
            f"{str(path)!r} is damaged: its contents do not match the checksum written at "
            f"export (a truncated or corrupted copy); {redo}"
        )


def _digest(path, size: int) -> str:
    """The SHA-256 of the first `size` bytes of `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as library:
        while size > 0:
            block = library.read(min(size, 1 << 20))
            if not block:
                break
            digest.update(block)
            size -= len(block)
    return digest.hexdigest()


def _trailer(digest: str) -> bytes:
    return CHECKSUM_TAG + digest.encode("ascii")


def _unwritable(path: Path, error: OSError) -> InputError:
    blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        why = f"{str(blocker)!r} is a file, not a directory"
    elif path.is_dir():
        why = "it is a directory"
    else:
        why = error.strerror or str(error)
    return InputError(
        f"cannot write the library to {str(path)!r}: {why}; export to a file in a writable "
        "directory"
    )
