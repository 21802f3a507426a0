"""Crossover, measured on one CPU thread with d = e = 64, one head, batch 1, plain scores-first
graph against the rewritten graph (medians, ratio = plain / rewritten):

    N           16    32    64   128   256   512  1024  2048  4096
    plain      0.92  0.93  0.95  1.09  1.52  3.02  6.63  27.5   105
    causal     0.58  0.58  0.58  0.63  0.89  2.00  8.91  18.4  28.9

So plain attention reassociates profitably from N of about 100 and the causal chunked form
from about 300. The cost model flips between 64 and 96 (plain) and between 256 and 320
(causal): within a factor of 2 of the measurements, as the tests below check.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
import fxopt.passes.reassociate_linear_attention as module
from fxopt.ir.graph import val
from fxopt.passes.reassociate_linear_attention import reassociate_linear_attention
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
FEATURES = {
    "relu": F.relu,
    "elu+1": lambda x: F.elu(x) + 1,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class LinearAttention(nn.Module):
    """(phi(q) phi(k)T [* scale] [masked]) v / (same).sum(-1), written scores-first."""

    def __init__(self, feature="relu", mask=None, normalize=True, scale=0.125):
        super().__init__()
        self.phi, self.mask, self.normalize, self.scale = FEATURES[feature], mask, normalize, scale

    def forward(self, q, k, v):
        scores = self.phi(q) @ self.phi(k).transpose(-2, -1)
        if self.scale is not None:
            scores = scores * self.scale
        n = q.shape[-2]
        if self.mask == "tril":
            scores = scores.tril()
        elif self.mask == "multiply":
            scores = scores * torch.ones(n, n).tril()
        elif self.mask == "masked_fill":
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), 0.0)
        out = scores @ v
        return out / (scores.sum(-1, keepdim=True) + 1e-6) if self.normalize else out


def quadratic_values(gm, n):
    """Nodes holding an N x N matrix (the scores) at the end of their shape."""
    return [
        node
        for node in gm.graph.nodes
        if isinstance(val(node), torch.Tensor) and tuple(val(node).shape[-2:]) == (n, n)
    ]


def always_cheaper():
    return mock.patch.object(module, "reassociated_cost", lambda attention: 0.0)


# structural


def test_reassociate_linear_attention_removes_the_n_by_n_scores():
    result = apply_pass(reassociate_linear_attention, LinearAttention(), *qkv(2, 2, 512, 64))
    gm = result.graph_module
    assert result.applied == {"linear-attention": 1}
    assert quadratic_values(gm, 512) == []
    assert count_ops(gm, aten.matmul) == 3  # KT V, Q (KT V), Q (KT 1)


@pytest.mark.parametrize("mask", ["tril", "multiply", "masked_fill"])
def test_reassociate_linear_attention_chunks_causal_attention(mask):
    result = apply_pass(reassociate_linear_attention, LinearAttention(mask=mask), *qkv(1, 1000, 64))
    gm = result.graph_module
    assert result.applied == {"linear-attention": 1}
    assert count_ops(gm, aten.cumsum) == 1 and quadratic_values(gm, 1000) == []
    assert count_ops(gm, aten.tril, aten.masked_fill) == 0


# numerical


@pytest.mark.parametrize(("name", "fired"), [("linear_attention_vit", 2), ("gla_like_block", 1)])
def test_reassociate_linear_attention_keeps_zoo_models_equal_to_eager(name, fired):
    x = fxopt.models.example_inputs(name, 2, shape=(320, 64))
    result = apply_pass(reassociate_linear_attention, fxopt.models.create(name), *x)
    assert result.applied == {"linear-attention": fired}
    assert quadratic_values(result.graph_module, 320) == []


# property


SHAPES = dict(
    batch=st.integers(1, 2),
    heads=st.sampled_from([None, 1, 2]),
    tokens=st.integers(1, 150),
    dim=st.sampled_from([4, 16, 64]),
    mask=st.sampled_from([None, "tril", "masked_fill"]),
    feature=st.sampled_from(sorted(FEATURES)),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)


def assert_reassociated_matches_eager(batch, heads, tokens, dim, mask, feature, normalize, seed):
    """N below and above d, chunk-aligned or padded; the cost gate is lifted so every shape
    is rewritten. A signed feature map (identity) is drawn without the normalizer: dividing by
    a sum of signed scores is ill-conditioned in both forms alike."""
    normalize = normalize and feature != "identity"
    torch.manual_seed(seed)
    shape = (batch, tokens, dim) if heads is None else (batch, heads, tokens, dim)
    model = LinearAttention(feature, mask, normalize)
    with always_cheaper():
        result = apply_pass(reassociate_linear_attention, model, *qkv(*shape))
    assert result.applied == {"linear-attention": 1}


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_reassociate_linear_attention_matches_eager_on_any_shape(**shape):
    assert_reassociated_matches_eager(**shape)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(**SHAPES)
def test_reassociate_linear_attention_matches_eager_on_many_shapes(**shape):
    assert_reassociated_matches_eager(**shape)


# idempotence


@pytest.mark.parametrize("mask", [None, "tril"])
def test_reassociate_linear_attention_is_idempotent(mask):
    gm = graph_of(LinearAttention(mask=mask), *qkv(1, 512, 64))
    gm = reassociate_linear_attention(gm).graph_module
    code = gm.code
    again = reassociate_linear_attention(gm)
    assert not again.modified and again.graph_module.code == code


# declines


class Variant(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        scores = F.relu(q) @ F.relu(k).transpose(-2, -1)
        if self.kind == "softmax":  # a negative control: softmax attention never reassociates
            return scores.softmax(-1) @ v
        if self.kind == "exp":
            return scores.exp() @ v
        if self.kind == "scores-returned":
            return scores @ v, scores
        if self.kind == "upper":
            return scores.triu() @ v
        if self.kind == "decay":
            n = q.shape[-2]
            decay = torch.arange(n).view(n, 1) - torch.arange(n).view(1, n)
            return (scores * (0.9 ** decay.clamp(min=0)).tril()) @ v
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind", ["softmax", "exp", "scores-returned", "upper", "decay"])
def test_reassociate_linear_attention_declines_non_linear_or_shared_scores(kind):
    with always_cheaper():
        assert_declines(reassociate_linear_attention, Variant(kind), *qkv(1, 300, 64))


def test_reassociate_linear_attention_never_touches_softmax_attention_in_the_zoo():
    model = fxopt.models.create("token_softmax_attention")
    x = fxopt.models.example_inputs("token_softmax_attention", 1, shape=(2048, 64))
    with always_cheaper():
        assert_declines(reassociate_linear_attention, model, *x)
        result = reassociate_linear_attention(graph_of(model, *x))
    misses = result.declined["linear-attention"]
    assert len(misses) == 2 and all("softmax attention is not reassociable" in m for m in misses)


@pytest.mark.parametrize(
    ("mask", "short", "long"), [(None, 64, 128), ("tril", 256, 512)], ids=["plain", "causal"]
)
def test_reassociate_linear_attention_declines_below_the_measured_crossover(mask, short, long):
    """The cost model's crossover sits within a factor of 2 of the measured one (module
    docstring, measured without a scale): it declines at `short` and rewrites at `long`."""
    model = LinearAttention(mask=mask, scale=None)
    gm = graph_of(model, *qkv(1, short, 64))
    result = reassociate_linear_attention(gm)
    assert not result.modified
    assert "costlier" in result.declined["linear-attention"][0]
    assert reassociate_linear_attention(graph_of(model, *qkv(1, long, 64))).modified
