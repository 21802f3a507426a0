"""fxopt: make a trained PyTorch model faster without changing what it computes.

opt = fxopt.optimize(model, example_inputs)
print(opt.report)
"""

from . import errors, models, testing, wildcards
from .api import OptimizedModule, optimize
from .errors import FxoptError
from .pattern import Pattern, pattern  # fxopt.pattern: the function, not the module
from .pipeline import DEFAULT_PIPELINE
from .registry import PassInfo, list_passes, register_pass
from .report import Report
from .rewrite import Declined, Match, PassResult, Rule, decline, rewrite

__version__ = "0.1.0"


def compile(model, example_inputs, target="llvm"):  # noqa: A001  (the public name in DESIGN.md)
    """Build the model with TVM. Not built yet: the TVM codegen lands in a later release."""
    raise errors.UnsupportedError(
        "fxopt.compile (the TVM build) is not built yet; use fxopt.optimize(..., "
        "backend='eager' or 'inductor') meanwhile"
    )


def load(path):
    """Load an exported TVM artifact. Not built yet, like `compile`."""
    raise errors.UnsupportedError("fxopt.load is not built yet: there is no TVM export to load")


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
