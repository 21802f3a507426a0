"""Turn a model spec into a runnable PyTorch script, and build test models from that script.

The model a property test runs is the one the script defines: `build` executes the same
source, so a counterexample printed by `check_pass` reproduces exactly when pasted into a file.
Weights come from a seed through one `torch.Generator`, drawn in module order, so the script
needs no stored tensors.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import linecache
import textwrap

import torch
from torch import nn

from .composite import emit
from .layers import Writer
from .spec import ModelSpec

HEADER = '''"""{title}

{spec!r}
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
'''

INIT_WEIGHTS = '''
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Every weight from one generator, in module order, so that runs reproduce exactly."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            randomize_batch_norm(module, seed=int(torch.randint(1 << 30, (), generator=g)))
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith(("gamma", "scale")):  # multipliers: positive, away from 1
                values = torch.rand(param.shape, generator=g) + 0.5
            elif param.dim() < 2:  # biases and shifts
                values = torch.randn(param.shape, generator=g) * 0.5
            else:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=g) / math.sqrt(fan_in)
            param.data = values
    return model.eval()
'''

_counter = itertools.count()
_registered: collections.deque[str] = collections.deque()  # recent sources kept in linecache


def randomize_batch_norm(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from (0, 1) identity, in place."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.running_mean = torch.randn(n, generator=g)
    bn.running_var = torch.rand(n, generator=g) * 1.5 + 0.5
    if bn.affine:
        bn.weight.data = torch.rand(n, generator=g) + 0.5
        bn.bias.data = torch.randn(n, generator=g) * 0.3
    return bn


def module_source(spec: ModelSpec) -> str:
    """Imports, the `Model` class and `init_weights`: everything but the instances."""
    w, shape = Writer(), spec.input
    for i, block in enumerate(spec.blocks):
        shape = emit(w, f"b{i}", block, shape)
    init = "\n".join(["super().__init__()", *w.init])
    forward = "\n".join([*w.forward, "return x"])
    title = "A test model drawn by fxopt.testing.strategies."
    return "\n".join(
        [
            HEADER.format(title=title, spec=spec),
            "",
            "class Model(nn.Module):",
            "    def __init__(self):",
            textwrap.indent(init, " " * 8),
            "",
            "    def forward(self, x):",
            textwrap.indent(forward, " " * 8),
            "",
            "",
            inspect.getsource(randomize_batch_norm),
            INIT_WEIGHTS,
        ]
    )


def inputs_source(shapes: list[tuple[int, ...]], seeds: list[int]) -> str:
    """`inputs = (...)`: each tensor drawn from its own seeded generator."""
    tensors = [
        f"torch.randn({shape!r}, generator=torch.Generator().manual_seed({seed}))"
        for shape, seed in zip(shapes, seeds, strict=True)
    ]
    return f"inputs = ({', '.join(tensors)},)"


def script(spec: ModelSpec, inputs_code: str | None = None) -> str:
    """A self-contained script that rebuilds the model (and its inputs) exactly."""
    lines = [module_source(spec), "", f"model = init_weights(Model(), seed={spec.seed})"]
    if inputs_code:
        lines += [inputs_code, "", 'if __name__ == "__main__":', "    print(model(*inputs))"]
    return "\n".join(lines) + "\n"


def build(spec: ModelSpec) -> nn.Module:
    """The eval-mode model `spec` describes, built by running `module_source(spec)`."""
    source = module_source(spec)
    filename = f"<fxopt test model {next(_counter)}>"
    # registered so that tracebacks and torch.export's stack traces show the generated lines
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _registered.append(filename)
    if len(_registered) > 64:
        linecache.cache.pop(_registered.popleft(), None)
    namespace: dict = {"__name__": "fxopt_test_model"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (our own generated code)
    model = namespace["init_weights"](namespace["Model"](), spec.seed)
    model.fxopt_spec = spec
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def draw_inputs(shapes: list[tuple[int, ...]], seeds: list[int]) -> tuple[torch.Tensor, ...]:
    """The tensors `inputs_source(shapes, seeds)` describes."""
    return tuple(
        torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for shape, seed in zip(shapes, seeds, strict=True)
    )
