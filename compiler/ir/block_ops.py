"""Fused-block custom ops: the nodes `fuse_blocks` puts in the graph, one per block.

`torch.ops.fxopt.dw_pw_block` is a depthwise conv (+ bias, + activation) followed by a 1x1 conv
(+ bias, + activation); `torch.ops.fxopt.pw_dw_pw_block` is a MobileNetV2 inverted residual:
1x1 expand, depthwise, 1x1 project, each with an optional activation, plus `x` when `residual`.
Their eager implementations are the same ATen calls the unfused graph makes, in the same order,
so eager results are bit-for-bit those of the unfused graph. `register_fake` lets torch.export
keep each block as one node, which the TVM converters in `fxopt.codegen.block_converters` lower
to one generated kernel. This module does not import TVM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

aten = torch.ops.aten

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "relu": aten.relu.default,
    "relu6": lambda x: aten.hardtanh.default(x, 0.0, 6.0),
    "gelu": aten.gelu.default,
    "gelu_tanh": lambda x: aten.gelu.default(x, approximate="tanh"),
    "silu": aten.silu.default,
    "hardswish": aten.hardswish.default,
}


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the activation called `name` (a key of `ACTIVATIONS`) with the ATen op the
    unfused graph uses."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"fxopt block: unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name](x)


def _dw(x, weight, bias, stride, padding, dilation):
    return aten.conv2d.default(x, weight, bias, stride, padding, dilation, weight.shape[0])


def _pw(x, weight, bias):
    return aten.conv2d.default(x, weight, bias, [1, 1], [0, 0], [1, 1], 1)


@torch.library.custom_op("fxopt::dw_pw_block", mutates_args=())
def dw_pw_block(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    act_mid: str,
    act_out: str,
) -> torch.Tensor:
    """act_out(pw(act_mid(dw(x)))): a depthwise conv (groups = channels) and a 1x1 conv."""
    mid = activate(_dw(x, dw_weight, dw_bias, stride, padding, dilation), act_mid)
    return activate(_pw(mid, pw_weight, pw_bias), act_out)


@torch.library.custom_op("fxopt::pw_dw_pw_block", mutates_args=())
def pw_dw_pw_block(
    x: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: torch.Tensor | None,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    project_weight: torch.Tensor,
    project_bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    act_expand: str,
    act_mid: str,
    act_out: str,
    residual: bool,
) -> torch.Tensor:
    """x + act_out(pw(act_mid(dw(act_expand(pw(x)))))), without `x +` unless `residual`."""
    hidden = activate(_pw(x, expand_weight, expand_bias), act_expand)
    mid = activate(_dw(hidden, dw_weight, dw_bias, stride, padding, dilation), act_mid)
    out = activate(_pw(mid, project_weight, project_bias), act_out)
    return aten.add.Tensor(x, out) if residual else out


def _output_size(size, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _fake_output(x, dw_weight, out_channels, stride, padding, dilation) -> torch.Tensor:
    kernel = dw_weight.shape[2:]
    height, width = (
        _output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i])
        for i in range(2)
    )
    return x.new_empty((x.shape[0], out_channels, height, width))


@dw_pw_block.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, act_mid, act_out):
    return _fake_output(x, dw_weight, pw_weight.shape[0], stride, padding, dilation)


@pw_dw_pw_block.register_fake
def _(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, *rest):
    stride, padding, dilation = rest[:3]
    return _fake_output(x, dw_weight, project_weight.shape[0], stride, padding, dilation)


# The on-chip budget of one fused tile: CUDA's 48 KiB of static shared memory per thread block
# (more needs an opt-in launch attribute). `fuse_blocks` fuses only blocks that fit it, so eager
# and TVM agree on what is fused whatever the target.
ON_CHIP_BYTES = 48 * 1024
# The CPU schedule may use larger tiles (less halo recompute), within a share of a core's L2.
CPU_ON_CHIP_BYTES = 128 * 1024
# Output tiles (rows, columns) the kernels may use, in order of preference; 7- and 14-wide
# tiles cover the 7, 14, 28 and 56 wide maps of ImageNet-sized models without partial tiles.
TILES = (
    (8, 16), (8, 14), (7, 14), (8, 8), (4, 16), (4, 14), (4, 8), (4, 7), (7, 7), (4, 4),
    (2, 8), (2, 7), (2, 4), (2, 2),
)  # fmt: skip


def working_set(
    tile: tuple[int, int], channels: int, kernel: tuple[int, int], stride, dilation, expand: bool
) -> int:
    """Bytes a fused tile keeps on chip (fp32): the dw output for `tile` pixels and all
    `channels`, plus, for an inverted residual (`expand`), the expanded input with its halo."""
    total = tile[0] * tile[1] * channels
    if expand:
        halo = zip(tile, kernel, stride, dilation, strict=True)
        rows, cols = ((t - 1) * s + d * (k - 1) + 1 for t, k, s, d in halo)
        total += rows * cols * channels
    return 4 * total


def tile_for(
    channels: int,
    kernel,
    stride,
    dilation,
    expand: bool,
    out_size: tuple[int, int] | None = None,
    exact: bool = False,
    budget: int = ON_CHIP_BYTES,
    tiles: tuple[tuple[int, int], ...] = TILES,
) -> tuple[int, int] | None:
    """An output tile whose working set fits `budget` bytes, or None when none does.

    Without `out_size`: the first of `tiles` that fits (what `fuse_blocks` asks). With it: the
    one of `tiles` that wastes the fewest pixels on partial tiles; with `exact` as well, the
    largest tile of at most 8 x 8 that divides `out_size` (the GPU schedule needs whole tiles).
    """

    def fits(tile):
        return working_set(tile, channels, kernel, stride, dilation, expand) <= budget

    if exact and out_size is not None:
        rows, cols = ([d for d in range(1, 9) if size % d == 0] for size in out_size)
        whole = [(r, c) for r in rows for c in cols if fits((r, c))]
        return max(whole, key=lambda tile: (tile[0] * tile[1], tile[1]), default=None)
    candidates = [tile for tile in tiles if fits(tile)]
    if not candidates or out_size is None:
        return candidates[0] if candidates else None
    return min(candidates, key=lambda tile: _covered(tile, out_size))


def _covered(tile: tuple[int, int], out_size: tuple[int, int]) -> int:
    """Output pixels the tiles cover, partial tiles included."""
    return math.prod(-(-size // t) * t for t, size in zip(tile, out_size, strict=True))


def block_flops(inverted: bool, args, out: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of a fused-block call with tensor `args` (a `pw_dw_pw_block`
    when `inverted`, else a `dw_pw_block`) and result `out`, for `fxopt.cost`."""
    x, weights = args[0], args[1:7:2] if inverted else args[1:5:2]
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    macs = sum(pixels * w.numel() for w in weights[-2:])  # dw and pw at the output resolution
    if inverted:
        macs += x.shape[0] * x.shape[2] * x.shape[3] * weights[0].numel()
    return 2 * macs


DW_PW_BLOCK = torch.ops.fxopt.dw_pw_block.default
PW_DW_PW_BLOCK = torch.ops.fxopt.pw_dw_pw_block.default
BLOCK_OPS = (DW_PW_BLOCK, PW_DW_PW_BLOCK)
