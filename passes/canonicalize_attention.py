"""canonicalize_attention: softmax(q @ kT * scale [+ mask]) @ v  =>  scaled_dot_product_attention.

Matches hand-written attention in any layout: (B, N, d) or (B, H, N, d) with whatever
reshapes and permutes produced q, k and v; the key transposed by transpose, permute, mT or t (or
not at all: a new transpose feeds SDPA); constant scalings on q, on k, or on the scores (x s,
/ sqrt(d)) multiplied into SDPA's explicit `scale`. An additive float mask becomes `attn_mask`;
`masked_fill(mask, -inf)` with a constant boolean mask becomes `is_causal=True` when the mask
is the strict upper triangle, else `attn_mask = ~mask`. Eval-mode dropout on the weights is
dropped. `nn.MultiheadAttention(need_weights=False)` already exports as SDPA; with
`need_weights=True` its weights are returned, and the pass declines.
Exact: yes, up to summation order: SDPA computes the same softmax(q kT scale + mask) v. Measured
on CPU fp32 against the hand-written form: max error below 1e-6 relative to the output's scale
(tests/passes/test_canonicalize_attention.py).
Declines when: dropout runs in training mode; softmax is not over the last axis or casts; a
score, logit or weight has another user (attention maps returned); the scaling sits on top of
the mask; a boolean mask is not a constant or masks a whole row (softmax would give NaN, SDPA
may not), or masked_fill writes a finite value; the mask does not broadcast to the scores;
q, k, v or the mask differ in dtype, or their batch dimensions differ, or they have rank < 3.
Reference: Vaswani et al. 2017; torch.nn.functional.scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt.graph import add_constant, arg, call, is_op, mutated_nodes, val
from fxopt.registry import register_pass
from fxopt.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

from .attention_match import (
    MATMULS,
    SOFTMAXES,
    constant_value,
    peel_scale,
    scalar_value,
    scores,
    swaps_last_two,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class Attention:
    """What SDPA needs, read off a matched hand-written attention."""

    query: fx.Node
    key: fx.Node  # the key as SDPA takes it, or kT when `key_is_transposed`
    key_is_transposed: bool
    value: fx.Node
    scale: float
    mask: fx.Node | torch.Tensor | None  # a graph tensor, or a boolean constant to add
    is_causal: bool
    nodes: tuple[fx.Node, ...]


def attention_output(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """`weights @ v` where the weights are a softmax, maybe through a dropout."""
    if not is_op(node, *MATMULS) or not is_op(node.args[0], *SOFTMAXES, aten.dropout):
        return None
    return (node.args[0], node)


def read_attention(gm: fx.GraphModule, root: fx.Node):
    """The `Attention` behind `root`, or a `decline` saying why not."""
    weights, value = root.args[:2]
    if is_op(weights, aten.dropout):
        if arg(weights, 2, "train", False):
            return decline("dropout on the attention weights runs in training mode")
        weights = single_input(weights)
        if weights is None or not is_op(weights, *SOFTMAXES):
            return decline("no softmax under the dropout")
    if len(weights.users) != 1:
        return decline("the attention weights have another user (attention maps returned)")
    logits, rank = weights.args[0], val(weights).dim()
    if weights.args[1] % rank != rank - 1:
        return decline("softmax is not over the key axis")
    if len(weights.args) > 2 and weights.args[2] not in (None, False):
        return decline("softmax casts its result")
    found = split_mask(gm, logits)
    if not found:
        return found if isinstance(found, Declined) else decline("the logits are not q @ kT")
    score_node, mask, is_causal = found
    return build_attention(gm, root, value, weights, score_node, mask, is_causal)


def single_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if len(node.args[0].users) == 1 else None


def split_mask(gm: fx.GraphModule, logits: fx.Node):
    """(scores, mask, is_causal) of `scores [+ mask | masked_fill(mask, -inf)]`."""
    if is_op(logits, aten.add) and len(logits.args) == 2 and not logits.kwargs:
        a, b = logits.args
        score, mask = (a, b) if scores(gm, a) is not None else (b, a)
        if not isinstance(mask, fx.Node) or not isinstance(val(mask), torch.Tensor):
            return None
        if val(mask).dtype != val(logits).dtype or not broadcasts(val(mask), val(logits)):
            return decline(
                "the additive mask does not broadcast to the scores or its dtype differs"
            )
        return score, mask, False
    if is_op(logits, aten.masked_fill):
        return boolean_mask(gm, logits)
    return logits, None, False


def boolean_mask(gm: fx.GraphModule, logits: fx.Node):
    score, mask_node, fill = logits.args[:3]
    if scalar_value(gm, fill) != float("-inf"):
        return decline("masked_fill writes a finite value, which SDPA cannot express")
    mask = constant_value(gm, mask_node)
    if mask is None or mask.dtype != torch.bool or not broadcasts(mask, val(logits)):
        return decline("the boolean mask is not a constant that broadcasts to the scores")
    rows, cols = val(logits).shape[-2:]
    causal = torch.ones(rows, cols, dtype=torch.bool).triu(1)
    if mask.shape[-2:] == (rows, cols) and bool((mask == causal).all()):
        return score, None, True
    if bool(mask.all(-1).any()):
        return decline("the boolean mask hides a whole row (softmax gives NaN there)")
    return score, ~mask, False


def broadcasts(mask: torch.Tensor, target: torch.Tensor) -> bool:
    if mask.dim() > target.dim():
        return False
    pairs = zip(reversed(mask.shape), reversed(target.shape), strict=False)
    return all(m == 1 or m == t for m, t in pairs)


def build_attention(gm, root, value, weights, score_node, mask, is_causal):
    s = scores(gm, score_node)
    if s is None or len(score_node.users) != 1:
        return decline("the scores are not scaled q @ kT with no other user")
    query, q_factor, q_chain = peel_scale(gm, s.query)
    key, k_factor, k_chain = peel_scale(gm, s.key_t)
    transposed = not swaps_last_two(key) or len(key.users) != 1
    if not transposed:
        k_chain = [*k_chain, key]
        key, more, chain = peel_scale(gm, key.args[0])
        k_factor, k_chain = k_factor * more, [*k_chain, *chain]
    tensors = [val(query), val(key), val(value)]
    if isinstance(mask, fx.Node):
        tensors.append(val(mask))
    if len({t.dtype for t in tensors}) != 1 or not tensors[0].is_floating_point():
        return decline("q, k, v and the mask differ in dtype")
    q, k, v = tensors[:3]
    if min(q.dim(), k.dim(), v.dim()) < 3:
        return decline("SDPA needs a batch dimension: q, k, v have rank < 3")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return decline("q, k and v differ in their batch dimensions")
    nodes = (*q_chain, *k_chain, s.matmul, *s.chain, score_node, weights, root)
    if set(nodes) & mutated_nodes(gm):
        return decline("a value of the attention is written in place")
    scale = s.scale * q_factor * k_factor
    return Attention(query, key, transposed, value, scale, mask, is_causal, nodes)


def can_canonicalize(match: Match):
    return read_attention(match.gm, match.root)


def canonicalize(match: Match) -> fx.Node:
    gm, att = match.gm, read_attention(match.gm, match.root)
    key = call(gm, aten.transpose.int, (att.key, -2, -1)) if att.key_is_transposed else att.key
    mask = att.mask
    if isinstance(mask, torch.Tensor):
        mask = add_constant(gm, mask, "attn_mask")
    kwargs = {"attn_mask": mask, "is_causal": att.is_causal, "scale": att.scale}
    args = (att.query, key, att.value)
    return call(gm, aten.scaled_dot_product_attention.default, args, kwargs)


RULES = [
    # softmax(q @ kT * s [+ mask]) @ v  =>  sdpa(q, k, v, attn_mask, is_causal, scale=s)
    Rule("softmax-attention", pattern=attention_output, check=can_canonicalize, build=canonicalize),
]


@register_pass("canonicalize_attention", exact=True)
def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
