"""reassociate_linear_attention: (Q KT) V and (Q KT) 1  =>  Q (KT V) and Q (KT 1), or chunked.

Q and KT are whatever produced them (phi(Q), phi(K)T with ReLU, elu + 1, ...): the pass needs
only the matmul structure and that nothing but constant scalings sits on the N x M scores. Every
user of the scores must be `scores @ V` or the normalizer `scores.sum(-1, keepdim)`; they become
`Q @ (KT @ V)` and `Q @ KT.sum(-1, keepdim=True)`: O(N M d) => O((N + M) d e).
Causal scores (`tril()`, `* tril_mask`, `masked_fill(upper_mask, 0)`, the mask a constant or
built from constants) become the exact chunked form (Lightning Attention-2): the sequence is
zero-padded to chunks of C = 64, each chunk attends to itself through the C x C masked scores,
and to every earlier chunk through the state sum KT_j V_j over earlier chunks, an exclusive
cumsum over the chunk axis (a batched form, no loop). The normalizer rides along as a column of
ones appended to V. O(N^2 d) => O(N C d + N d e), memory O(N d e / C).
Exact: yes, up to summation order: matrix products are associative and a lower-triangular mask
splits into the diagonal blocks plus the full blocks below them; padded keys are zero.
Declines when: a softmax or any other non-linearity sits on the scores (softmax attention is
never reassociated: softmax does not distribute over the product), the scores have a user that
is neither form, the mask is not the lower triangle (decay masks are not recognised), a causal
length is symbolic or the scores are not square, Q, KT or V is a constant (a product of weights,
not attention), a value is written in place, or the cost model prices the rewrite above the
original.
Cost rule: `fxopt.cost.roofline` of the original calls (the N x M scores, mask, scalings and
users, at traced shapes) against the roofline of the calls the rewrite creates. With d = e = 64,
one head, one CPU thread: the model reassociates plain attention from N of about 80 (measured
crossover about 100: 0.95x at N = 64, 1.09x at 128, 6.6x at 1024) and chunks causal attention
from about 290 (measured about 300: 0.89x at 256, 2.0x at 512, 8.9x at 1024); the table is in
tests/passes/test_reassociate_linear_attention.py.
Reference: Katharopoulos et al. 2020 (linear transformers); Qin et al. 2024 (Lightning
Attention-2); Yang et al. 2024 (GLA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from fxopt.analysis.attention_match import (
    MATMULS,
    SOFTMAXES,
    causal_mask_input,
    is_constant,
    is_tensor_node,
    matmul_values,
    peel_scale,
    reads_scores,
    scores,
)
from fxopt.analysis.cost import Cost, hinted, node_roofline, roofline
from fxopt.ir.graph import add_constant, arg, call, erase_dead, is_op, mutated_nodes, val
from fxopt.rules.registry import register_pass
from fxopt.rules.rewrite import Match, PassResult, Rule, decline, rewrite

aten = torch.ops.aten
CHUNK = 64
CHUNK_SCORES = "fxopt_chunk_scores"  # meta key of the in-chunk scores the chunked form creates


@dataclass(frozen=True)
class LinearAttention:
    """`scale * mask(query @ key_t)` and the users that read it."""

    query: fx.Node
    key_t: fx.Node
    scale: float
    causal: bool
    users: tuple[fx.Node, ...]
    nodes: tuple[fx.Node, ...]  # everything the rewrite makes dead


def read_linear_attention(gm: fx.GraphModule, top: fx.Node):
    """The linear attention whose scores are `top`, a `decline`, or None when `top` is not
    scores at all."""
    users = tuple(top.users)
    if not users or not all(reads_scores(u, top) for u in users):
        return None
    base, factor, chain = peel_scale(gm, top)
    masked_input = causal_mask_input(gm, base)
    if masked_input is not None:
        if base is not top and len(base.users) != 1:
            return None
        chain, base = [*chain, base], masked_input
    if base is not top and len(base.users) != 1:
        return None
    s = scores(gm, base)
    if s is None or any(is_constant(n) for n in (s.query, s.key_t, *matmul_values(users))):
        return None
    causal = masked_input is not None
    nodes = tuple(dict.fromkeys((*users, top, *chain, *s.chain, s.matmul)))
    if set(nodes) & mutated_nodes(gm):
        return decline("a value of the attention is written in place")
    if causal and not isinstance(val(s.query).shape[-2], int):
        return decline("a causal sequence length is symbolic")
    return LinearAttention(s.query, s.key_t, factor * s.scale, causal, users, nodes)


def batch_size(node: fx.Node) -> int:
    return math.prod(hinted(val(node).shape[:-2]))


def call_cost(flops: int, *element_counts: int) -> float:
    return roofline(Cost(flops, 4 * sum(element_counts)))


def reassociated_cost(att: LinearAttention) -> float:
    """The roofline of the calls the rewrite creates, before they exist."""
    out = att.users[0]
    batch = batch_size(out)
    n, d = hinted(val(att.query).shape[-2:])
    m = hinted(val(att.key_t).shape)[-1]
    widths = [hinted(val(u.args[1]).shape)[-1] if is_op(u, *MATMULS) else 1 for u in att.users]
    if not att.causal:
        return sum(
            call_cost(2 * batch * d * m * e, batch * (d * m + m * e + d * e))
            + call_cost(2 * batch * n * d * e, batch * (n * d + d * e + n * e))
            for e in widths
        )
    e = sum(widths)
    chunk = min(CHUNK, n)
    blocks = math.ceil(n / chunk)
    padded = blocks * chunk
    intra = call_cost(2 * batch * padded * chunk * (d + e), batch * padded * (2 * chunk + d + e))
    states = call_cost(2 * batch * padded * d * e, batch * (padded * (d + e) + blocks * d * e))
    prefix = 3 * call_cost(batch * blocks * d * e, 2 * batch * blocks * d * e)
    inter = call_cost(2 * batch * padded * d * e, batch * (padded * (d + e) + blocks * d * e))
    views = 10 * call_cost(0, batch * padded * (d + e))  # pads, adds, slices
    return intra + states + prefix + inter + views


def original_cost(att: LinearAttention) -> float:
    return sum(node_roofline(node) for node in att.nodes)


def can_reassociate(gm: fx.GraphModule, top: fx.Node):
    att = read_linear_attention(gm, top)
    if not att:
        return att
    if reassociated_cost(att) > original_cost(att):
        kind = "causal chunked" if att.causal else "reassociated"
        return decline(f"the {kind} form is costlier at this length (cost model)")
    return att


def reassociate(gm: fx.GraphModule, att: LinearAttention) -> None:
    """Insert the reassociated form before the first user and redirect every user to it."""
    first = min(att.users, key=lambda u: list(gm.graph.nodes).index(u))
    with gm.graph.inserting_before(first):
        for user, new in zip(att.users, replacements(gm, att), strict=True):
            user.replace_all_uses_with(new)
    for user in att.users:
        erase_dead(gm, user)


def replacements(gm: fx.GraphModule, att: LinearAttention) -> list[fx.Node]:
    if not att.causal:
        return [plain(gm, att, user) for user in att.users]
    return chunked_users(gm, att)


def plain(gm: fx.GraphModule, att: LinearAttention, user: fx.Node) -> fx.Node:
    """Q @ (KT @ V) or Q @ KT.sum(-1, keepdim=True), scaled on the d x e state."""
    if is_op(user, *MATMULS):
        state = call(gm, aten.matmul.default, (att.key_t, user.args[1]))
    else:
        state = call(gm, aten.sum.dim_IntList, (att.key_t, [-1], True))
    if att.scale != 1.0:
        state = call(gm, aten.mul.Tensor, (state, att.scale))
    out = call(gm, aten.matmul.default, (att.query, state))
    return out if is_op(user, *MATMULS) or arg(user, 2, "keepdim", False) else squeeze(gm, out)


def squeeze(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    return call(gm, aten.squeeze.dim, (node, -1))


def chunked_users(gm: fx.GraphModule, att: LinearAttention) -> list[fx.Node]:
    """Each `scores @ V` chunked; the normalizers read a ones column appended to one V."""
    matmuls = [u for u in att.users if is_op(u, *MATMULS)]
    sums = [u for u in att.users if not is_op(u, *MATMULS)]
    results: dict[fx.Node, fx.Node] = {}
    for i, user in enumerate(matmuls):
        value, width = user.args[1], val(user.args[1]).shape[-1]
        if i == 0 and sums:
            value = call(gm, aten.constant_pad_nd.default, (value, [0, 1], 1.0))
        out = chunked(gm, att, value)
        if i == 0 and sums:
            results[user] = call(gm, aten.slice.Tensor, (out, -1, 0, width))
            ones = call(gm, aten.slice.Tensor, (out, -1, width, width + 1))
            results.update({s: ones for s in sums})
        else:
            results[user] = out
    if not matmuls:
        n = val(att.query).shape[-2]
        ones = add_constant(gm, torch.ones(n, 1, dtype=val(att.query).dtype), "ones")
        out = chunked(gm, att, ones)
        results.update({s: out for s in sums})
    return [
        squeeze(gm, results[u]) if u in sums and not arg(u, 2, "keepdim", False) else results[u]
        for u in att.users
    ]


def chunked(gm: fx.GraphModule, att: LinearAttention, value: fx.Node) -> fx.Node:
    """scale * tril(Q KT) V in chunks: masked in-chunk scores plus the earlier chunks' state."""
    n = val(att.query).shape[-2]
    size = min(CHUNK, n)
    blocks = math.ceil(n / size)
    pad = blocks * size - n
    q, key_t = att.query, att.key_t
    if pad:
        q = call(gm, aten.constant_pad_nd.default, (q, [0, 0, 0, pad]))
        key_t = call(gm, aten.constant_pad_nd.default, (key_t, [0, pad]))
        value = call(gm, aten.constant_pad_nd.default, (value, [0, 0, 0, pad]))
    q_chunks = call(gm, aten.unflatten.int, (q, -2, [blocks, size]))
    k_chunks = call(gm, aten.unflatten.int, (key_t, -1, [blocks, size]))
    k_chunks = call(gm, aten.transpose.int, (k_chunks, -3, -2))
    v_chunks = call(gm, aten.unflatten.int, (value, -2, [blocks, size]))
    lower = torch.ones(size, size, dtype=val(q).dtype).tril()
    scores_in_chunk = call(gm, aten.matmul.default, (q_chunks, k_chunks))
    local = call(
        gm, aten.mul.Tensor, (scores_in_chunk, add_constant(gm, lower, "causal_chunk_mask"))
    )
    for node in (scores_in_chunk, local):  # already the chunked form: not scores to rewrite
        node.meta[CHUNK_SCORES] = True
    intra = call(gm, aten.matmul.default, (local, v_chunks))
    states = call(gm, aten.matmul.default, (k_chunks, v_chunks))
    prefix = call(gm, aten.cumsum.default, (states, -3))
    earlier = call(gm, aten.constant_pad_nd.default, (prefix, [0, 0, 0, 0, 1, 0]))
    earlier = call(gm, aten.slice.Tensor, (earlier, -3, 0, blocks))
    inter = call(gm, aten.matmul.default, (q_chunks, earlier))
    out = call(gm, aten.add.Tensor, (intra, inter))
    out = call(gm, aten.flatten.using_ints, (out, -3, -2))
    if pad:
        out = call(gm, aten.slice.Tensor, (out, -2, 0, n))
    return call(gm, aten.mul.Tensor, (out, att.scale)) if att.scale != 1.0 else out


def linear_attention_scores(node: fx.Node) -> tuple[fx.Node] | None:
    """Pattern: scores that linear attention reads (`read_linear_attention` finds it or says
    why not), or a softmax on scores (never reassociated, but a near-miss worth listing)."""
    if node.op != "call_function" or not is_tensor_node(node) or node.meta.get(CHUNK_SCORES):
        return None
    gm = node.graph.owning_module
    if read_linear_attention(gm, node) is not None:
        return (node,)
    return (node,) if is_op(node, *SOFTMAXES) and scores(gm, node.args[0]) else None


def can_reassociate_scores(match: Match):
    """The `LinearAttention` to reassociate, or a `decline`."""
    verdict = can_reassociate(match.gm, match.root)
    if verdict is None:  # the pattern matched a softmax on the scores
        return decline("softmax on the scores: softmax attention is not reassociable")
    return verdict


def reassociate_scores(match: Match) -> fx.Node:
    """Redirect the scores' users to the reassociated form; the scores then go (the root is
    returned as its own replacement: nothing reads it any more)."""
    reassociate(match.gm, match.plan)
    return match.root


RULES = [
    # (Q KT) V, (Q KT) 1  =>  Q (KT V), Q (KT 1); causal: chunked (Lightning Attention-2)
    Rule(
        "linear-attention",
        pattern=linear_attention_scores,
        check=can_reassociate_scores,
        build=reassociate_scores,
    ),
]


@register_pass("reassociate_linear_attention", exact=True)
def reassociate_linear_attention(gm: fx.GraphModule) -> PassResult:
    return rewrite(gm, RULES)
