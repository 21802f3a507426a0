"""fxopt: make a trained PyTorch model faster without changing what it computes.

opt = fxopt.optimize(model, example_inputs)
print(opt.report)

The package is built in layers; each imports only from the layers below it (checked by
tests/test_layers.py):

    fxopt           driver and tools: optimize, capture, pipeline, verify, report, cli, testing
    fxopt.codegen   lowering to TVM, schedules, build, runtime, export and load
    fxopt.passes    one registered pass per module, none importing another
    fxopt.rules     the rule engine: pattern, wildcards, rewrite, registry
    fxopt.analysis  analyses and tensor math: cost model, linear combinations, kernels
    fxopt.ir        the graph: graph access, ops, layout, errors
"""

import importlib
import sys

from . import models, testing
from .api import OptimizedModule, optimize
from .calibrate import calibrate
from .deploy import compile, load
from .ir import errors
from .ir.errors import FxoptError
from .pipeline import DEFAULT_PIPELINE
from .report import Report
from .rules import wildcards
from .rules.patterns import Pattern, pattern
from .rules.registry import PassInfo, list_passes, register_pass
from .rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

__version__ = "0.1.0"

# Old module paths, kept for users. These modules lived at the top of compiler/ (six of them in
# passes/, `tune` in codegen/) before the layers; each is registered under its old name too, so that
# `from fxopt.graph import constant` or `import fxopt.rewrite` gets the one module that now lives
# in a layer. An old name that is also an attribute here keeps that attribute: `fxopt.pattern` is
# the function (`from fxopt.pattern import Pattern` still finds the module, now
# `fxopt.rules.patterns`). In-repo code imports the new paths (tests/test_layers.py checks it).
_OLD_PATHS = {
    "fxopt.errors": "fxopt.ir.errors",
    "fxopt.graph": "fxopt.ir.graph",
    "fxopt.ops": "fxopt.ir.ops",
    "fxopt.layout": "fxopt.ir.layout",
    "fxopt.blocks": "fxopt.ir.block_ops",
    "fxopt.cost": "fxopt.analysis.cost",
    "fxopt.linear_combination": "fxopt.analysis.linear_combination",
    "fxopt.passes.affine": "fxopt.analysis.affine",
    "fxopt.passes.kernels": "fxopt.analysis.kernels",
    "fxopt.passes.channel_math": "fxopt.analysis.channel_math",
    "fxopt.passes.decompose_math": "fxopt.analysis.decompose_math",
    "fxopt.passes.sequential_math": "fxopt.analysis.sequential_math",
    "fxopt.passes.attention_match": "fxopt.analysis.attention_match",
    "fxopt.pattern": "fxopt.rules.patterns",
    "fxopt.pattern_trace": "fxopt.rules.pattern_trace",
    "fxopt.wildcards": "fxopt.rules.wildcards",
    "fxopt.rewrite": "fxopt.rules.rewrite",
    "fxopt.registry": "fxopt.rules.registry",
    "fxopt.codegen.tune": "fxopt.tune",
    # Renamed so that no two modules share a name, and no module shares fxopt.pattern's.
    "fxopt.ir.blocks": "fxopt.ir.block_ops",
    "fxopt.codegen.blocks": "fxopt.codegen.block_converters",
    "fxopt.rules.pattern": "fxopt.rules.patterns",
}
for _old, _new in _OLD_PATHS.items():
    _parent, _, _name = _old.rpartition(".")
    sys.modules.setdefault(_old, importlib.import_module(_new))
    vars(importlib.import_module(_parent)).setdefault(_name, sys.modules[_old])


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
