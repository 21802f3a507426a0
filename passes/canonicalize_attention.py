"""canonicalize_attention: softmax(q @ kT * scale [+ mask]) @ v  =>  scaled_dot_product_attention.

Matches hand-written attention in any layout: (B, N, d) or (B, H, N, d) with whatever
reshapes and permutes produced q, k and v; the key transposed by transpose, permute, mT or t (or
not at all: a new transpose feeds SDPA); constant scalings on q, on k, or on the scores (x s,
/ sqrt(d)) multiplied into SDPA's explicit `scale`. An additive float mask becomes `attn_mask`;
`masked_fill(mask, -inf)` with a boolean mask becomes `is_causal=True` when the mask is the
constant strict upper triangle, else `attn_mask = ~mask`. Eval-mode dropout on the weights is
dropped. `nn.MultiheadAttention(need_weights=False)` already exports as SDPA; with
`need_weights=True` its weights are returned, and the pass declines.
A row the mask hides entirely gives NaN in softmax but zeros in SDPA: a constant mask is checked
here (the pass declines if it hides a row), and a mask known only at run time (an input, a
key-padding mask) gets those rows set to NaN after SDPA, as the hand-written form gives them.
Exact: yes, up to summation order: SDPA computes the same softmax(q kT scale + mask) v, and
fully masked rows are NaN on both sides (for finite scores). Measured
on CPU fp32 against the hand-written form: max error below 1e-6 relative to the output's scale
(tests/passes/test_canonicalize_attention.py, tests/reliability/test_dynamo_attention_cli.py).
Declines when: the mask is an additive float mask, or the value head dim differs from the
query's (SDPA is slower than the hand-written form on CPU there; the ``always`` setting
rewrites them too); dropout runs in training mode; softmax is not over the last axis or casts; a
score, logit or weight has another user (attention maps returned); the scaling sits on top of
the mask; a constant mask hides a whole row, or holds +inf or NaN (softmax gives NaN there, SDPA
may not), or reads no input yet cannot be evaluated (written in place), or masked_fill writes a
finite value; the mask does not broadcast to the scores;
q, k, v or the mask differ in dtype, or their batch dimensions differ, or they have rank < 3.
Reference: Vaswani et al. 2017; torch.nn.functional.scaled_dot_product_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.attention_match import (
    MATMULS,
    SOFTMAXES,
    constant_value,
    peel_scale,
    reads_input,
    scalar_value,
    scores,
    swaps_last_two,
)
from fxopt.ir.graph import add_constant, arg, call, is_op, mutated_nodes, val
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Declined, Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten

# On CPU (torch 2.14, fp32, one thread) SDPA takes its unfused path when given an additive float
# mask or a value head dim that differs from the query's, and is then 1.4-1.9x slower than the
# hand-written form (LeViT-128S's attention, 4 heads of 196 tokens, q/k dim 16, v dim 32: 0.60
# ms against 0.35 ms); with neither it is 1.1-2x faster. The pass declines those two forms
# unless ``always`` is set (``options={"canonicalize_attention": {"always": True}}``), for a
# target whose fused kernels take them (a GPU).


@dataclass(frozen=True)
class AttentionSettings:
    """`always`: rewrite the forms SDPA runs slower on CPU too."""

    always: bool = False


DEFAULT = AttentionSettings()


@dataclass(frozen=True)
class Attention:
    """What SDPA needs, read off a matched hand-written attention."""

    query: fx.Node
    key: fx.Node  # the key as SDPA takes it, or kT when `key_is_transposed`
    key_is_transposed: bool
    value: fx.Node
    scale: float
    mask: fx.Node | torch.Tensor | None  # a graph tensor (boolean: True hides), or an SDPA constant
    is_causal: bool
    run_time_mask: fx.Node | None  # a mask only known at run time: its fully hidden rows get NaN
    nodes: tuple[fx.Node, ...]


def attention_output(node: fx.Node) -> tuple[fx.Node, ...] | None:
    """`weights @ v` where the weights are a softmax, maybe through a dropout."""
    if not is_op(node, *MATMULS) or not is_op(node.args[0], *SOFTMAXES, aten.dropout):
        return None
    return (node.args[0], node)


def read_attention(gm: fx.GraphModule, root: fx.Node, always: bool):
    """The `Attention` behind `root`, or a `decline` saying why not (also where SDPA is slower on
    CPU, unless `always`)."""
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
    return build_attention(gm, root, value, weights, score_node, mask, is_causal, always)


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
        known = constant_value(gm, mask)
        if known is not None and known.numel() and not torch.isfinite(known.amax(-1)).all():
            return decline("the additive mask hides a whole row, or holds +inf or NaN (NaN there)")
        if known is not None and bool(((known == 0) | (known == float("-inf"))).all()):
            return constant_boolean(score, known == float("-inf"), val(logits))
        return score, mask, False
    if is_op(logits, aten.masked_fill):
        return boolean_mask(gm, logits)
    return logits, None, False


def boolean_mask(gm: fx.GraphModule, logits: fx.Node):
    score, mask_node, fill = logits.args[:3]
    if scalar_value(gm, fill) != float("-inf"):
        return decline("masked_fill writes a finite value, which SDPA cannot express")
    mask = constant_value(gm, mask_node)
    if mask is None and isinstance(val(mask_node), torch.Tensor):
        if val(mask_node).dtype == torch.bool and broadcasts(val(mask_node), val(logits)):
            return score, mask_node, False  # a run-time mask: SDPA's result is patched
    if mask is None or mask.dtype != torch.bool or not broadcasts(mask, val(logits)):
        return decline("the boolean mask does not broadcast to the scores")
    return constant_boolean(score, mask, val(logits))


def constant_boolean(score: fx.Node, mask: torch.Tensor, logits: torch.Tensor):
    """(scores, mask, is_causal) for a constant boolean mask (True hides), which may also come
    from an additive mask of zeros and -inf."""
    rows, cols = logits.shape[-2:]
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


def build_attention(gm, root, value, weights, score_node, mask, is_causal, always):
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
    if isinstance(mask, fx.Node) and val(mask).dtype != torch.bool:
        tensors.append(val(mask))
    if len({t.dtype for t in tensors}) != 1 or not tensors[0].is_floating_point():
        return decline("q, k, v and the mask differ in dtype")
    q, k, v = tensors[:3]
    if min(q.dim(), k.dim(), v.dim()) < 3:
        return decline("SDPA needs a batch dimension: q, k, v have rank < 3")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return decline("q, k and v differ in their batch dimensions")
    slower = slower_on_cpu(q, v, mask)
    if slower and not always:
        return decline(slower)
    nodes = (*q_chain, *k_chain, s.matmul, *s.chain, score_node, weights, root)
    if set(nodes) & mutated_nodes(gm):
        return decline("a value of the attention is written in place")
    scale = s.scale * q_factor * k_factor
    run_time = mask if isinstance(mask, fx.Node) and constant_value(gm, mask) is None else None
    if run_time is not None and not reads_input(run_time):
        return decline("the mask reads no input but cannot be evaluated now (written in place)")
    return Attention(query, key, transposed, value, scale, mask, is_causal, run_time, nodes)


def slower_on_cpu(q: torch.Tensor, v: torch.Tensor, mask) -> str | None:
    """Why SDPA would be slower on CPU than the hand-written form (see `AttentionSettings`), or
    None."""
    if v.shape[-1] != q.shape[-1]:
        return (
            f"the value head dim ({v.shape[-1]}) differs from the query's ({q.shape[-1]}): "
            "SDPA on CPU takes its unfused path, slower than this form"
        )
    dtype = val(mask).dtype if isinstance(mask, fx.Node) else getattr(mask, "dtype", torch.bool)
    if dtype != torch.bool:
        return "an additive float mask: SDPA on CPU takes its unfused path, slower than this form"
    return None


def can_canonicalize(match: Match, always: bool = False):
    """The `Attention` to write as one SDPA call, or a `decline`."""
    return read_attention(match.gm, match.root, always)


def canonicalize(match: Match) -> fx.Node:
    gm, att = match.gm, match.plan
    key = call(gm, aten.transpose.int, (att.key, -2, -1)) if att.key_is_transposed else att.key
    mask = None if att.mask is None else sdpa_mask(gm, att.mask)
    kwargs = {"attn_mask": mask, "is_causal": att.is_causal, "scale": att.scale}
    args = (att.query, key, att.value)
    out = call(gm, aten.scaled_dot_product_attention.default, args, kwargs)
    return out if att.run_time_mask is None else nan_where_hidden(gm, out, att.run_time_mask)


def sdpa_mask(gm: fx.GraphModule, mask: fx.Node | torch.Tensor) -> fx.Node:
    """The mask as SDPA takes it: True or a float bias where a key is seen, rank >= 2."""
    if isinstance(mask, torch.Tensor):
        return add_constant(gm, mask.reshape(*[1] * (2 - mask.dim()), *mask.shape), "attn_mask")
    if val(mask).dtype == torch.bool:
        mask = call(gm, aten.logical_not.default, (mask,))
    for _ in range(2 - val(mask).dim()):
        mask = call(gm, aten.unsqueeze.default, (mask, 0))
    return mask


def nan_where_hidden(gm: fx.GraphModule, out: fx.Node, mask: fx.Node) -> fx.Node:
    """`out` with NaN in the rows where softmax gives NaN: a boolean mask hides the whole row,
    or a float mask's row maximum is not finite (all -inf, or +inf or NaN in it)."""
    if val(mask).dtype == torch.bool:
        hidden = call(gm, aten.all.dim, (mask, -1, True))
    else:
        top = call(gm, aten.amax.default, (mask, [-1], True))
        hidden = call(gm, aten.logical_not.default, (call(gm, aten.isfinite.default, (top,)),))
    return call(gm, aten.where.ScalarSelf, (hidden, float("nan"), out))


def rules(settings: AttentionSettings = DEFAULT) -> list[Rule]:
    return [
        # softmax(q @ kT * s [+ mask]) @ v  =>  sdpa(q, k, v, attn_mask, is_causal, scale=s)
        Rule(
            "softmax-attention",
            pattern=attention_output,
            check=lambda m: can_canonicalize(m, settings.always),
            build=canonicalize,
        ),
    ]


RULES = rules()


@register_pass("canonicalize_attention", exact=True, settings=AttentionSettings)
def canonicalize_attention(gm: fx.GraphModule, settings: AttentionSettings = DEFAULT) -> PassResult:
    return rewrite(gm, rules(settings))
