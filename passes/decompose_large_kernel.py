"""decompose_large_kernel: depthwise k x k conv  =>  sum of depthwise 3x3, 1xk and kx1 convs.

The kernel is projected, by least squares, onto the kernels supported on the 3 x 3 square, the
middle row and the middle column (InceptionNeXt's branches). Those supports are coordinates,
so the projection keeps the kernel's taps there and zeroes the rest; the 3 x 3 branch takes the
square (and the bias), the bands take the rest of the middle row and column. The pass reports
the projection's relative residual ||W - P(W)|| / ||W|| (Frobenius, over all channels), and
declines kernels whose residual exceeds the ``max_residual`` setting (default 1.0: never; per
call: ``optimize(..., options={"decompose_large_kernel": {"max_residual": 0.3}})``).
Exact: no, unless the kernel is zero off the square and the bands (then up to rounding).
Declines when: the kernel size is even or the input unbatched; the conv is dilated or its
padding is not k // 2 (any stride is kept: every branch uses it); its weight or bias is not a
constant used only here; the residual is above the limit; or the cost model prices the three
branch convs and two adds above the dense conv.
Cost rule: `fxopt.cost.roofline` of the dense conv against the three branches (each with a
depthwise call's fixed cost) and the adds; on CPU a dense kernel above 13 x 13 is priced 20x,
because PyTorch's depthwise conv leaves its fast path there. Measured on one core (dense vs
branches): 64 ch at 56x56, k = 9: 0.47 vs 1.05 ms, k = 13: 0.95 vs 2.3 ms (dense wins), k = 15:
63 vs 7 ms, k = 31: 396 vs 17 ms; replknet_like's 31x31 at 16x16: 11.6 vs 0.6 ms (batch 1).
Depthwise convs with a non-square kernel or k < ``min_kernel`` (a setting, default 7) are not
matched.
Reference: InceptionNeXt (Yu et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import Cost, call_overhead, conv_flops, hinted, node_roofline, roofline
from fxopt.ir.graph import add_constant, call, constant, is_op, owns_weights, val
from fxopt.ir.ops import conv
from fxopt.rules.approximate import ApproximateResult
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, Rule, decline, rewrite

aten = torch.ops.aten
# PyTorch's CPU depthwise conv leaves its fast path above 13 x 13 taps: measured on one core
# (torch 2.13, 64 channels at 56x56), a dense 13x13 takes 0.9 ms and a 15x15 63 ms, so a dense
# kernel past the cliff is priced this many times its roofline.
CPU_SLOW_KERNEL, CPU_SLOW_FACTOR = 13, 20.0
TAG = "calib_band"  # `fxopt.calibrate` fits constants whose name carries "calib"


@dataclass(frozen=True)
class DecomposeSettings:
    """`min_kernel`: the smallest kernel side matched; `max_residual`: the largest relative
    projection residual accepted."""

    min_kernel: int = 7
    max_residual: float = 1.0

    def __post_init__(self):
        if self.min_kernel < 3 or self.max_residual < 0:
            raise ValueError(
                f"min_kernel must be at least 3 and max_residual at least 0, got "
                f"{self.min_kernel} and {self.max_residual}"
            )


DEFAULT = DecomposeSettings()


def project(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Split a (C, 1, k, k) kernel into (C, 1, 3, 3), (C, 1, 1, k), (C, 1, k, 1) branch kernels
    whose centred sum is its least-squares projection; also the relative residual."""
    c = kernel.shape[-1] // 2
    square = kernel[..., c - 1 : c + 2, c - 1 : c + 2].clone()
    row = kernel[..., c : c + 1, :].clone()
    column = kernel[..., :, c : c + 1].clone()
    row[..., c - 1 : c + 2] = 0  # the square branch holds these taps
    column[..., c - 1 : c + 2, :] = 0
    kept = torch.zeros_like(kernel)
    kept[..., c : c + 1, :] += row
    kept[..., :, c : c + 1] += column
    kept[..., c - 1 : c + 2, c - 1 : c + 2] += square
    norm = kernel.double().norm().item()
    residual = (kernel - kept).double().norm().item() / norm if norm else 0.0
    return square, row, column, residual


def large_depthwise(node: fx.Node, min_kernel: int) -> list[fx.Node] | None:
    """A depthwise conv2d with a square kernel of at least ``min_kernel`` taps a side."""
    found = conv(node) if is_op(node, aten.conv2d) else None
    if found is None or not isinstance(val(found.weight), torch.Tensor):
        return None
    weight = val(found.weight)
    if weight.dim() != 4 or weight.shape[1] != 1 or found.groups != weight.shape[0]:
        return None
    kh, kw = weight.shape[2:]
    return [node] if kh == kw and kh >= min_kernel else None


def can_decompose(match: Match, max_residual: float) -> object:
    """The projection (square, row, column kernels and the residual), or a `decline`."""
    found = conv(match.root)
    k = val(found.weight).shape[-1]
    if k % 2 == 0 or val(match.root.args[0]).dim() != 4:
        return decline(f"even kernel size {k}, or an unbatched input")
    if found.dilation != (1, 1) or found.padding not in ((k // 2, k // 2), "same"):
        return decline("dilated, or padding is not k // 2")
    if not owns_weights(match.gm, found.weight, found.bias):
        return decline("weight or bias is not a constant used only here")
    node = match.root
    square, row, column, residual = project(constant(match.gm, found.weight))
    if residual > max_residual:
        return decline(f"projection residual {residual:.3g} exceeds {max_residual}")
    dense, split = node_roofline(node), branch_cost(node, [(3, 3), (1, k), (k, 1)])
    if k > CPU_SLOW_KERNEL and val(node).device.type == "cpu":
        dense *= CPU_SLOW_FACTOR
    if split >= dense:
        return decline(f"cost model: branches {split:.3g} >= dense conv {dense:.3g}")
    return square, row, column, residual


def branch_cost(node: fx.Node, kernels: list[tuple[int, int]]) -> float:
    """Roofline of the branch convs and the adds that sum them, at the node's shapes."""
    x, out = hinted(val(node.args[0]).shape), hinted(val(node).shape)
    channels, elements = x[1], 4 * out[0] * out[1] * out[2] * out[3]
    total = 0.0
    for kh, kw in kernels:
        flops = conv_flops(out[0], out[2:], (channels, 1, kh, kw), True)
        total += roofline(Cost(flops, 4 * x[0] * x[1] * x[2] * x[3] + elements), call_overhead(2))
    return total + (len(kernels) - 1) * roofline(Cost(elements // 4, 3 * elements))


def decompose(match: Match, residuals: list) -> fx.Node:
    gm, node, found = match.gm, match.root, conv(match.root)
    weight = constant(gm, found.weight)
    k = weight.shape[-1]
    square, row, column, residual = match.plan
    x, groups, stride = node.args[0], weight.shape[0], found.stride
    outputs = []
    for kernel, padding, bias in (
        (square, (1, 1), found.bias),
        (row, (0, k // 2), None),
        (column, (k // 2, 0), None),
    ):
        w = add_constant(gm, kernel, f"{TAG}_{kernel.shape[-2]}x{kernel.shape[-1]}")
        args = (x, w, bias, stride, padding, (1, 1), groups)
        outputs.append(call(gm, aten.conv2d.default, args))
    residuals.append((k, residual))
    total = call(gm, aten.add.Tensor, (outputs[0], outputs[1]))
    return call(gm, aten.add.Tensor, (total, outputs[2]))


@register_pass("decompose_large_kernel", exact=False, settings=DecomposeSettings)
def decompose_large_kernel(
    gm: fx.GraphModule, settings: DecomposeSettings = DEFAULT
) -> ApproximateResult:
    residuals: list = []
    rules = [
        # dw_conv k x k  =>  dw_conv 3x3 + dw_conv 1xk + dw_conv kx1
        Rule(
            "dw-square-bands",
            pattern=lambda node: large_depthwise(node, settings.min_kernel),
            check=lambda m: can_decompose(m, settings.max_residual),
            build=lambda m: decompose(m, residuals),
        ),
    ]
    result = rewrite(gm, rules)
    summary = {}
    if residuals:
        summary = {
            "kernels": ", ".join(f"{k}x{k}" for k, _ in residuals),
            "max relative residual": max(r for _, r in residuals),
        }
    return ApproximateResult(
        result.graph_module, result.modified, result.applied, result.declined, summary
    )
