import copy

import pytest
import torch
from helpers import x_for
from hypothesis import given, settings
from hypothesis import strategies as hypothesis_st
from torch import nn

import fxopt
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.testing import apply_pass, count_ops, graph_of, strategies

aten = torch.ops.aten
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


randomized = strategies.randomize_batch_norm


def conv_bn(dims=2, transposed=False, affine=True, **conv_kwargs) -> nn.Sequential:
    kinds = TCONV if transposed else CONV
    conv = kinds[dims](4, 6, **{"kernel_size": 3, **conv_kwargs})
    return nn.Sequential(conv, randomized(BN[dims](6, affine=affine))).eval()


def test_fold_conv_bn_removes_every_batch_norm_and_counts_match_applied():
    model = nn.Sequential(conv_bn(), nn.ReLU())
    result = apply_pass(fold_conv_bn, model, x_for(2))
    assert result.modified and result.applied == {"conv-bn": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert count_ops(result.graph_module, aten.conv2d) == 1


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_conv_bn_matches_eager_for_conv_and_conv_transpose(dims, transposed):
    model = conv_bn(dims, transposed, groups=2, stride=2, padding=1, dilation=2, bias=False)
    result = apply_pass(fold_conv_bn, model, x_for(dims))
    assert result.applied == {"conv-bn": 1}


def test_fold_conv_bn_handles_non_affine_norm():
    result = apply_pass(fold_conv_bn, conv_bn(affine=False), x_for(2))
    assert result.applied == {"conv-bn": 1}


def test_fold_conv_bn_on_zoo_model_matches_eager():
    model = fxopt.models.create("resnet18_like")
    (x,) = fxopt.models.example_inputs("resnet18_like", batch=2)
    result = apply_pass(fold_conv_bn, model, x)
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert result.applied["conv-bn"] == count_ops(graph_of(model, x), aten.batch_norm)


def test_fold_conv_bn_is_idempotent():
    gm = fold_conv_bn(graph_of(conv_bn(), x_for(2))).graph_module
    again = fold_conv_bn(gm)
    assert not again.modified and again.applied == {}


class SharedWeight(nn.Module):
    """One conv module called twice, only one call followed by BN (pytorch issue 104593)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = randomized(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = randomized(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class WeightFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm2d(4))

    def forward(self, x, w):
        return self.bn(nn.functional.conv2d(x, w, padding=1))


@pytest.mark.parametrize(
    "model",
    [SharedWeight(), SharedOutput(), NoRunningStats()],
    ids=["shared-weight", "shared-output", "no-running-stats"],
)
def test_fold_conv_bn_declines_when_precondition_fails(model):
    model.eval()
    gm = graph_of(model, x_for(2))
    code = gm.code
    result = fold_conv_bn(gm)
    assert not result.modified and result.graph_module.code == code


def test_fold_conv_bn_declines_when_weight_is_not_constant():
    model = WeightFromInput().eval()
    result = fold_conv_bn(graph_of(model, x_for(2), torch.randn(4, 4, 3, 3)))
    assert not result.modified


def test_fold_conv_bn_keeps_the_other_call_of_a_shared_conv_intact():
    """torch.fx's fuser folds BN into the shared module, silently changing the second call."""
    model = SharedWeight().eval()
    x = x_for(2)
    expected = model(x)
    opt = fxopt.optimize(model, x)
    torch.testing.assert_close(opt(x), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(strategies.conv_bn())
def test_fold_conv_bn_property_random_conv_bn_graphs_match_eager(case):
    model, x = case
    result = apply_pass(fold_conv_bn, model, x)
    assert result.applied == {"conv-bn": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0


def test_fold_conv_bn_leaves_the_model_untouched():
    model = conv_bn()
    state = copy.deepcopy(model.state_dict())
    apply_pass(fold_conv_bn, model, x_for(2))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_fold_conv_bn_declines_on_an_unbatched_conv_whose_length_matches_the_channels():
    """conv1d on (C, L) feeding BatchNorm1d(L): the norm's dim 1 is length, not channels."""

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(6, 6, 3, padding=1)
            self.bn = randomized(nn.BatchNorm1d(6))

        def forward(self, x):
            return self.bn(self.conv(x))

    model, x = Unbatched().eval(), torch.randn(6, 6)
    result = fold_conv_bn(graph_of(model, x))
    assert not result.modified
    fxopt.testing.assert_equivalent(model, result.graph_module, (x,))


class MixedConvBN(nn.Module):
    """MixNet's mixed-kernel conv: channel groups through different kernels, joined, then one
    batch norm over all channels."""

    def __init__(self, kernels=(3, 5), widths=(4, 2), bias=False):
        super().__init__()
        branches = zip(kernels, widths, strict=True)
        self.convs = nn.ModuleList(
            nn.Conv2d(3, w, k, padding=k // 2, bias=bias) for k, w in branches
        )
        self.bn = randomized(nn.BatchNorm2d(sum(widths)))

    def forward(self, x):
        return self.bn(torch.cat([c(x) for c in self.convs], 1)).relu()


@pytest.mark.parametrize("bias", [False, True])
def test_fold_conv_bn_folds_a_norm_after_a_cat_of_convs_into_each_conv(bias):
    model = MixedConvBN((3, 5, 7), (2, 3, 1), bias).eval()
    result = apply_pass(fold_conv_bn, model, torch.randn(2, 3, 9, 9))
    assert result.applied == {"cat-conv-bn": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert count_ops(result.graph_module, aten.conv2d) == 3


class CatAlongSpace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = randomized(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 2))


class CatWithReadBranch(MixedConvBN):
    def forward(self, x):
        first = self.convs[0](x)
        return self.bn(torch.cat([first, self.convs[1](x)], 1)) + first.mean()


@pytest.mark.parametrize("model", [CatAlongSpace(), CatWithReadBranch()], ids=["space", "read"])
def test_fold_conv_bn_declines_a_cat_along_space_or_with_a_branch_read_elsewhere(model):
    result = apply_pass(fold_conv_bn, model.eval(), torch.randn(2, 3, 6, 6))
    assert "cat-conv-bn" not in result.applied
    assert count_ops(result.graph_module, aten.batch_norm) == 1


@settings(max_examples=25, deadline=None)
@given(
    hypothesis_st.lists(
        hypothesis_st.tuples(hypothesis_st.sampled_from([1, 3, 5]), hypothesis_st.integers(1, 4)),
        min_size=1,
        max_size=4,
    ),
    hypothesis_st.booleans(),
)
def test_fold_conv_bn_property_cat_of_convs_matches_eager(branches, bias):
    kernels, widths = zip(*branches, strict=True)
    model = MixedConvBN(kernels, widths, bias).eval()
    result = apply_pass(fold_conv_bn, model, torch.randn(2, 3, 7, 7))
    assert count_ops(result.graph_module, aten.batch_norm) == 0
