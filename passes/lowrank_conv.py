"""lowrank_conv: conv(x, W, b)  =>  conv1x1(conv(x, R), L, b) with W ~ L @ R of rank r.

W is read as an out x (in * k * k) matrix. The first conv keeps the original stride, padding
and dilation and computes r channels with R's filters; the 1 x 1 conv mixes them into the out
channels with L and adds the bias (a "spatial then pointwise" factoring, the conv analogue
of `lowrank_linear`). r keeps at least `energy` of sum(s**2) (default 0.999; per call:
``optimize(..., options={"lowrank_conv": {"energy": 0.99}})``, as for `lowrank_linear`).
Exact: no, unless the reshaped weight has rank r.
Declines when: the conv is grouped, transposed or an `aten.convolution`; its weight or bias is
not a constant used only here; the weight is zero; or the factored form is not cheaper:
r * (in * k * k + out) >= out * in * k * k multiply-adds per output position.
Reference: Maestro (low-rank factors by SVD truncation); the Eckart-Young theorem.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fxopt.analysis.lowrank import DEFAULT, TAG, LowRankSettings, factored, summarize, truncate
from fxopt.ir.graph import add_constant, call, constant, owns_weights
from fxopt.ir.ops import CONVS, conv
from fxopt.rules.approximate import ApproximateResult
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, Rule, decline, rewrite

aten = torch.ops.aten


def plain_conv(node: fx.Node) -> list[fx.Node] | None:
    """A conv1d/2d/3d whose weight this pass did not produce."""
    found = conv(node)
    if found is None or node.target.overloadpacket not in CONVS or factored(found.weight):
        return None
    return [node]


def can_factor(match: Match, energy: float) -> object:
    """The truncated factors of the weight's matrix, or a `decline` saying why not to factor."""
    found = conv(match.root)
    if found.groups != 1:
        return decline("grouped or depthwise conv")
    if not owns_weights(match.gm, found.weight, found.bias):
        return decline("weight or bias is not a constant used only here")
    weight = constant(match.gm, found.weight)
    if not weight.any():
        return decline("weight is zero")
    out_channels, taps = weight.shape[0], math.prod(weight.shape[1:])
    f = truncate(weight.reshape(out_channels, taps), energy)
    if f.rank * (taps + out_channels) >= out_channels * taps:
        return decline(
            f"rank {f.rank} of {min(out_channels, taps)} keeps {energy} of the "
            f"energy; not cheaper ({f.rank}*({taps}+{out_channels}) >= {out_channels}*{taps})"
        )
    return f


def factor(match: Match, kept: list) -> fx.Node:
    gm, node, found, f = match.gm, match.root, conv(match.root), match.plan
    weight = constant(gm, found.weight)
    out_channels, taps = weight.shape[0], math.prod(weight.shape[1:])
    dims = weight.dim() - 2
    right = add_constant(gm, f.right.reshape(f.rank, *weight.shape[1:]), f"{TAG}_right")
    left = add_constant(gm, f.left.reshape(out_channels, f.rank, *(1,) * dims), f"{TAG}_left")
    op = node.target
    x = node.args[0]
    hidden = call(gm, op, (x, right, None, found.stride, found.padding, found.dilation, 1))
    kept.append(
        (
            f"{f.rank}/{min(out_channels, taps)}",
            f.energy,
            weight.numel(),
            f.rank * (taps + out_channels),
        )
    )
    return call(gm, op, (hidden, left, found.bias))


@register_pass("lowrank_conv", exact=False, settings=LowRankSettings)
def lowrank_conv(gm: fx.GraphModule, settings: LowRankSettings = DEFAULT) -> ApproximateResult:
    kept: list = []
    rules = [
        # conv(x, W)  =>  conv1x1(conv(x, R), L)
        Rule(
            "conv-lowrank",
            pattern=plain_conv,
            check=lambda m: can_factor(m, settings.energy),
            build=lambda m: factor(m, kept),
        ),
    ]
    result = rewrite(gm, rules)
    return ApproximateResult(
        result.graph_module, result.modified, result.applied, result.declined, summarize(kept)
    )
