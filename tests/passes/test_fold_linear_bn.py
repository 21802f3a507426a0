import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import seeded
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.affine import (
    affine_bias,
    bn_scale_shift,
    input_shift_bias,
    scale_input_channels,
    scale_output_channels,
)
from fxopt.passes.fold_linear_bn import fold_linear_bn
from fxopt.testing import apply_pass, count_ops, graph_of
from fxopt.testing.strategies import randomize_batch_norm

aten = torch.ops.aten


randomized = randomize_batch_norm


def linear_bn(in_features=5, out_features=6, bias=True, affine=True) -> nn.Sequential:
    linear = nn.Linear(in_features, out_features, bias=bias)
    return nn.Sequential(linear, randomized(nn.BatchNorm1d(out_features, affine=affine))).eval()


def bn_linear(in_features=5, out_features=6, bias=True, affine=True) -> nn.Sequential:
    linear = nn.Linear(in_features, out_features, bias=bias)
    return nn.Sequential(randomized(nn.BatchNorm1d(in_features, affine=affine)), linear).eval()


class BatchNormMlp(nn.Module):
    """A tabular MLP with BN on both sides of its linears: BN -> fc -> BN -> ReLU -> fc -> BN."""

    def __init__(self, features=7, hidden=16, classes=3):
        super().__init__()
        self.input_norm = randomized(nn.BatchNorm1d(features), seed=1)
        self.fc1 = nn.Linear(features, hidden)
        self.bn1 = randomized(nn.BatchNorm1d(hidden), seed=2)
        self.fc2 = nn.Linear(hidden, classes)
        self.bn2 = randomized(nn.BatchNorm1d(classes, affine=False), seed=3)

    def forward(self, x):
        hidden = torch.relu(self.bn1(self.fc1(self.input_norm(x))))
        return self.bn2(self.fc2(hidden))


# -- the tensor math, on its own ---------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_scale_output_channels_and_affine_bias_fold_a_norm_after_a_linear(bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randn(3, 5, generator=g)
    b = torch.randn(3, generator=g) if bias else None
    scale, shift = torch.randn(3, generator=g), torch.randn(3, generator=g)
    expected = F.linear(x, w.double(), None if b is None else b.double()) * scale + shift
    folded = F.linear(
        x, scale_output_channels(w, scale).double(), affine_bias(b, scale, shift, torch.float64)
    )
    torch.testing.assert_close(folded, expected.double())


@pytest.mark.parametrize("bias", [True, False])
def test_scale_input_channels_and_input_shift_bias_fold_an_affine_before_a_linear(bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g) if bias else None
    scale, shift = torch.randn(5, generator=g), torch.randn(5, generator=g)
    expected = F.linear(x * scale.double() + shift.double(), w, b)
    folded = F.linear(x, scale_input_channels(w, scale), input_shift_bias(w, b, shift))
    torch.testing.assert_close(folded, expected)


def test_input_folding_helpers_keep_the_weight_dtype():
    w = torch.randn(3, 5, dtype=torch.float16)
    scale, shift = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert scale_input_channels(w, scale).dtype == torch.float16
    assert input_shift_bias(w, None, shift).dtype == torch.float16


def test_bn_scale_shift_is_the_eval_norm_as_an_affine_map():
    bn = randomized(nn.BatchNorm1d(6, eps=1e-3)).eval()
    scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(4, 6)
    torch.testing.assert_close((x * scale + shift).float(), bn(x).detach())


# -- structural ----------------------------------------------------------------------------------


def test_fold_linear_bn_removes_every_batch_norm_and_counts_match_applied():
    model = BatchNormMlp().eval()
    result = apply_pass(fold_linear_bn, model, torch.randn(8, 7))
    assert result.modified
    # input_norm folds into fc1 (bn-linear), then bn1 into that fc1' and bn2 into fc2.
    assert result.applied == {"linear-bn": 2, "bn-linear": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert count_ops(result.graph_module, aten.linear) == 2


def test_fold_linear_bn_counts_match_applied_on_a_captured_graph():
    model = BatchNormMlp().eval()
    gm = graph_of(model, torch.randn(8, 7))
    norms = count_ops(gm, aten.batch_norm)
    result = fold_linear_bn(gm)
    assert sum(result.applied.values()) == norms - count_ops(gm, aten.batch_norm) == 3


# -- numerical -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("make", [linear_bn, bn_linear], ids=["linear-bn", "bn-linear"])
def test_fold_linear_bn_matches_eager(make, affine, bias):
    result = apply_pass(fold_linear_bn, make(bias=bias, affine=affine), torch.randn(4, 5))
    assert result.applied == {make.__name__.replace("_", "-"): 1}


@pytest.mark.parametrize("make", [linear_bn, bn_linear], ids=["linear-bn", "bn-linear"])
def test_fold_linear_bn_matches_eager_with_a_symbolic_batch(make):
    result = apply_pass(fold_linear_bn, make(), torch.randn(4, 5), dynamic_batch=True)
    assert sum(result.applied.values()) == 1
    assert result.graph_module(torch.randn(11, 5)).shape == (11, 6)


def test_fold_linear_bn_on_a_bn_mlp_model_matches_eager():
    """The zoo's vit_bn_like puts a flatten or a transpose between its linears and norms, which
    this pass does not look through, so a BN-MLP stands in as the model under test."""
    model = BatchNormMlp(features=12, hidden=64, classes=10).eval()
    result = apply_pass(fold_linear_bn, model, torch.randn(32, 12))
    assert count_ops(result.graph_module, aten.batch_norm) == 0


def test_fold_linear_bn_leaves_the_zoo_vit_equivalent():
    if "vit_bn_like" not in fxopt.models.list():
        pytest.skip("vit_bn_like is not in the zoo")
    model = fxopt.models.create("vit_bn_like")
    (x,) = fxopt.models.example_inputs("vit_bn_like", batch=2)
    result = apply_pass(fold_linear_bn, model, x)
    norms = count_ops(graph_of(model, x), aten.batch_norm)
    assert count_ops(result.graph_module, aten.batch_norm) == norms - sum(result.applied.values())


def test_optimize_removes_the_batch_norms_of_a_bn_mlp_and_matches_eager():
    model = BatchNormMlp().eval()
    x = torch.randn(8, 7)
    opt = fxopt.optimize(model, x)
    assert "batch_norm" not in opt.report.after.op_counts
    assert "fold_linear_bn" not in opt.report.rolled_back
    for inputs in (x, torch.randn(5, 7)):
        torch.testing.assert_close(opt(inputs), model(inputs), rtol=1e-5, atol=1e-5)


# -- property ------------------------------------------------------------------------------------


@st.composite
def linear_bn_cases(draw):
    rule = draw(st.sampled_from(["linear-bn", "bn-linear"]))
    in_features, out_features = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    linear = seeded(nn.Linear(in_features, out_features, bias=draw(st.booleans())), seed)
    features = out_features if rule == "linear-bn" else in_features
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bn = randomized(nn.BatchNorm1d(features, eps=eps, affine=draw(st.booleans())), seed + 1)
    model = nn.Sequential(linear, bn) if rule == "linear-bn" else nn.Sequential(bn, linear)
    x = torch.randn(
        draw(st.integers(1, 6)), in_features, generator=torch.Generator().manual_seed(seed)
    )
    return rule, model.eval(), x, draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(linear_bn_cases())
def test_fold_linear_bn_property_random_linear_bn_graphs_match_eager(case):
    rule, model, x, dynamic_batch = case
    result = apply_pass(fold_linear_bn, model, x, dynamic_batch=dynamic_batch)
    assert result.applied == {rule: 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0


# -- idempotence ---------------------------------------------------------------------------------


def test_fold_linear_bn_is_idempotent():
    gm = fold_linear_bn(graph_of(BatchNormMlp().eval(), torch.randn(8, 7))).graph_module
    again = fold_linear_bn(gm)
    assert not again.modified and again.applied == {}


# -- declines ------------------------------------------------------------------------------------


class SharedLinearOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = randomized(nn.BatchNorm1d(6))

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y) + y


class SharedNormOutput(nn.Module):
    """bn -> linear where the norm's output is also returned: folding would drop it."""

    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm1d(5))
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        y = self.bn(x)
        return self.fc(y), y


class SharedWeight(nn.Module):
    """One linear called thrice, two calls next to a BN: folding would change the others."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5, bias=False)
        self.bn_after, self.bn_before = randomized(nn.BatchNorm1d(5)), randomized(nn.BatchNorm1d(5))

    def forward(self, x):
        return self.bn_after(self.fc(x)) + self.fc(x) + self.fc(self.bn_before(x))


class SharedBias(nn.Module):
    """Two linears with their own weights and one bias tensor."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(5, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.bn_after, self.bn_before = randomized(nn.BatchNorm1d(5)), randomized(nn.BatchNorm1d(5))

    def forward(self, x):
        return self.bn_after(F.linear(x, self.w1, self.b)) + F.linear(
            self.bn_before(x), self.w2, self.b
        )


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn_after = nn.BatchNorm1d(6, track_running_stats=False)
        self.bn_before = nn.BatchNorm1d(6, track_running_stats=False)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.bn_before(torch.relu(self.bn_after(self.fc(x)))))


class TokenNorm(nn.Module):
    """BatchNorm1d on a 3-D (B, L, C) linear output normalizes dim 1, the tokens, not the
    features; with L == C the channel counts even agree, so only the rank tells them apart."""

    def __init__(self, tokens=6):
        super().__init__()
        self.fc = nn.Linear(4, tokens)
        self.bn = randomized(nn.BatchNorm1d(tokens))

    def forward(self, x):
        return self.bn(self.fc(x))


class NormBeforeSequenceLinear(nn.Module):
    """BN over dim 1 of (B, C, L), then a linear over L (with L == C): not the same channels."""

    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm1d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bn(x))


class WeightFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm1d(6))

    def forward(self, x, w):
        return self.bn(F.linear(x, w))


class NormThenReluThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm1d(5))
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(x)))


DECLINES = {
    "shared-linear-output": (SharedLinearOutput(), (torch.randn(4, 5),)),
    "shared-norm-output": (SharedNormOutput(), (torch.randn(4, 5),)),
    "shared-weight": (SharedWeight(), (torch.randn(4, 5),)),
    "shared-bias": (SharedBias(), (torch.randn(4, 5),)),
    "no-running-stats": (NoRunningStats(), (torch.randn(4, 5),)),
    "3d-token-norm": (TokenNorm(), (torch.randn(2, 6, 4),)),
    "3d-norm-before-linear": (NormBeforeSequenceLinear(), (torch.randn(2, 6, 6),)),
    "weight-from-input": (WeightFromInput(), (torch.randn(4, 5), torch.randn(6, 5))),
    "bn-relu-linear": (NormThenReluThenLinear(), (torch.randn(4, 5),)),
}


@pytest.mark.parametrize("name", DECLINES)
def test_fold_linear_bn_declines_when_precondition_fails(name):
    model, inputs = DECLINES[name]
    gm = graph_of(model.eval(), *inputs)
    code = gm.code
    result = fold_linear_bn(gm)
    assert not result.modified and result.applied == {}
    assert result.graph_module.code == code
    torch.testing.assert_close(result.graph_module(*inputs), model(*inputs))


def test_a_naive_fold_of_a_3d_token_norm_would_be_wrong():
    """The rank check is not caution: scaling the linear's rows by the token norm's factors
    changes the output."""
    model = TokenNorm().eval()
    x = torch.randn(2, 6, 4)
    bn = model.bn
    scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    naive = F.linear(
        x,
        scale_output_channels(model.fc.weight.detach(), scale),
        affine_bias(model.fc.bias.detach(), scale, shift, torch.float32),
    )
    assert (naive - model(x)).abs().max() > 1e-2


def test_fold_linear_bn_leaves_the_model_untouched():
    model = BatchNormMlp().eval()
    state = copy.deepcopy(model.state_dict())
    apply_pass(fold_linear_bn, model, torch.randn(8, 7))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


class LinearNorm(nn.Module):
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as (the linear's output is read
    again, for its shape only)."""

    def __init__(self, features=8, out=6):
        super().__init__()
        self.linear = nn.Linear(features, out, bias=False)
        self.bn = randomize_batch_norm(nn.BatchNorm1d(out))

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormPoolHead(nn.Module):
    """StarNet / ConvNeXt-style head: BN -> global average pool -> flatten -> linear."""

    def __init__(self, pool: type = nn.AdaptiveAvgPool2d):
        super().__init__()
        self.bn = randomize_batch_norm(nn.BatchNorm2d(5))
        self.pool, self.head = pool(1), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.pool(self.bn(x)).flatten(1))


def test_fold_linear_bn_folds_levit_linear_norm_through_flatten_and_reshape_as():
    result = apply_pass(fold_linear_bn, LinearNorm().eval(), torch.randn(2, 7, 8))
    assert result.applied == {"linear-bn": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0


def test_fold_linear_bn_folds_a_norm_before_a_pooled_head():
    result = apply_pass(fold_linear_bn, NormPoolHead().eval(), torch.randn(2, 5, 6, 6))
    assert result.applied == {"bn-linear": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0


def test_fold_linear_bn_declines_a_norm_before_max_pooling():
    # max does not commute with a per-channel scale that may be negative
    model = NormPoolHead(nn.AdaptiveMaxPool2d).eval()
    result = apply_pass(fold_linear_bn, model, torch.randn(2, 5, 6, 6))
    assert result.applied == {}
    assert count_ops(result.graph_module, aten.batch_norm) == 1


class NormHeads(nn.Module):
    """EfficientFormerV2's head: BN -> spatial mean -> a head and a distillation head."""

    def __init__(self, heads: int = 2, channels: int = 5, pooled: bool = True):
        super().__init__()
        self.pooled = pooled
        self.bn = randomize_batch_norm((nn.BatchNorm2d if pooled else nn.BatchNorm1d)(channels))
        self.heads = nn.ModuleList(nn.Linear(channels, 3) for _ in range(heads))

    def forward(self, x):
        x = self.bn(x)
        x = x.mean(dim=(2, 3)) if self.pooled else x
        return sum(head(x) for head in self.heads) / len(self.heads)


class NormHeadsSharingAWeight(NormHeads):
    def __init__(self):
        super().__init__()
        self.heads[1].weight = self.heads[0].weight


class NormHeadsAndFeature(NormHeads):
    """The pooled feature is returned too: the norm must stay."""

    def forward(self, x):
        feature = self.bn(x).mean(dim=(2, 3))
        return self.heads[0](feature), self.heads[1](feature), feature


@pytest.mark.parametrize("pooled", [True, False], ids=["mean", "direct"])
def test_fold_linear_bn_folds_a_norm_into_every_head_that_reads_it(pooled):
    x = torch.randn(2, 5, 4, 4) if pooled else torch.randn(3, 5)
    result = apply_pass(fold_linear_bn, NormHeads(pooled=pooled).eval(), x)
    assert result.applied == {"bn-linears": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert count_ops(result.graph_module, aten.linear) == 2
    again = fold_linear_bn(result.graph_module)
    assert not again.modified and again.applied == {}


@settings(max_examples=15, deadline=None)
@given(heads=st.integers(2, 4), channels=st.integers(1, 7), batch=st.integers(1, 3))
def test_fold_linear_bn_property_norm_into_several_heads(heads, channels, batch):
    model = NormHeads(heads, channels).eval()
    result = apply_pass(fold_linear_bn, model, torch.randn(batch, channels, 3, 2))
    assert result.applied == {"bn-linears": 1}


@pytest.mark.parametrize("model", [NormHeadsSharingAWeight, NormHeadsAndFeature])
def test_fold_linear_bn_declines_heads_it_cannot_all_fold(model):
    x = torch.randn(2, 5, 4, 4)
    gm = graph_of(model().eval(), x)
    code = gm.code
    result = fold_linear_bn(gm)
    assert not result.modified and result.graph_module.code == code
    assert count_ops(result.graph_module, aten.batch_norm) == 1
