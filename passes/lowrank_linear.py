"""lowrank_linear: linear(x, W, b)  =>  linear(linear(x, R), L, b), W ~ L @ R of rank r.

W = U S Vh (SVD); r is the smallest rank whose singular values keep at least `energy` of
sum(s**2), and L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r (the square root balances the two factors,
which helps `fxopt.calibrate` fit them). The default energy 0.999 (epsilon = 1e-3) bounds the
weight's relative Frobenius error by sqrt(1e-3) ~ 3%; set it per call with
``optimize(..., options={"lowrank_linear": {"energy": 0.99}})`` (`LowRankSettings`).
Exact: no, unless W has rank r (then up to rounding). The pass reports the ranks it kept and the
smallest energy fraction kept; the pipeline reports the output error.
Declines when: the weight (or bias) is not a constant used only here, it is all zeros, or the
factored form is not cheaper: r * (in + out) >= in * out multiply-adds per row.
A linear this pass produced is never factored again (its weights carry the `lowrank` tag).
Reference: Maestro (low-rank training by SVD truncation); the Eckart-Young theorem.
"""

from __future__ import annotations

import torch
from torch import fx

from fxopt.analysis.lowrank import DEFAULT, TAG, LowRankSettings, factored, summarize, truncate
from fxopt.ir.graph import add_constant, call, constant, is_op, owns_weights
from fxopt.rules.approximate import ApproximateResult
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, Rule, decline, rewrite

aten = torch.ops.aten


def plain_linear(node: fx.Node) -> list[fx.Node] | None:
    """A linear whose weight this pass did not produce."""
    if not is_op(node, aten.linear) or len(node.args) < 2 or factored(node.args[1]):
        return None
    return [node]


def can_factor(match: Match, energy: float) -> object:
    """The truncated factors of the weight, or a `decline` saying why not to factor it."""
    node = match.root
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    if not owns_weights(match.gm, weight, bias):
        return decline("weight or bias is not a constant used only here")
    if constant(match.gm, weight).dim() != 2 or not constant(match.gm, weight).any():
        return decline("weight is not a non-zero matrix")
    weight = constant(match.gm, weight)
    out_features, in_features = weight.shape
    f = truncate(weight, energy)
    if f.rank * (in_features + out_features) >= in_features * out_features:
        return decline(
            f"rank {f.rank} of {min(weight.shape)} keeps {energy} of the energy; "
            f"not cheaper ({f.rank}*({in_features}+{out_features}) >= {in_features}*{out_features})"
        )
    return f


def factor(match: Match, kept: list) -> fx.Node:
    gm, node, f = match.gm, match.root, match.plan
    weight = constant(gm, node.args[1])
    bias = node.args[2] if len(node.args) > 2 else None
    right = add_constant(gm, f.right, f"{TAG}_right")
    left = add_constant(gm, f.left, f"{TAG}_left")
    hidden = call(gm, aten.linear.default, (node.args[0], right))
    kept.append(
        (
            f"{f.rank}/{min(weight.shape)}",
            f.energy,
            weight.numel(),
            f.left.numel() + f.right.numel(),
        )
    )
    return call(gm, aten.linear.default, (hidden, left, bias))


@register_pass("lowrank_linear", exact=False, settings=LowRankSettings)
def lowrank_linear(gm: fx.GraphModule, settings: LowRankSettings = DEFAULT) -> ApproximateResult:
    kept: list = []
    rules = [
        # linear(x, W)  =>  linear(linear(x, R), L)
        Rule(
            "linear-lowrank",
            pattern=plain_linear,
            check=lambda m: can_factor(m, settings.energy),
            build=lambda m: factor(m, kept),
        ),
    ]
    result = rewrite(gm, rules)
    return ApproximateResult(
        result.graph_module, result.modified, result.applied, result.declined, summarize(kept)
    )
