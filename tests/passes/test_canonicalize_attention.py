import math

import pytest
import torch
import torch.nn.functional as F
from helpers import qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.ir.graph import is_op
from fxopt.passes.canonicalize_attention import AttentionSettings, canonicalize_attention
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention
HAND_WRITTEN = (aten.softmax, aten._softmax, aten.matmul, aten.bmm)


class HandAttention(nn.Module):
    """softmax(q kT scale [+ mask]) v, with the scale and the key's transpose placed as told."""

    def __init__(self, scale_on="scores", transpose="transpose", mask=None, causal=False):
        super().__init__()
        self.scale_on, self.transpose, self.causal = scale_on, transpose, causal
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        scale = 1 / math.sqrt(q.shape[-1])
        if self.scale_on == "q":
            q = q * scale
        elif self.scale_on == "k":
            k = k * scale
        if self.transpose == "transpose":
            k_t = k.transpose(-2, -1)
        elif self.transpose == "mT":
            k_t = k.mT
        else:
            k_t = k.permute(*range(k.dim() - 2), k.dim() - 1, k.dim() - 2)
        scores = q @ k_t
        if self.scale_on == "scores":
            scores = scores / math.sqrt(q.shape[-1])
        if self.mask is not None:
            scores = scores + self.mask
        if self.causal:
            n = q.shape[-2]
            upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(upper, float("-inf"))
        return scores.softmax(dim=-1) @ v


class MultiHead(nn.Module):
    """(B, N, C) tokens, heads split by reshape + permute, hand-written attention, merged."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


def sdpa_node(gm):
    (node,) = [n for n in gm.graph.nodes if is_op(n, SDPA)]
    return node


# structural


@pytest.mark.parametrize("scale_on", ["scores", "q", "k"])
@pytest.mark.parametrize("transpose", ["transpose", "mT", "permute"])
def test_canonicalize_attention_turns_hand_written_attention_into_sdpa(scale_on, transpose):
    result = apply_pass(
        canonicalize_attention, HandAttention(scale_on, transpose), *qkv(2, 3, 10, 8)
    )
    gm = result.graph_module
    assert result.applied == {"softmax-attention": 1}
    assert count_ops(gm, SDPA) == 1 and count_ops(gm, *HAND_WRITTEN) == 0
    node = sdpa_node(gm)
    assert node.kwargs["scale"] == pytest.approx(8**-0.5) and not node.kwargs["is_causal"]
    assert all(a.op == "placeholder" for a in node.args[:3])  # the transpose and scaling are gone


def test_canonicalize_attention_passes_an_additive_mask_as_attn_mask_when_told_to():
    mask = torch.randn(10, 10)
    always = AttentionSettings(always=True)
    result = apply_pass(
        lambda gm: canonicalize_attention(gm, always), HandAttention(mask=mask), *qkv(2, 10, 8)
    )
    node = sdpa_node(result.graph_module)
    assert node.kwargs["attn_mask"] is not None and node.kwargs["attn_mask"].op == "get_attr"


def test_canonicalize_attention_declines_where_sdpa_is_slower_on_cpu():
    mask = torch.randn(10, 10)  # an additive float mask: SDPA's unfused path
    result = canonicalize_attention(graph_of(HandAttention(mask=mask), *qkv(2, 10, 8)))
    assert not result.modified
    assert any("additive float mask" in why for why in result.declined["softmax-attention"])
    q, k = qkv(2, 10, 8)[:2]
    v = torch.randn(2, 10, 16)  # the value head dim differs from the query's
    result = canonicalize_attention(graph_of(HandAttention(), q, k, v))
    assert not result.modified
    assert any("value head dim (16)" in why for why in result.declined["softmax-attention"])


def test_a_constant_mask_of_zeros_and_minus_inf_becomes_a_boolean_or_causal_mask():
    upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
    causal = torch.zeros(10, 10).masked_fill(upper, float("-inf"))
    node = sdpa_node(
        apply_pass(canonicalize_attention, HandAttention(mask=causal), *qkv(2, 10, 8)).graph_module
    )
    assert node.kwargs["is_causal"] and node.kwargs["attn_mask"] is None
    banded = torch.zeros(10, 10).masked_fill(
        upper.T & ~torch.eye(10, dtype=torch.bool), float("-inf")
    )
    node = sdpa_node(
        apply_pass(canonicalize_attention, HandAttention(mask=banded), *qkv(2, 10, 8)).graph_module
    )
    attn_mask = node.kwargs["attn_mask"]
    assert (
        attn_mask.op == "get_attr"
        and getattr(node.graph.owning_module, attn_mask.target).dtype == torch.bool
    )


def test_canonicalize_attention_turns_a_causal_masked_fill_into_is_causal():
    result = apply_pass(canonicalize_attention, HandAttention(causal=True), *qkv(2, 2, 12, 8))
    node = sdpa_node(result.graph_module)
    assert node.kwargs["is_causal"] and node.kwargs["attn_mask"] is None
    assert count_ops(result.graph_module, aten.masked_fill) == 0


def test_canonicalize_attention_handles_multi_head_reshapes_and_multihead_attention():
    result = apply_pass(canonicalize_attention, MultiHead(), torch.randn(2, 7, 32))
    assert result.applied == {"softmax-attention": 1}
    # nn.MultiheadAttention without weights already exports as SDPA: nothing to do
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    model = type("Mha", (nn.Module,), {"forward": lambda s, x: s.m(x, x, x, need_weights=False)})()
    model.m = mha
    gm = graph_of(model, torch.randn(2, 7, 32))
    assert count_ops(gm, SDPA) == 1 and not canonicalize_attention(gm).modified


# numerical


@pytest.mark.parametrize("name", ["vit_deit_like", "token_softmax_attention"])
def test_canonicalize_attention_keeps_zoo_models_equal_to_eager(name):
    model = fxopt.models.create(name)
    result = apply_pass(canonicalize_attention, model, *fxopt.models.example_inputs(name, 2))
    assert result.applied == {"softmax-attention": 2}
    assert count_ops(result.graph_module, aten.softmax) == 0


# property


SHAPES = dict(
    batch=st.integers(1, 3),
    heads=st.sampled_from([None, 1, 3]),
    tokens=st.integers(1, 40),
    dim=st.sampled_from([4, 16, 48]),
    causal=st.booleans(),
    scale_on=st.sampled_from(["scores", "q", "k"]),
    seed=st.integers(0, 2**16),
)


def assert_sdpa_matches_eager(batch, heads, tokens, dim, causal, scale_on, seed):
    """N below and above d, 3-D and 4-D layouts; SDPA's summation order stays within the
    fp32 tolerance of the hand-written form."""
    torch.manual_seed(seed)
    shape = (batch, tokens, dim) if heads is None else (batch, heads, tokens, dim)
    result = apply_pass(
        canonicalize_attention, HandAttention(scale_on, causal=causal), *qkv(*shape)
    )
    assert result.applied == {"softmax-attention": 1}


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_canonicalize_attention_matches_eager_on_any_shape(**shape):
    assert_sdpa_matches_eager(**shape)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(**SHAPES)
def test_canonicalize_attention_matches_eager_on_many_shapes(**shape):
    assert_sdpa_matches_eager(**shape)


# idempotence


def test_canonicalize_attention_is_idempotent():
    gm = canonicalize_attention(graph_of(MultiHead(), torch.randn(2, 7, 32))).graph_module
    code = gm.code
    again = canonicalize_attention(gm)
    assert not again.modified and again.graph_module.code == code


# declines


class Variant(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.5
        if self.kind == "train-dropout":
            return F.dropout(scores.softmax(-1), 0.1, training=True) @ v
        if self.kind == "query-axis":
            return scores.softmax(dim=-2) @ v
        if self.kind == "weights-returned":
            weights = scores.softmax(-1)
            return weights @ v, weights
        if self.kind == "scores-returned":
            return scores.softmax(-1) @ v, scores
        if self.kind == "finite-fill":
            upper = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(1)
            return scores.masked_fill(upper, -1e4).softmax(-1) @ v
        if self.kind == "row-masked":
            mask = torch.zeros(q.shape[-2], q.shape[-2], dtype=torch.bool)
            mask[0] = True
            return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        if self.kind == "half-mask":
            return (scores + torch.zeros(q.shape[-2], q.shape[-2], dtype=torch.float16)).softmax(
                -1
            ) @ v
        if self.kind == "scale-over-mask":
            return ((q @ k.transpose(-2, -1) + torch.ones(1)) * 0.5).softmax(-1) @ v
        if self.kind == "no-softmax":
            return scores @ v
        raise ValueError(self.kind)


@pytest.mark.parametrize(
    "kind",
    [
        "train-dropout",
        "query-axis",
        "weights-returned",
        "scores-returned",
        "finite-fill",
        "row-masked",
        "half-mask",
        "scale-over-mask",
        "no-softmax",
    ],
)
def test_canonicalize_attention_declines_what_sdpa_cannot_express(kind):
    assert_declines(canonicalize_attention, Variant(kind), *qkv(2, 6, 4))


def test_canonicalize_attention_declines_multihead_attention_that_returns_its_weights():
    model = type("Mha", (nn.Module,), {"forward": lambda s, x: s.m(x, x, x)})()
    model.m = nn.MultiheadAttention(32, 4, batch_first=True)
    gm = graph_of(model, torch.randn(2, 7, 32))
    result = canonicalize_attention(gm)
    assert not result.modified
    assert any("another user" in miss for miss in result.declined["softmax-attention"])


def test_canonicalize_attention_declines_unbatched_inputs():
    assert_declines(canonicalize_attention, HandAttention(), *qkv(6, 4))
