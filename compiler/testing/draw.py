"""Draw the blocks of a model spec, one at a time, each valid for the shape it receives.

Every size is derived so that no layer sees an input too small for it: branch and concat convs
use centred padding (equal output sizes at any stride), other convs grow their padding when the
dilated kernel would not fit. Choices are listed simplest first, which is where hypothesis
shrinks them to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

from .layers import ACTIVATIONS, NOOPS
from .spec import MAX_CHANNELS, MAX_SIZE, Block, Shape, linear_input

SPATIAL_KINDS = ("conv", "pointwise", "depthwise", "pool", "transposed", "branches", "concat")
TOKEN_KINDS = ("attention", "linear_attention")
ANY_MODE_KINDS = ("bn", "act", "scale", "noop", "linear", "residual")
BLOCK_KINDS = ("conv", *ANY_MODE_KINDS[:4], *SPATIAL_KINDS[1:], *ANY_MODE_KINDS[4:], *TOKEN_KINDS)
MODIFIERS = ("identity", "computed_weight")  # ops that only modify other blocks
# how often each kind is drawn, relative to the others (the rest: once)
WEIGHTS = {"conv": 4, "branches": 3, "linear": 2, "depthwise": 2, "residual": 2}
EPS = (1e-5, 1e-3, 0.1)
NORMS = st.tuples(st.sampled_from(EPS), st.booleans())  # batch norm (eps, affine)


@dataclass(frozen=True)
class Config:
    """What a model may contain: `ops` (block kinds and modifiers), the number of top-level
    blocks, the largest branch count, and the spatial dimensionalities to draw from."""

    ops: frozenset[str]
    depth: int = 4
    branches: int = 4
    dims: tuple[int, ...] = (2, 2, 2, 1, 1, 3)

    def has(self, op: str) -> bool:
        return op in self.ops


def kinds_for(cfg: Config, shape: Shape, keep: bool, nested: bool) -> list[str]:
    """Block kinds that `cfg` allows on `shape`; `keep`: the block must preserve the shape."""
    kinds = []
    for kind in BLOCK_KINDS:
        if not cfg.has(kind) or (kind == "residual" and nested):
            continue
        if kind in SPATIAL_KINDS and shape.mode != "spatial":
            continue
        if kind in TOKEN_KINDS and (shape.mode == "flat" or (keep and shape.mode == "spatial")):
            continue
        if kind == "linear" and keep and shape.mode == "spatial":
            continue
        if kind == "concat" and keep and shape.channels < 2:
            continue
        if kind == "residual" and not kinds_for(cfg, shape, True, True):
            continue
        kinds += [kind] * WEIGHTS.get(kind, 1)
    return kinds


def maybe(draw, enabled: bool, strategy: st.SearchStrategy, odds: int = 2):
    """A drawn value one time in `odds`, else None (where hypothesis shrinks to)."""
    return draw(strategy) if enabled and draw(st.integers(0, odds - 1)) == odds - 1 else None


def post_params(draw, cfg: Config) -> dict:
    """Optional batch norm, activation, scale and computed weight of a conv or linear."""
    scales = st.sampled_from(("layer", "affine", "scalar", "div"))
    weight_fns = st.sampled_from(("masked", "reparam", "flip"))
    return {
        "bn": maybe(draw, cfg.has("bn"), NORMS),
        "act": maybe(draw, cfg.has("act"), st.sampled_from(tuple(ACTIVATIONS)), 3),
        "scale": maybe(draw, cfg.has("scale"), scales, 4),
        "weight_fn": maybe(draw, cfg.has("computed_weight"), weight_fns, 4),
    }


def divisors(n: int, limit: int = 4) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def draw_conv(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    cin, dims = shape.channels, shape.dims
    pointwise = kind == "pointwise"
    k = 1 if pointwise else draw(st.sampled_from((1, 3) if keep else (1, 2, 3)))
    dil = draw(st.sampled_from((1, 2))) if k > 1 else 1
    grows = kind == "transposed" and max(shape.sizes) > MAX_SIZE[dims] // 2
    stride = 1 if keep or grows else draw(st.integers(1, 2))
    if kind == "depthwise":
        out = cin * (1 if keep or 2 * cin > MAX_CHANNELS else draw(st.integers(1, 2)))
        groups = cin
    else:
        out = cin if keep else draw(st.integers(1, MAX_CHANNELS))
        groups = draw(st.sampled_from(divisors(math.gcd(cin, out))))
    pre_bn = maybe(draw, cfg.has("bn"), NORMS, 4)
    params = {"variant": kind, "out": out, "k": (k,) * dims}
    params |= {"stride": stride, "dil": dil, "groups": groups, "bias": draw(st.booleans())}
    if kind == "transposed":
        params |= transposed_padding(draw, shape, k, stride, dil, keep)
    else:
        params |= {"pad": conv_padding(draw, shape, k, dil, keep, pre_bn is not None), "out_pad": 0}
    return Block("conv", {**params, "pre_bn": pre_bn, **post_params(draw, cfg)})


def conv_padding(draw, shape: Shape, k: int, dil: int, keep: bool, prefer_zero: bool) -> tuple:
    """Centred, zero (what fold_bn_into_next needs) or arbitrary, grown until the dilated
    kernel fits the padded input."""
    span = dil * (k - 1) + 1
    if keep:
        return (dil * (k - 1) // 2,) * shape.dims
    modes = ("zero", "centred", "other") if prefer_zero else ("centred", "zero", "other")
    mode = draw(st.sampled_from(modes))
    wanted = {"zero": 0, "centred": dil * (k - 1) // 2}.get(mode)
    if wanted is None:
        wanted = draw(st.integers(0, 2))
    return tuple(max(wanted, (span - size + 1) // 2) for size in shape.sizes)


def transposed_padding(draw, shape: Shape, k: int, stride: int, dil: int, keep: bool) -> dict:
    """Padding within the dilated kernel that leaves at least one output, grown until the
    output is at most 1.5 times the largest size."""
    if keep:
        return {"pad": (dil * (k - 1) // 2,) * shape.dims, "out_pad": 0}
    out_pad = draw(st.integers(0, max(stride, dil) - 1))
    smallest, largest = min(shape.sizes), max(shape.sizes)
    most = min(dil * (k - 1), ((smallest - 1) * stride + dil * (k - 1) + out_pad) // 2)
    pad = draw(st.integers(0, most))
    limit = MAX_SIZE[shape.dims] * 3 // 2
    while pad < most and (largest - 1) * stride + dil * (k - 1) + out_pad + 1 - 2 * pad > limit:
        pad += 1
    return {"pad": (pad,) * shape.dims, "out_pad": out_pad}


def draw_linear(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    to = draw(st.sampled_from(("flat", "tokens"))) if shape.mode == "spatial" else None
    features = linear_input(Block("linear", {"to": to}), shape).channels
    out = features if keep else draw(st.integers(1, MAX_CHANNELS))
    pre_bn = maybe(draw, cfg.has("bn"), NORMS, 4)
    params = {"to": to, "out": out, "bias": draw(st.booleans()), "pre_bn": pre_bn}
    return Block("linear", {**params, **post_params(draw, cfg)})


def draw_simple(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    """Single-op blocks: batch norm, activation, scale, no-op, pooling."""
    if kind == "bn":
        eps, affine = draw(NORMS)
        return Block("bn", {"eps": eps, "affine": affine})
    if kind == "act":
        return Block("act", {"act": draw(st.sampled_from(tuple(ACTIVATIONS)))})
    if kind == "scale":
        variants = ("layer", "affine", "scalar", "div")
        return Block("scale", {"variant": draw(st.sampled_from(variants))})
    if kind == "noop":
        variants = ("dropout", *NOOPS, "flatten")
        return Block("noop", {"variant": draw(st.sampled_from(variants))})
    stride = 1 if keep else draw(st.integers(1, 2))
    return Block("pool", {"variant": draw(st.sampled_from(("avg", "max"))), "stride": stride})
