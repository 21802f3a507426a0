"""Draw multi-path blocks (residuals, parallel branches, concats, attention) and whole specs.

Parallel branches are what branch-merging passes (RepVGG, ACNet, MobileOne, UniRepLKNet)
look for: k x k, 1 x k, k x 1, dilated, identity, batch-norm-only and average-pool branches
on one input, each optionally with its own norm and scalar or per-channel scale.
"""

from __future__ import annotations

import itertools
import math

from hypothesis import strategies as st

from .draw import (
    NORMS,
    SPATIAL_KINDS,
    TOKEN_KINDS,
    Config,
    divisors,
    draw_conv,
    draw_linear,
    draw_simple,
    kinds_for,
    maybe,
)
from .layers import ACTIVATIONS
from .spec import MAX_CHANNELS, MAX_SIZE, Block, ModelSpec, Shape, output_shape


def block(draw, cfg: Config, shape: Shape, keep: bool = False, nested: bool = False) -> Block:
    """One block valid on `shape`; with `keep` it returns the shape it gets."""
    kind = draw(st.sampled_from(kinds_for(cfg, shape, keep, nested)))
    return DRAWERS[kind](draw, cfg, shape, keep, kind)


def draw_residual(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    """x + body(x), the body one or two shape-keeping blocks."""
    count = draw(st.integers(1, 2))
    return Block("residual", {}, tuple(block(draw, cfg, shape, True, True) for _ in range(count)))


def kernel(draw, dims: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """An odd kernel, square or (in 2-D) a 1 x k row or k x 1 column."""
    size = draw(st.sampled_from(sizes))
    if dims == 2 and size > 1:
        form = draw(st.sampled_from(("square", "row", "column")))
        return {"square": (size, size), "row": (1, size), "column": (size, 1)}[form]
    return (size,) * dims


def draw_branch(draw, cfg: Config, dims: int, kinds: list[str]) -> dict:
    kind = draw(st.sampled_from(kinds))
    item: dict = {"kind": kind}
    if kind == "conv":
        k = kernel(draw, dims, (3, 1, 5) if dims < 3 else (3, 1))
        dil = draw(st.sampled_from((1, 2, 3))) if max(k) > 1 else 1
        item |= {"k": k, "dil": dil, "bias": draw(st.booleans())}
    if kind == "bn":
        item["bn"] = draw(NORMS)
    else:
        item["bn"] = maybe(draw, cfg.has("bn") and kind != "identity", NORMS, 3)
    item["scale"] = maybe(draw, cfg.has("scale"), st.sampled_from(("scalar", "channel")), 4)
    return item


def draw_branches(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    cin = shape.channels
    stride = 1 if keep else draw(st.integers(1, 2))
    out = cin if keep or draw(st.booleans()) else draw(st.integers(1, MAX_CHANNELS))
    same = out == cin
    groups = divisors(math.gcd(cin, out)) + ([cin] if same and cin > 4 else [])
    kinds = ["conv", "conv"]
    kinds += ["identity"] if cfg.has("identity") and same and stride == 1 else []
    kinds += ["bn"] if cfg.has("bn") and same and stride == 1 else []
    kinds += ["pool"] if cfg.has("pool") and same else []
    count = draw(st.integers(2, max(2, cfg.branches)))
    items = tuple(draw_branch(draw, cfg, shape.dims, kinds) for _ in range(count))
    params = {"out": out, "stride": stride, "groups": draw(st.sampled_from(groups))}
    act = maybe(draw, cfg.has("act"), st.sampled_from(tuple(ACTIVATIONS)), 3)
    return Block("branches", {**params, "items": items, "act": act})


def draw_concat(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    """Parts concatenated along channels: "split" cuts x's channels into groups, each through
    a depthwise conv or as is (InceptionNeXt); "parallel" parts each read all of x."""
    cin = shape.channels
    variants = ("split",) if keep else ("parallel", "split") if cin > 1 else ("parallel",)
    variant = draw(st.sampled_from(variants))
    most = min(cfg.branches, cin) if variant == "split" else cfg.branches
    count = draw(st.integers(2, max(2, most)))
    if variant == "split":
        cut = st.integers(1, cin - 1)
        cuts = draw(st.lists(cut, min_size=count - 1, max_size=count - 1, unique=True))
        widths = [b - a for a, b in itertools.pairwise([0, *sorted(cuts), cin])]
        parts = tuple(concat_part(draw, cfg, shape.dims, w, split=True) for w in widths)
        return Block("concat", {"variant": variant, "stride": 1, "parts": parts})
    stride, parts = (1 if keep else draw(st.integers(1, 2))), []
    for j in range(count):
        room = MAX_CHANNELS - sum(part["out"] for part in parts) - (count - j - 1)
        if cfg.has("identity") and stride == 1 and cin <= room and draw(st.booleans()):
            parts.append({"kind": "identity", "out": cin})
        else:
            parts.append(concat_part(draw, cfg, shape.dims, draw(st.integers(1, room))))
    return Block("concat", {"variant": variant, "stride": stride, "parts": tuple(parts)})


def concat_part(draw, cfg: Config, dims: int, width: int, split: bool = False) -> dict:
    """A conv part of `width` output channels; a split part is depthwise, or its slice as is."""
    if split and cfg.has("identity") and draw(st.booleans()):
        return {"kind": "identity", "out": width}
    groups = width if split else 1
    k = kernel(draw, dims, (3, 1, 5) if dims < 3 else (3, 1))
    dil = draw(st.sampled_from((1, 2))) if max(k) > 1 else 1
    bias = draw(st.booleans())
    return {"kind": "conv", "out": width, "k": k, "dil": dil, "groups": groups, "bias": bias}


def draw_attention(draw, cfg: Config, shape: Shape, keep: bool, kind: str) -> Block:
    params = {
        "heads": draw(st.sampled_from(divisors(shape.channels, MAX_CHANNELS))),
        "qkv": draw(st.sampled_from(("separate", "fused"))),
        "bias": draw(st.booleans()),
        "proj": draw(st.booleans()),
    }
    if kind == "attention":
        return Block(kind, {**params, "variant": draw(st.sampled_from(("sdpa", "manual")))})
    phi = draw(st.sampled_from(("elu", "relu")))
    normalize = phi == "elu" and draw(st.booleans())  # relu features may sum to 0
    # without the normalizer, 1 / (tokens * head size) keeps the output's scale that of v
    scaled = not normalize or draw(st.booleans())
    extra = {"variant": "linear", "phi": phi, "normalize": normalize, "scaled": scaled}
    return Block(kind, {**params, **extra})


def start_modes(cfg: Config) -> list[str]:
    """Input kinds the ops can start from: images (mostly), token sequences, feature vectors."""
    modes = ["spatial"] * 3 if any(cfg.has(k) for k in SPATIAL_KINDS) else []
    modes += ["tokens"] if cfg.has("linear") or any(cfg.has(k) for k in TOKEN_KINDS) else []
    modes += ["flat"] if cfg.has("linear") else []
    return modes or ["spatial", "tokens", "flat"]


@st.composite
def model_specs(draw, cfg: Config) -> ModelSpec:
    mode = draw(st.sampled_from(start_modes(cfg)))
    if mode == "spatial":
        dims = draw(st.sampled_from(cfg.dims))
        sizes = tuple(draw(st.integers(1, MAX_SIZE[dims])) for _ in range(dims))
        shape = Shape(mode, draw(st.integers(1, MAX_CHANNELS)), sizes)
    elif mode == "tokens":
        length = draw(st.integers(1, 12))
        shape = Shape(mode, draw(st.integers(1, MAX_CHANNELS)), (length,))
    else:
        shape = Shape(mode, draw(st.integers(1, MAX_CHANNELS)))
    start, blocks = shape, []
    # "another block?" before each block, so that shrinking can cut any block out
    while kinds_for(cfg, shape, False, False) and len(blocks) < cfg.depth:
        if blocks and not draw(st.integers(0, 3)):
            break
        blocks.append(block(draw, cfg, shape))
        shape = output_shape(blocks[-1], shape)
    return ModelSpec(start, tuple(blocks), draw(st.integers(0, 1 << 16)))


DRAWERS = {
    "conv": draw_conv,
    "pointwise": draw_conv,
    "depthwise": draw_conv,
    "transposed": draw_conv,
    "linear": draw_linear,
    "bn": draw_simple,
    "act": draw_simple,
    "scale": draw_simple,
    "noop": draw_simple,
    "pool": draw_simple,
    "residual": draw_residual,
    "branches": draw_branches,
    "concat": draw_concat,
    "attention": draw_attention,
    "linear_attention": draw_attention,
}
