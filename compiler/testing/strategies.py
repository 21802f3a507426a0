"""Hypothesis strategies for random models to test passes on (needs the `dev` extra).

`models()` draws small random networks built from the blocks real models are made of (convs of
every kind, batch norm, linear layers, activations, residuals, parallel branches, concats,
attention, layer scale, no-ops); `inputs(model)` draws inputs for one; `cases()` draws both.
A model is drawn as a spec (plain data, see `fxopt.testing.spec`), so hypothesis shrinks a
failing one block by block, and built by running the PyTorch source the spec prints as.

Every model comes in eval mode with batch-norm statistics and affine parameters drawn away from
identity, so a fold that forgets a term is caught.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from .draw import BLOCK_KINDS, MODIFIERS, Config
from .draw_multi import model_specs
from .source import build, draw_inputs, inputs_source, randomize_batch_norm
from .spec import ModelSpec

BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONVS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def random_batch_norm(channels: int, dims: int = 2, seed: int = 0, **options) -> nn.Module:
    """A `dims`-D batch norm over `channels` (`options` as the module takes them) with its
    statistics and affine parameters drawn by `randomize_batch_norm` from `seed`."""
    return randomize_batch_norm(BATCH_NORMS[dims](channels, **options), seed)


@st.composite
def conv_bn(draw, dims=(1, 2, 3), transposed=(False, True)):
    """(model, input): a conv or transposed conv of random hyper-parameters, then batch norm."""
    dim = draw(st.sampled_from(dims))
    is_transposed = draw(st.sampled_from(transposed))
    groups = draw(st.sampled_from([1, 2]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    # a transposed conv's padding must stay within its dilated kernel
    padding = draw(st.integers(0, min(2, dilation * (kernel - 1)) if is_transposed else 2))
    extra = {}
    if is_transposed:
        extra["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    conv = (TRANSPOSED_CONVS if is_transposed else CONVS)[dim](
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        **extra,
    )
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bn = BATCH_NORMS[dim](out_ch, affine=draw(st.booleans()), eps=eps)
    randomize_batch_norm(bn, seed=draw(st.integers(0, 2**16)))
    size = draw(st.integers(5, 9 if dim < 3 else 6))  # >= the widest dilated kernel
    x = torch.randn(draw(st.integers(1, 3)), in_ch, *([size] * dim))
    return nn.Sequential(conv, bn).eval(), x


OPS = (*BLOCK_KINDS, *MODIFIERS)


def specs(
    ops=None, depth: int = 4, branches: int = 4, dims=(1, 2, 3)
) -> st.SearchStrategy[ModelSpec]:
    """Random model specs; `models` builds them. Same parameters as `models`."""
    chosen = frozenset(OPS if ops is None else ops)
    unknown = chosen - set(OPS)
    if unknown:
        raise InvalidArgument(f"unknown ops {sorted(unknown)}; choose from {list(OPS)}")
    if not chosen & set(BLOCK_KINDS) - {"residual"}:  # a residual needs a body
        raise InvalidArgument(f"ops={sorted(chosen)} names no block kind; add one of {BLOCK_KINDS}")
    if not 1 <= depth <= 8 or branches < 2 or not set(dims) <= {1, 2, 3} or not dims:
        raise InvalidArgument("need 1 <= depth <= 8, branches >= 2 and dims within (1, 2, 3)")
    weighted = tuple(d for d in (2, 2, 2, 1, 1, 3) if d in dims)
    return model_specs(Config(chosen, depth, branches, weighted))


def models(ops=None, depth: int = 4, branches: int = 4, dims=(1, 2, 3)):
    """Random eval-mode `nn.Module`s with deterministic weights.

    Parameters
    ----------
    ops : iterable of str, optional
        Block kinds a model may contain (default: all of `OPS`): ``conv``, ``pointwise``,
        ``depthwise``, ``transposed``, ``pool``, ``branches``, ``concat``, ``linear``,
        ``attention`` (SDPA and softmax(q k^T * s) v), ``linear_attention`` (softmax-free),
        ``bn``, ``act``, ``scale`` (layer scale, x * a + b), ``noop`` (eval dropout, clone,
        contiguous, same-shape views, x * 1), ``residual``. ``bn``, ``act`` and ``scale``
        also decorate convs, linears and branches, and ``pool`` adds average-pool branches.
        The modifiers ``identity`` (identity branches and concat parts) and
        ``computed_weight`` (weights computed from parameters, for fold_constants) only
        decorate.
    depth : int
        Largest number of top-level blocks (1 to 8).
    branches : int
        Largest number of parallel branches or concat parts.
    dims : tuple of int
        Spatial dimensionalities to draw from (2-D most often).

    Returns
    -------
    SearchStrategy[nn.Module]
        Each model has a `fxopt_spec` attribute; `fxopt.testing.source.script` prints it.
    """
    return specs(ops, depth, branches, dims).map(build)


class Inputs(tuple):
    """A tuple of input tensors that remembers how it was made: `shapes`, `seeds`, `code`."""

    shapes: list[tuple[int, ...]]
    seeds: list[int]
    code: str

    @classmethod
    def make(cls, shapes: list[tuple[int, ...]], seeds: list[int]) -> Inputs:
        made = cls(draw_inputs(shapes, seeds))
        made.shapes, made.seeds, made.code = shapes, seeds, inputs_source(shapes, seeds)
        return made

    def with_batch(self, batch: int) -> Inputs:
        return Inputs.make([(batch, *shape[1:]) for shape in self.shapes], self.seeds)

    def resized(self, per_example: tuple[int, ...]) -> Inputs:
        """The same seeds for a model whose input is `per_example` (a single input)."""
        return Inputs.make([(self.shapes[0][0], *per_example)], self.seeds)

    def __repr__(self) -> str:
        return self.code


@st.composite
def inputs_for(draw, spec: ModelSpec) -> Inputs:
    """Inputs for the model `spec` describes: batch 1 to 3, values from a drawn seed."""
    shape = (draw(st.integers(1, 3)), *spec.input.per_example)
    return Inputs.make([shape], [draw(st.integers(0, 1 << 16))])


def inputs(model) -> st.SearchStrategy[Inputs]:
    """Inputs for a model drawn by `models()` (or for its spec)."""
    spec = model if isinstance(model, ModelSpec) else getattr(model, "fxopt_spec", None)
    if spec is None:
        raise InvalidArgument("inputs(model) needs a model drawn by fxopt.testing.strategies")
    return inputs_for(spec)


@st.composite
def cases(draw, ops=None, depth: int = 4, branches: int = 4, dims=(1, 2, 3)):
    """(model, inputs) pairs: a model from `models(...)` and inputs for it."""
    spec = draw(specs(ops, depth, branches, dims))
    return build(spec), draw(inputs_for(spec))
