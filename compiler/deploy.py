"""`fxopt.compile` and `fxopt.load`: a model optimized, built with TVM and checked, as one
deployable library (`fxopt.codegen.artifact.Artifact`), and such a library loaded back.

This is driver work (it optimizes, then builds), so it sits above `fxopt.codegen`, which only
builds, exports and loads.
"""

from __future__ import annotations

from .api import optimize
from .codegen import tvm_api as tv
from .codegen.artifact import Artifact
from .codegen.artifact import load as load_artifact
from .codegen.lower import build
from .codegen.tuning_db import check_database
from .ir.errors import UnsupportedError
from .ir.export import as_tuple, batch_size
from .pipeline import DEFAULT_PIPELINE
from .verify import check_equivalent, input_sets


def compile(model, example_inputs, target="llvm", dynamic_batch=True, tuning_db=None):  # noqa: A001  (public: fxopt.compile)
    """Optimize `model` (default pipeline + fuse_blocks, verified) and build it with TVM.

    Returns an `fxopt.codegen.artifact.Artifact`: `.module` runs it, `.export("model.so")`
    writes one shared library (kernels, weights and call metadata inside), `.source()` is the
    generated code, `.target` the TVM target. Building for "cuda" needs nvcc, not a GPU. An
    llvm build is checked against the optimized graph (which was checked against the model).

    `tuning_db` is a directory written by `fxopt tune` (`fxopt.tune.tune`): functions
    it holds tuned schedules for at this shape and target use them, fxopt's schedules the rest
    (the report's notes say how many). Tuned shapes are static, so with `tuning_db` the batch
    is kept static (`dynamic_batch` is ignored). A missing directory raises InputError.
    """
    if tuning_db is not None:
        tuning_db, dynamic_batch = check_database(tuning_db), False  # fails before optimizing
    return compile_model(model, example_inputs, target, dynamic_batch, tuning_db)


def load(path):
    """Load a library written by `Artifact.export` as an nn.Module; needs only the TVM runtime."""
    return load_artifact(path)


def compile_model(
    model, example_inputs, target="llvm", dynamic_batch: bool = True, tuning_db=None
) -> Artifact:
    """`fxopt.compile`: optimize (default pipeline and `fuse_blocks`, verified), build with TVM
    (with the tuning database `tuning_db`, if any), and check the build against the optimized
    graph when the target's device is here."""
    tv.make_target(target)  # a bad target fails before the optimization, not after
    inputs = as_tuple(example_inputs)
    passes = [*DEFAULT_PIPELINE, "fuse_blocks"]  # as optimize(backend="tvm") runs them
    optimized = optimize(model, inputs, passes=passes, dynamic_batch=dynamic_batch)
    report = optimized.report
    if report.capture != "torch.export":
        raise UnsupportedError(
            f"fxopt.compile needs one whole-model graph, but torch.export could not capture "
            f"{type(model).__name__} ({'; '.join(report.notes)}); use fxopt.optimize instead"
        )
    built = build(optimized.graph_module, inputs, target, report.dynamic_batch, tuning_db)
    report.seconds["tvm build"] = built.seconds
    report.notes += [f"tvm: {note}" for note in built.notes]
    artifact = Artifact(built, report)
    if built.target.kind.name == "llvm":
        other = _other_batch(inputs) if built.dynamic_batch else None
        sets = input_sets(inputs, n_random=1, other_batch=other)
        report.final_error = check_equivalent(optimized, artifact.module, sets)
    else:
        report.notes.append(f"tvm: built for {built.target.kind.name}; not run here (no device)")
    return artifact


def _other_batch(inputs: tuple) -> int | None:
    batch = batch_size(inputs)
    return None if batch is None else batch + 2
