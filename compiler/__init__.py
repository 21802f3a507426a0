"""fxopt: make a trained PyTorch model faster without changing what it computes.

opt = fxopt.optimize(model, example_inputs)
print(opt.report)
"""

from . import errors, models, testing, wildcards
from .api import OptimizedModule, optimize
from .calibrate import calibrate
from .errors import FxoptError
from .pattern import Pattern, pattern  # fxopt.pattern: the function, not the module
from .pipeline import DEFAULT_PIPELINE
from .registry import PassInfo, list_passes, register_pass
from .report import Report
from .rewrite import Declined, Match, PassResult, Rule, decline, rewrite

__version__ = "0.1.0"


def compile(model, example_inputs, target="llvm", dynamic_batch=True, tuning_db=None):  # noqa: A001  (DESIGN.md)
    """Optimize `model` (default pipeline + fuse_blocks, verified) and build it with TVM.

    Returns an `fxopt.codegen.artifact.Artifact`: `.module` runs it, `.export("model.so")`
    writes one shared library (kernels, weights and call metadata inside), `.source()` is the
    generated code, `.target` the TVM target. Building for "cuda" needs nvcc, not a GPU. An
    llvm build is checked against the optimized graph (which was checked against the model).

    `tuning_db` is a directory written by `fxopt tune` (`fxopt.codegen.tune.tune`): functions
    it holds tuned schedules for at this shape and target use them, fxopt's schedules the rest
    (the report's notes say how many). Tuned shapes are static, so with `tuning_db` the batch
    is kept static (`dynamic_batch` is ignored). A missing directory raises InputError.
    """
    from .codegen.artifact import compile_model
    from .codegen.lower import tuning_database

    if tuning_db is not None:
        dynamic_batch = False
    with tuning_database(tuning_db):
        return compile_model(model, example_inputs, target, dynamic_batch)


def load(path):
    """Load a library written by `Artifact.export` as an nn.Module; needs only the TVM runtime."""
    from .codegen.artifact import load as load_artifact

    return load_artifact(path)


__all__ = [
    "DEFAULT_PIPELINE",
    "Declined",
    "FxoptError",
    "Match",
    "OptimizedModule",
    "PassInfo",
    "PassResult",
    "Pattern",
    "Report",
    "Rule",
    "calibrate",
    "compile",
    "decline",
    "errors",
    "list_passes",
    "load",
    "models",
    "optimize",
    "pattern",
    "register_pass",
    "rewrite",
    "testing",
    "wildcards",
]
