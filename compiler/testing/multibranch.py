"""Hypothesis strategies for random multi-branch blocks, the re-parameterizable kind (needs the
`dev` extra).

A block sums branches of one input x: a main dense conv, and convs whose (dilated) kernels fit in
the main one's span, x itself, batch norm of x and average pools, each optionally followed by
batch norm or scaled by a constant (a number or one per channel), combined with + and -, the
sum optionally wrapped FastViT-style as `x + gamma * sum`. Kernel sizes (square or not),
dilations, groups (dense, grouped, depthwise), strides, extra zero padding, bias flags, batch
norm statistics and branch counts are drawn. Such a block is one conv for merge_parallel_convs
and never costs more merged. A "broken" block opens its sum with a branch that is not a linear
op of x (a ReLU after the conv, or reflect padding before it) and must stay as it is.

Every example is `(model, x, expected_convs)`: how many convs a model should keep after
fold_conv_bn and merge_parallel_convs (one per intact block, all of a broken block's).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from .strategies import CONVS, random_batch_norm

POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
BRANCH_KINDS = ("conv", "conv_bn", "scaled_conv", "identity", "bn", "pool", "pool_bn")
IDENTITY_LIKE = ("identity", "bn", "pool", "pool_bn")


class MultiBranch(nn.Module):
    """`sum(sign * scale * branch(x))`, or `x + gamma * sum` in the FastViT form."""

    def __init__(self, branches, signs, scales, gamma=None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.signs = signs
        for index, scale in enumerate(scales):
            setattr(self, f"scale{index}", scale)
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for index, (branch, sign) in enumerate(zip(self.branches, self.signs, strict=True)):
            y = branch(x)
            scale = getattr(self, f"scale{index}")
            y = y if scale is None else y * scale
            total = y if total is None else total + y if sign > 0 else total - y
        return total if self.gamma is None else x + self.gamma * total


def _odd_up_to(limit: int) -> st.SearchStrategy[int]:
    return st.sampled_from([k for k in (1, 3, 5, 7) if k <= limit])


@st.composite
def _fitting_conv(draw, geometry: dict, kernel: tuple[int, ...]) -> nn.Module:
    """A conv whose dilated kernel fits inside `kernel`, sharing its centre."""
    sizes, dilations = [], []
    for limit in kernel:
        size = draw(_odd_up_to(limit))
        dilations.append(draw(st.integers(1, (limit - 1) // (size - 1))) if size > 1 else 1)
        sizes.append(size)
    return _conv(draw, geometry, tuple(sizes), tuple(dilations))


def _conv(draw, geometry: dict, kernel, dilation, padding_mode: str = "zeros") -> nn.Module:
    g = geometry
    padding = tuple(g["offset"] + d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    if g["stride"] == 1 and g["offset"] == 0 and draw(st.booleans()):
        padding = "same"
    conv_type = CONVS[g["dims"]]
    return conv_type(
        g["in"], g["out"], kernel, g["stride"], padding, dilation, g["groups"],
        bias=draw(st.booleans()), padding_mode=padding_mode,
    )  # fmt: skip


@st.composite
def _branch(draw, kind: str, geometry: dict, kernel: tuple[int, ...]) -> nn.Module:
    dims, channels = geometry["dims"], geometry["out"]
    seed = draw(st.integers(0, 2**16))
    if kind in ("conv", "conv_bn", "scaled_conv"):
        conv = draw(_fitting_conv(geometry, kernel))
        return (
            nn.Sequential(conv, random_batch_norm(channels, dims, seed))
            if kind == "conv_bn"
            else conv
        )
    if kind == "identity":
        return nn.Identity()
    if kind == "bn":
        return random_batch_norm(channels, dims, seed)
    # a 3-d pool wants its window no larger than the unpadded input
    size = tuple(draw(_odd_up_to(min(limit, geometry["size"]))) for limit in kernel)
    pool = POOLS[dims](size, geometry["stride"], tuple(k // 2 for k in size))
    return (
        nn.Sequential(pool, random_batch_norm(channels, dims, seed)) if kind == "pool_bn" else pool
    )


def _scale(draw, kind: str, geometry: dict):
    if kind != "scaled_conv" and (kind == "" or draw(st.integers(0, 3))):
        return None
    if draw(st.booleans()):
        return draw(st.sampled_from([0.5, -2.0, 3.0]))
    shape = (geometry["out"], *(1,) * geometry["dims"])
    return nn.Parameter(torch.rand(shape) + 0.5)


@st.composite
def _geometry(draw, dims: int, in_channels: int | None, size: int) -> dict:
    layout = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if layout == "depthwise":
        channels = in_channels or draw(st.integers(2, 4))
        geometry = {"in": channels, "out": channels, "groups": channels}
    else:
        groups = 2 if layout == "grouped" and (in_channels or 2) % 2 == 0 else 1
        channels = in_channels or groups * draw(st.integers(1, 3))
        out = draw(st.sampled_from([channels, groups * draw(st.integers(1, 3))]))
        geometry = {"in": channels, "out": out, "groups": groups}
    stride = draw(st.sampled_from([1, 1, 2]))
    offset = draw(st.sampled_from([0, 0, 1]))
    return {**geometry, "dims": dims, "stride": stride, "offset": offset, "size": size}


@st.composite
def multi_branch_block(
    draw, dims: int = 2, in_channels: int | None = None, size: int = 8, max_branches: int = 5
):
    """(block, expected_convs): one random multi-branch block for inputs of `size` along each
    spatial dim; `block.in_channels`, `.out_channels` and `.out_size` say how it chains."""
    g = draw(_geometry(dims, in_channels, size))
    kernel = tuple(draw(_odd_up_to(3 if dims == 3 else 7)) for _ in range(dims))
    kinds = [k for k in BRANCH_KINDS if k not in IDENTITY_LIKE or g["in"] == g["out"]]
    kinds = [k for k in kinds if g["offset"] == 0 or k not in IDENTITY_LIKE]
    kinds = [k for k in kinds if g["stride"] == 1 or k in ("conv", "conv_bn", "pool", "pool_bn")]
    others = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_branches - 1))
    branches = [(kind, draw(_branch(kind, g, kernel))) for kind in others]
    branches.insert(
        draw(st.integers(0, len(branches))), ("conv", _conv(draw, g, kernel, (1,) * dims))
    )
    broken = draw(st.sampled_from([None, None, None, None, "relu", "reflect"]))
    if broken == "relu":
        branches.insert(0, ("", nn.Sequential(draw(_fitting_conv(g, kernel)), nn.ReLU())))
    elif broken == "reflect" and 0 < g["offset"] + max(kernel) // 2 < size:
        branches.insert(0, ("", _conv(draw, g, kernel, (1,) * dims, padding_mode="reflect")))
    else:
        broken = None  # reflect padding needs padding, less than the input's size
    scales = [_scale(draw, kind, g) for kind, _ in branches]
    signs = [draw(st.sampled_from([1, -1])) for _ in branches]
    gamma = None
    if g["in"] == g["out"] and g["stride"] == 1 and g["offset"] == 0 and draw(st.booleans()):
        gamma = nn.Parameter(torch.rand(g["out"], *(1,) * dims) + 0.5)
    block = MultiBranch([branch for _, branch in branches], signs, scales, gamma)
    block.in_channels, block.out_channels = g["in"], g["out"]
    block.out_size = (size + 2 * g["offset"] - 1) // g["stride"] + 1
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in block.modules())
    return block, convs if broken else 1


@st.composite
def multi_branch_chain(
    draw, dims: tuple[int, ...] = (1, 2, 2, 3), max_blocks: int = 3, max_branches: int = 5
):
    """(model, x, expected_convs): 1 to `max_blocks` blocks in a row, ReLU between some, each
    with 2 to `max_branches` branches (one more when a broken branch opens the sum)."""
    dim = draw(st.sampled_from(dims))
    size = draw(st.integers(5, {1: 12, 2: 9, 3: 6}[dim]))
    layers, expected, channels, out_size = [], 0, None, size
    with torch.random.fork_rng():
        torch.manual_seed(draw(st.integers(0, 2**16)))
        for _ in range(draw(st.integers(1, max_blocks))):
            block, convs = draw(multi_branch_block(dim, channels, out_size, max_branches))
            layers.append(block)
            expected, channels, out_size = expected + convs, block.out_channels, block.out_size
            if draw(st.booleans()):
                layers.append(nn.ReLU())
        x = torch.randn(draw(st.integers(1, 2)), layers[0].in_channels, *[size] * dim)
    return nn.Sequential(*layers).eval(), x, expected
