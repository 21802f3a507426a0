import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.ir.errors import InputError
from fxopt.passes import linearize_attention as la
from fxopt.passes.linearize_attention import LinearizeSettings, linearize_attention
from fxopt.pipeline import output_error, run_passes
from fxopt.report import Report
from fxopt.testing import assert_equivalent, count_ops, graph_of
from fxopt.verify import input_sets

aten = torch.ops.aten


class Attention(nn.Module):
    """q, k, v of shape (B, heads, N, d) straight from the input: SDPA with the given flags."""

    def __init__(self, heads=2, **sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = x.reshape(b, n, 3, self.heads, c // 3 // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa)


def reference(x, heads, phi, eps=1e-6):
    """Linear attention written out independently of the pass."""
    b, n, c = x.shape
    q, k, v = x.reshape(b, n, 3, heads, c // 3 // heads).permute(2, 0, 3, 1, 4)
    q, k = phi(q), phi(k)
    numerator = torch.einsum("bhnd,bhde->bhne", q, torch.einsum("bhmd,bhme->bhde", k, v))
    return numerator / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2))[..., None] + eps)


def focused(x, p=3.0):
    r = F.relu(x)
    return r**p * r.norm(dim=-1, keepdim=True) / ((r**p).norm(dim=-1, keepdim=True) + 1e-12)


PHI = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "focused": focused}
PHI["learnable"] = PHI["elu"]  # the learned map starts at the identity


def tokens(n=256, channels=96, batch=2, seed=0):
    return torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", la.FEATURE_MAPS)
def test_linearize_attention_removes_sdpa_and_computes_linear_attention(name):
    net, x = Attention(heads=2).eval(), tokens()
    result = linearize_attention(graph_of(net, x), LinearizeSettings(feature_map=name))
    gm = result.graph_module
    assert result.applied == {"sdpa-linear": 1} and result.summary["feature map"] == name
    assert count_ops(gm, aten.scaled_dot_product_attention) == 0
    assert count_ops(gm, aten.matmul) == (4 if name == "learnable" else 2)
    learned = [t.shape for n, t in gm.named_buffers() if "calib_feature_map" in n]
    assert learned == ([(2, 16, 16)] * 2 if name == "learnable" else [])
    assert_equivalent(lambda x: reference(x, 2, PHI[name]), gm, (x,), rtol=1e-4)


def test_reported_error_is_the_measured_error():
    net, x = Attention(heads=4).eval(), tokens(n=512)
    report, original = Report("attention", "eager"), graph_of(net, x)
    gm = run_passes(graph_of(net, x), ["linearize_attention"], input_sets((x,)), report)
    (record,) = report.passes
    assert record.status == "applied" and not record.exact
    assert record.error["example"] == pytest.approx(output_error(original(x), gm(x)), rel=1e-6)
    assert record.error["example"]["rel_l2"] > 1e-3  # softmax is not linear attention
    assert record.summary == {"feature map": "elu", "attentions": 1}


def test_the_zoo_vit_is_too_short_for_linear_attention():
    model = fxopt.models.create("vit_bn_like").eval()
    (x,) = fxopt.models.example_inputs("vit_bn_like")
    result = linearize_attention(graph_of(model, x))
    assert not result.modified
    misses = result.declined["sdpa-linear"]
    assert len(misses) == 4 and all("cost model" in m for m in misses)  # 64 tokens, d = 16


@settings(max_examples=10, deadline=None)
@given(  # sizes where the cost model always takes the linear form
    heads=st.sampled_from([2, 4]),
    head_dim=st.sampled_from([8, 16]),
    n=st.integers(512, 1024),
    name=st.sampled_from(la.FEATURE_MAPS),
    seed=st.integers(0, 2**16),
)
def test_linearize_attention_matches_the_formula(heads, head_dim, n, name, seed):
    net, x = Attention(heads).eval(), tokens(n, 3 * heads * head_dim, seed=seed)
    result = linearize_attention(graph_of(net, x), LinearizeSettings(feature_map=name))
    assert result.modified
    assert_equivalent(lambda x: reference(x, heads, PHI[name]), result.graph_module, (x,), 1e-4)


def test_linearize_attention_is_idempotent():
    once = linearize_attention(graph_of(Attention().eval(), tokens())).graph_module
    again = linearize_attention(once)
    assert not again.modified and not again.declined


class Masked(nn.Module):
    def forward(self, x):
        q = x.reshape(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize(
    ("net", "x", "reason"),
    [
        (Attention(is_causal=True), tokens(), "causal"),
        (Masked(), tokens(), "mask"),
        (Attention(dropout_p=0.5), tokens(), "dropout"),
        (Attention(), tokens(n=16), "cost model"),
    ],
)
def test_linearize_attention_declines(net, x, reason):
    gm = graph_of(net.eval(), x)
    before = str(gm.graph)
    result = linearize_attention(gm)
    assert not result.modified and str(result.graph_module.graph) == before
    assert reason in result.declined["sdpa-linear"][0]


def test_options_reject_an_unknown_feature_map():
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearizeSettings(feature_map="softmax")
    with pytest.raises(InputError, match="linearize_attention.*feature_map must be one of"):
        fxopt.optimize(
            Attention().eval(),
            tokens(),
            passes=["linearize_attention"],
            approximate=True,
            options={"linearize_attention": {"feature_map": "softmax"}},
        )
