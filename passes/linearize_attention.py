"""linearize_attention: scaled_dot_product_attention(q, k, v)  =>  kernelized linear attention
phi(q) (phi(k)^T v) / (phi(q) (phi(k)^T 1) + eps).

The N x M attention matrix is never formed: phi(k)^T v is d x dv, so the cost is O(N d dv)
instead of O(N M (d + dv)). The feature map phi is the ``feature_map`` setting (per call:
``optimize(..., options={"linearize_attention": {"feature_map": "focused"}})``):
"elu" (elu(x) + 1, the default), "relu", "focused" (FLatten: relu(x)^p rescaled to the norm of
relu(x), p = ``power``, default 3) or "learnable" (elu(x A) + 1 with one d x d matrix A per head,
for q and for k, initialised to the identity; `fxopt.calibrate` fits them, and they are graph
constants named ``*calib_feature_map*``). ``eps`` (default 1e-6) keeps the normalizer positive.
The softmax scale has no counterpart (relu and focused maps are scale-invariant after the
normalization).
Exact: no; softmax is not a kernel of finite dimension. Expect a large error before
`fxopt.calibrate` (the pipeline reports it).
Declines when: the attention is causal, has a mask, dropout or grouped-query heads, q and k have
different head counts, or the cost model prices the linear form above the quadratic one (short
sequences: roughly N <= d, plus the fixed cost of the extra calls).
Cost rule: `fxopt.cost.roofline` of the SDPA node against FLOPs 4 N d dv + feature-map work and
about ten calls' fixed cost.
Reference: Katharopoulos et al. 2020 (elu + 1); FLatten Transformer (focused); SLAB, LinFusion,
CLEAR, LiT, L2ViT (linear attention distilled from softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.cost import OP_OVERHEAD_BYTES, Cost, hinted, node_roofline, roofline
from fxopt.ir.graph import add_constant, arg, call, is_op, val
from fxopt.rules.approximate import ApproximateResult
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, Rule, decline, rewrite

aten = torch.ops.aten
FEATURE_MAPS = ("elu", "relu", "focused", "learnable")
TAG = "calib_feature_map"  # `fxopt.calibrate` fits constants whose name carries "calib"
LINEAR_CALLS = 10  # ops in the linear form, each with a fixed cost


@dataclass(frozen=True)
class LinearizeSettings:
    """`feature_map`: one of FEATURE_MAPS; `power`: the focused map's exponent; `eps`: added
    to the denominator."""

    feature_map: str = "elu"
    power: float = 3.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")


DEFAULT = LinearizeSettings()


def can_linearize(match: Match) -> bool:
    node = match.root
    q, k, v = (val(a) for a in node.args[:3])
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() < 3:
        return decline("q, k, v are not batched tensors of known shape")
    if arg(node, 3, "attn_mask") is not None:
        return decline("attention has a mask")
    if arg(node, 4, "dropout_p", 0.0) != 0.0:
        return decline("attention has dropout")
    if arg(node, 5, "is_causal", False):
        return decline("causal attention (use a chunked causal form instead)")
    if arg(node, 7, "enable_gqa", False) or q.shape[:-2] != k.shape[:-2]:
        return decline("grouped-query attention, or q and k have different heads")
    linear, quadratic = linear_cost(node), node_roofline(node)
    if linear >= quadratic:
        return decline(f"cost model: linear form {linear:.3g} >= softmax attention {quadratic:.3g}")
    return True


def linear_cost(node: fx.Node) -> float:
    """Roofline of the linear form at the node's shapes, its calls' fixed cost included."""
    q, k, v = (hinted(val(a).shape) for a in node.args[:3])
    d, dv, size = q[-1], v[-1], val(node).element_size()
    rows_q, rows_k, heads = math.prod(q[:-1]), math.prod(k[:-1]), math.prod(q[:-2])
    flops = 2 * d * dv * (rows_q + rows_k) + 2 * rows_q * d + 8 * (rows_q + rows_k) * d
    moved = 4 * (rows_q + rows_k) * d + rows_k * dv + 2 * rows_q * dv + 2 * heads * d * dv
    return roofline(Cost(flops, moved * size), LINEAR_CALLS * OP_OVERHEAD_BYTES)


def feature_map(gm: fx.GraphModule, x: fx.Node, role: str, settings: LinearizeSettings) -> fx.Node:
    """phi(x) for the chosen feature map, inserted at the insertion point."""
    kind = settings.feature_map
    if kind == "relu":
        return call(gm, aten.relu.default, (x,))
    if kind == "focused":
        r = call(gm, aten.relu.default, (x,))
        rp = call(gm, aten.pow.Tensor_Scalar, (r, settings.power))
        norm_r = call(gm, aten.linalg_vector_norm.default, (r, 2, [-1], True))
        norm_rp = call(gm, aten.linalg_vector_norm.default, (rp, 2, [-1], True))
        ratio = call(gm, aten.div.Tensor, (norm_r, call(gm, aten.add.Tensor, (norm_rp, 1e-12))))
        return call(gm, aten.mul.Tensor, (rp, ratio))
    if kind == "learnable":
        shape = val(x).shape
        heads = shape[-3] if len(shape) >= 4 else 1
        eye = torch.eye(shape[-1], dtype=val(x).dtype, device=val(x).device)
        matrix = add_constant(gm, eye.expand(heads, -1, -1).contiguous(), f"{TAG}_{role}")
        x = call(gm, aten.matmul.default, (x, matrix))
    return call(gm, aten.add.Tensor, (call(gm, aten.elu.default, (x,)), 1.0))


def linearize(match: Match, settings: LinearizeSettings) -> fx.Node:
    gm, node = match.gm, match.root
    q, k, v = node.args[:3]
    phi_q, phi_k = feature_map(gm, q, "q", settings), feature_map(gm, k, "k", settings)
    phi_k_t = call(gm, aten.transpose.int, (phi_k, -2, -1))
    kv = call(gm, aten.matmul.default, (phi_k_t, v))  # (..., d, dv)
    numerator = call(gm, aten.matmul.default, (phi_q, kv))  # (..., N, dv)
    k_sum = call(gm, aten.sum.dim_IntList, (phi_k, [-2], True))  # (..., 1, d)
    weighted = call(gm, aten.mul.Tensor, (phi_q, k_sum))
    denominator = call(gm, aten.sum.dim_IntList, (weighted, [-1], True))  # (..., N, 1)
    denominator = call(gm, aten.add.Tensor, (denominator, settings.eps))
    return call(gm, aten.div.Tensor, (numerator, denominator))


def is_attention(node: fx.Node) -> list[fx.Node] | None:
    return [node] if is_op(node, aten.scaled_dot_product_attention) else None


@register_pass("linearize_attention", exact=False, settings=LinearizeSettings)
def linearize_attention(
    gm: fx.GraphModule, settings: LinearizeSettings = DEFAULT
) -> ApproximateResult:
    rules = [
        # softmax(q k^T) v  =>  phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1)
        Rule(
            "sdpa-linear",
            pattern=is_attention,
            check=can_linearize,
            build=lambda m: linearize(m, settings),
        ),
    ]
    result = rewrite(gm, rules)
    count = result.applied.get("sdpa-linear", 0)
    summary = {"feature map": settings.feature_map, "attentions": count} if count else {}
    return ApproximateResult(
        result.graph_module, result.modified, result.applied, result.declined, summary
    )
