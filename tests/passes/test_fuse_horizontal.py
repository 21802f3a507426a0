import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.cost import linear_cost, static_cost
from fxopt.passes.fuse_horizontal import fuse_horizontal
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d)
ZOO = ("inceptionnext_atto_like", "vit_adapter_net")


class SeparateQKVAttention(nn.Module):
    """ViT self-attention with separate q, k and v projections."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape

        def heads(t):
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Siblings(nn.Module):
    """Every op reads x; `views[i]` flattens output i with `view` (impossible on a column
    block of a wider output) instead of returning it as it is."""

    def __init__(self, ops, views=None):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.views = views or [False] * len(ops)

    def forward(self, x):
        outs = [op(x) for op in self.ops]
        return tuple(
            o.view(o.shape[0], -1) if v else o for o, v in zip(outs, self.views, strict=True)
        )


def tokens(batch=2, count=5, dim=16):
    return torch.randn(batch, count, dim)


# structural and numerical


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_fuse_horizontal_turns_separate_q_k_v_projections_into_one_qkv_linear(dynamic_batch):
    model = SeparateQKVAttention()
    result = apply_pass(fuse_horizontal, model, tokens(), dynamic_batch=dynamic_batch)
    gm = result.graph_module
    assert result.applied == {"sibling-linears": 1}
    assert count_ops(gm, aten.split_with_sizes) == 1
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert sorted(n.meta["val"].shape[-1] for n in linears) == [16, 48]


def test_fuse_horizontal_fuses_sibling_convs_on_the_channel_dim():
    convs = [nn.Conv2d(4, c, 3, stride=2, padding=1) for c in (2, 5, 3)]
    result = apply_pass(fuse_horizontal, Siblings(convs), torch.randn(2, 4, 9, 9))
    assert result.applied == {"sibling-convs": 1}
    assert count_ops(result.graph_module, aten.conv2d) == 1
    (split,) = [
        n for n in result.graph_module.graph.nodes if n.target is aten.split_with_sizes.default
    ]
    assert split.args[1:] == ([2, 5, 3], 1)


def test_fuse_horizontal_gives_a_zero_bias_to_siblings_without_one():
    linears = [nn.Linear(8, 3), nn.Linear(8, 4, bias=False), nn.Linear(8, 2)]
    result = apply_pass(fuse_horizontal, Siblings(linears), torch.randn(3, 8))
    assert result.applied == {"sibling-linears": 1}
    assert count_ops(result.graph_module, aten.linear) == 1


def test_fuse_horizontal_handles_an_unbatched_conv1d():
    convs = [nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(3, 2, 3, padding=1)]
    result = apply_pass(fuse_horizontal, Siblings(convs), torch.randn(3, 10))
    assert result.applied == {"sibling-convs": 1}


def test_fuse_horizontal_leaves_out_the_sibling_whose_view_the_split_would_break():
    linears = [nn.Linear(16, 16) for _ in range(3)]
    model = Siblings(linears, views=[False, False, True])
    result = apply_pass(fuse_horizontal, model, tokens())
    assert result.applied == {"sibling-linears": 1}
    assert count_ops(result.graph_module, aten.linear) == 2


@pytest.mark.parametrize("name", ZOO)
def test_fuse_horizontal_keeps_zoo_models_equivalent_after_fold_conv_bn(name):
    if name not in fxopt.models.list():
        pytest.skip(f"{name} is not in the zoo yet")
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    opt = fxopt.optimize(model, inputs, passes=["fold_conv_bn", "fuse_horizontal"])
    assert opt.report.rolled_back == []
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)


def test_fuse_horizontal_is_idempotent():
    gm = fuse_horizontal(graph_of(SeparateQKVAttention().eval(), tokens())).graph_module
    again = fuse_horizontal(gm)
    assert not again.modified and again.applied == {}


def test_linear_cost_agrees_with_static_cost_of_the_linear_it_plans():
    gm = graph_of(nn.Linear(16, 24), tokens())
    (node,) = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert linear_cost(node.meta["val"].shape, 16, True, 4) == static_cost([node])


# declines


class WeightFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x, w):
        return self.a(x), F.linear(x, w)


class DifferentInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        return self.a(x), self.b(x * 2)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        return self.a(x), self.a(x) + 1, self.b(x * 2)


DECLINES = {  # name: (model, x)
    "different-strides": (
        Siblings([nn.Conv2d(4, 2, 3), nn.Conv2d(4, 2, 3, stride=2)]),
        torch.randn(1, 4, 8, 8),
    ),
    "different-kernels": (
        Siblings([nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 2, 1)]),
        torch.randn(1, 4, 8, 8),
    ),
    "grouped-convs": (
        Siblings([nn.Conv2d(4, 2, 3, groups=2), nn.Conv2d(4, 2, 3, groups=2)]),
        torch.randn(1, 4, 8, 8),
    ),
    "one-sibling": (Siblings([nn.Linear(16, 4)]), tokens()),
    "different-inputs": (DifferentInputs(), tokens()),
    "shared-weight": (SharedWeight(), tokens()),
    "views-broken-by-the-split": (
        Siblings([nn.Linear(16, 4), nn.Linear(16, 4)], views=[True, True]),
        tokens(),
    ),
}


@pytest.mark.parametrize(("model", "x"), DECLINES.values(), ids=DECLINES.keys())
def test_fuse_horizontal_declines_when_precondition_fails(model, x):
    assert_declines(fuse_horizontal, model, x)


def test_fuse_horizontal_declines_when_weight_is_not_constant():
    gm = graph_of(WeightFromInput().eval(), tokens(), torch.randn(4, 16))
    assert not fuse_horizontal(gm).modified


# properties


@st.composite
def sibling_cases(draw):
    """(model, x, linears and convs expected after the pass, None when the cost model decides):
    2-4 sibling linears or convs, some flattened by a view."""
    count = draw(st.integers(2, 4))
    outs = draw(st.lists(st.integers(1, 5), min_size=count, max_size=count))
    biases = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    views = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    batch, cin = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    if kind == "linear":
        rows = draw(st.sampled_from([(), (3,), (2, 3)]))
        ops = [nn.Linear(cin, o, bias=b) for o, b in zip(outs, biases, strict=True)]
        x = torch.randn(batch, *rows, cin)
    else:
        dims = int(kind[-2])
        kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        padding, dilation = draw(st.integers(0, 1)), draw(st.integers(1, 2))
        ops = [
            CONV[dims](cin, o, kernel, stride, padding, dilation, bias=b)
            for o, b in zip(outs, biases, strict=True)
        ]
        x = torch.randn(batch, cin, *(draw(st.integers(5, 7)),) * dims)
    # Flattening a column block of a linear's output with `view` is impossible when rows lie
    # between the batch and the features (the block's rows are strided) and the block is more
    # than one column wide; a channel block of a conv's output flattens fine.
    rows_between = kind == "linear" and x.dim() > 2
    broken = sum(v and o > 1 for v, o in zip(views, outs, strict=True)) if rows_between else 0
    expected = None if len(set(biases)) > 1 else 1 + broken if count - broken > 1 else count
    return Siblings(ops, views).eval(), x, expected


def check_sibling_case(case):
    model, x, expected = case
    before = len(model.ops)
    result = apply_pass(fuse_horizontal, model, x)
    after = count_ops(result.graph_module, aten.linear, *CONV_OPS)
    if expected is not None:  # the same FLOPs, fewer bytes: the cost model cannot say no
        assert after == expected
    assert result.modified == (after < before)
    assert not fuse_horizontal(result.graph_module).modified


@settings(max_examples=150, deadline=None)
@given(sibling_cases())
def test_fuse_horizontal_property_random_siblings_match_eager(case):
    check_sibling_case(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(sibling_cases())
def test_fuse_horizontal_property_random_siblings_match_eager_slow(case):
    check_sibling_case(case)
