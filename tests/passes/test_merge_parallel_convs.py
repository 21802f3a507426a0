import functools
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxopt
from fxopt.analysis.kernels import (
    avg_pool_kernel,
    dilate,
    identity_kernel,
    merge_kernels,
    pad_centred,
    undilate,
)
from fxopt.analysis.linear_combination import linear_combination
from fxopt.ir.graph import is_op
from fxopt.models.dbb import DiverseBranchBlock
from fxopt.passes.merge_parallel_convs import merge_parallel_convs
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.rules.registry import get_pass
from fxopt.rules.rewrite import PassResult
from fxopt.testing import apply_pass, assert_declines, assert_equivalent, count_ops, graph_of
from fxopt.testing.multibranch import multi_branch_chain
from fxopt.testing.strategies import random_batch_norm as bn
from fxopt.testing.strategies import randomize_batch_norm

aten = torch.ops.aten
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
FUNCTIONAL_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def pipeline(*names: str):
    """One pass function that runs the named passes in order; `applied` adds up their rules."""

    def run(gm):
        applied, modified = Counter(), False
        for name in names:
            result = get_pass(name).fn(gm)
            gm, modified = result.graph_module, modified or result.modified
            applied.update(result.applied)
        return PassResult(gm, modified, dict(applied))

    return run


def convs(gm) -> int:
    return count_ops(gm, *CONV_OPS)


def conv_bn(cin, cout, kernel, dims=2, seed=0, **kwargs):
    """Conv (no bias) then batch norm, the train-form branch of the RepVGG family."""
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    dilation = kwargs.get("dilation", 1)
    padding = tuple(dilation * (k - 1) // 2 for k in kernel)
    conv = CONV[dims](cin, cout, kernel, **{"padding": padding, "bias": False, **kwargs})
    return nn.Sequential(conv, bn(cout, dims, seed))


class Sum(nn.Module):
    """Parallel branches of one input, summed."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return functools.reduce(operator.add, [branch(x) for branch in self.branches])


def repvgg(channels=4, out=None, stride=1, groups=1, dims=2):
    out = out or channels
    branches = [
        conv_bn(channels, out, 3, dims, 1, stride=stride, groups=groups),
        conv_bn(channels, out, 1, dims, 2, stride=stride, groups=groups),
    ]
    if channels == out and stride == 1:
        branches.append(bn(channels, dims, 3))
    return nn.Sequential(Sum(*branches), nn.ReLU())


def acnet(channels=4):
    return Sum(
        conv_bn(channels, channels, 3, seed=1),
        conv_bn(channels, channels, (1, 3), seed=2),
        conv_bn(channels, channels, (3, 1), seed=3),
    )


def mobileone_dw(channels=4, k=3):
    """k over-parameterized dw 3x3 branches, a dw 1x1 scale branch and an identity norm."""
    branches = [conv_bn(channels, channels, 3, groups=channels, seed=s) for s in range(k)]
    branches.append(conv_bn(channels, channels, 1, groups=channels, seed=k))
    return Sum(*branches, bn(channels, seed=k + 1))


def replknet(channels=4):
    return Sum(
        conv_bn(channels, channels, 31, groups=channels, seed=1),
        conv_bn(channels, channels, 5, groups=channels, seed=2),
    )


def unireplknet(channels=4):
    """A dw 13x13 with dilated branches (5, 7, 3, 3, 3) at dilations (1, 2, 3, 4, 5)."""
    dilated = [
        conv_bn(channels, channels, k, groups=channels, dilation=d, seed=d)
        for k, d in zip((5, 7, 3, 3, 3), (1, 2, 3, 4, 5), strict=True)
    ]
    return Sum(conv_bn(channels, channels, 13, groups=channels, seed=0), *dilated)


class RepMixer(nn.Module):
    """FastViT: x + gamma * (mixer(x) - norm(x)), mixer a MobileOne dw block, norm a BN."""

    def __init__(self, channels=4):
        super().__init__()
        self.mixer = mobileone_dw(channels, k=1)
        self.norm = bn(channels, seed=9)
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


def dbb_dw(channels=4):
    """DBB on a depthwise conv: k x k, 1x1 and an average pool, each with batch norm."""
    pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), bn(channels, seed=3))
    return Sum(
        conv_bn(channels, channels, 3, groups=channels, seed=1),
        conv_bn(channels, channels, 1, groups=channels, seed=2),
        pool,
    )


X = torch.randn(2, 4, 9, 9)
BLOCKS = {
    "repvgg": (repvgg, X),
    "repvgg-stride2": (lambda: repvgg(4, 6, stride=2), X),
    "repvgg-grouped": (lambda: repvgg(4, groups=2), X),
    "repvgg-conv1d": (lambda: repvgg(dims=1), torch.randn(2, 4, 11)),
    "repvgg-conv3d": (lambda: repvgg(dims=3), torch.randn(2, 4, 5, 5, 5)),
    "acnet": (acnet, X),
    "mobileone-dw": (mobileone_dw, X),
    "replknet": (replknet, torch.randn(2, 4, 20, 20)),
    "unireplknet": (unireplknet, torch.randn(2, 4, 16, 16)),
    "fastvit-repmixer": (RepMixer, X),
    "dbb-dw": (dbb_dw, X),
}


# --- kernels: pure tensor math, checked against the ops they stand for ---------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dilate_gives_the_dense_kernel_of_a_dilated_conv(dims):
    weight, x = torch.randn(3, 2, *(3,) * dims), torch.randn(1, 2, *(9,) * dims)
    conv = FUNCTIONAL_CONV[dims]
    dense = dilate(weight, (2,) * dims)
    assert dense.shape[2:] == (5,) * dims
    torch.testing.assert_close(conv(x, dense, padding=2), conv(x, weight, padding=2, dilation=2))
    assert torch.equal(undilate(dense, (2,) * dims), weight)


def test_dilate_matches_conv_transpose_with_stride_of_a_one():
    weight = torch.randn(3, 2, 3, 5)
    flat = weight.reshape(6, 1, 3, 5)
    spread = F.conv_transpose2d(flat, torch.ones(1, 1, 1, 1), stride=(3, 2)).reshape(3, 2, 7, 9)
    assert torch.equal(dilate(weight, (3, 2)), spread)


def test_pad_centred_keeps_the_conv_when_padding_grows_with_it():
    weight, x = torch.randn(3, 2, 1, 3), torch.randn(1, 2, 7, 7)
    padded = pad_centred(weight, (5, 5))
    torch.testing.assert_close(F.conv2d(x, padded, padding=2), F.conv2d(x, weight, padding=(0, 1)))
    with pytest.raises(ValueError):
        pad_centred(weight, (4, 5))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_kernel_maps_the_input_to_itself_for_any_groups(groups):
    x = torch.randn(2, 6, 5, 5)
    kernel = identity_kernel(6, groups, 2, torch.float32)
    assert torch.equal(F.conv2d(x, kernel, groups=groups), x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_avg_pool_kernel_matches_the_pool_counting_padded_zeros(dims, groups):
    x = torch.randn(2, 4, *(7,) * dims, dtype=torch.float64)
    kernel = avg_pool_kernel(4, groups, (3,) * dims)
    conv = FUNCTIONAL_CONV[dims](x, kernel, stride=2, padding=1, groups=groups)
    pool = FUNCTIONAL_POOL[dims](x, 3, 2, 1, count_include_pad=True)
    torch.testing.assert_close(conv, pool)


def test_avg_pool_kernel_differs_from_a_pool_that_leaves_padded_zeros_out():
    """Negative control: count_include_pad=False divides border windows by fewer taps."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    conv = F.conv2d(x, avg_pool_kernel(2, 2, (3, 3)), padding=1, groups=2)
    pool = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(conv[..., 1:-1, 1:-1], pool[..., 1:-1, 1:-1])
    assert not torch.allclose(conv, pool)


def test_avg_pool_kernel_honours_divisor_override():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    conv = F.conv2d(x, avg_pool_kernel(2, 1, (3, 3), divisor=4), padding=1)
    torch.testing.assert_close(conv, F.avg_pool2d(x, 3, 1, 1, divisor_override=4))


def test_merge_kernels_sums_centred_branches_and_biases():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w3, w1, b3 = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 1, 1), torch.randn(5)
    branches = [(w.double(), b) for w, b in ((w3, b3.double()), (w1, None))]
    weight, bias = merge_kernels(branches)
    expected = F.conv2d(x, w3.double(), b3.double(), padding=1) + F.conv2d(x, w1.double())
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected)
    with pytest.raises(ValueError):
        merge_kernels([(w3, None), (torch.randn(5, 2, 3, 3), None)])


# --- the graph algebra -------------------------------------------------------------------------


def test_linear_combination_reads_the_repmixer_form_as_terms_of_x():
    gm = graph_of(RepMixer(), X)
    root = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    combination = linear_combination(gm, root)
    kinds = Counter("x" if t.is_identity else t.node.target.__name__ for t in combination.terms)
    assert kinds == {"x": 3, "conv2d.default": 2}  # x, norm(x), the mixer's BN; two convs
    assert len(combination.sources) == 1


# --- structure and numerics of each block type -------------------------------------------------


@pytest.mark.parametrize("name", BLOCKS)
def test_merge_parallel_convs_leaves_one_conv_per_block(name):
    make, x = BLOCKS[name]
    model = make()
    before = graph_of(model, x)
    result = apply_pass(pipeline("fold_conv_bn", "merge_parallel_convs"), model, x)
    gm = result.graph_module
    assert result.applied["parallel-branches"] == 1
    assert convs(gm) == 1 < convs(before)
    assert count_ops(gm, aten.batch_norm, aten.add, aten.sub, aten.mul, aten.avg_pool2d) == 0


@pytest.mark.parametrize("name", ["repvgg", "acnet", "fastvit-repmixer", "dbb-dw"])
def test_merge_parallel_convs_needs_no_bn_fold_first(name):
    make, x = BLOCKS[name]
    result = apply_pass(merge_parallel_convs, make(), x, dynamic_batch=True)
    assert result.applied == {"parallel-branches": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0


def test_merge_parallel_convs_keeps_a_dilation_when_every_tap_lies_on_its_grid():
    model = Sum(nn.Conv2d(4, 4, 3, padding=15, dilation=15), nn.Conv2d(4, 4, 1))
    result = apply_pass(merge_parallel_convs, model, torch.randn(1, 4, 33, 33))
    (conv,) = [n for n in result.graph_module.graph.nodes if n.target is aten.conv2d.default]
    assert conv.args[4:7] == ([15, 15], [15, 15], 1)
    assert conv.args[1].meta["val"].shape == (4, 4, 3, 3)


def test_merge_parallel_convs_merges_even_kernels_that_share_a_centre():
    model = Sum(
        nn.Conv2d(4, 4, 4, padding=1), nn.Conv2d(4, 4, 2), nn.Conv2d(4, 4, (2, 4), padding=(0, 1))
    )
    result = apply_pass(merge_parallel_convs, model, X)
    assert result.applied == {"parallel-branches": 1} and convs(result.graph_module) == 1


def test_merge_parallel_convs_merges_convs_of_a_normalized_input_without_touching_the_norm():
    """Branches of bn(x) are branches of one value; the norm stays where it is."""

    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.sum = bn(4), Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.sum(self.norm(x))

    result = apply_pass(merge_parallel_convs, Normalized(), X)
    assert result.applied == {"parallel-branches": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 1


def test_merge_parallel_convs_merges_what_it_can_and_leaves_a_costlier_merge_apart():
    """1x1 + 3x3 at dilation 15 merge into a dilated 3x3; adding a 3x3 at dilation 2 would need
    a dense 31x31 kernel (961 taps for 19), so that sum stays."""
    model = Sum(
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 3, padding=15, dilation=15),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    )
    result = apply_pass(merge_parallel_convs, model, torch.randn(1, 4, 33, 33))
    gm = result.graph_module
    assert result.applied == {"parallel-branches": 1} and convs(gm) == 2
    kernels = [n.args[1].meta["val"].shape[2:] for n in gm.graph.nodes if is_op(n, *CONV_OPS)]
    assert kernels == [(3, 3), (3, 3)]


def test_merge_parallel_convs_declines_a_merge_that_costs_more_flops():
    model = Sum(
        nn.Conv2d(4, 4, 3, padding=15, dilation=15), nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    )
    assert_declines(merge_parallel_convs, model, torch.randn(1, 4, 33, 33))


def test_merge_parallel_convs_is_idempotent():
    gm = merge_parallel_convs(graph_of(repvgg(), X)).graph_module
    again = merge_parallel_convs(gm)
    assert not again.modified and again.applied == {}


# --- random multi-branch blocks and chains -----------------------------------------------------


def check_chain(case):
    model, x, expected = case
    result = apply_pass(pipeline("fold_conv_bn", "merge_parallel_convs"), model, x)
    assert convs(result.graph_module) == expected, model


@settings(max_examples=150, deadline=None)
@given(multi_branch_chain(max_blocks=2, max_branches=4))  # capture dominates: keep graphs small
def test_merge_parallel_convs_property_random_multi_branch_chains(case):
    check_chain(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(multi_branch_chain())
def test_merge_parallel_convs_property_random_multi_branch_chains_long(case):
    check_chain(case)


# --- zoo models --------------------------------------------------------------------------------

ZOO = [
    "repvgg_a0_like",
    "acnet_resnet_like",
    "dbb_net",
    "mobileone_s0_like",
    "replknet_like",
    "unireplknet_like",
    "fastvit_repmixer_net",
]
# fold_constants turns FastViT's reshaped layer scales into constants the merge can read.
ZOO_PIPELINE = ("fold_constants", "fold_conv_bn", "merge_parallel_convs", "fold_channel_affine")


@pytest.mark.parametrize("name", ZOO)
def test_merge_parallel_convs_on_zoo_model_reaches_the_deploy_conv_count(name):
    if name not in fxopt.models.list():
        pytest.skip(f"{name} is not in the zoo yet")
    # float64: a deep float32 train form is itself ~1e-5 off its exact value, as is its deploy
    # form, which leaves no room to check a merge; in float64 rounding is ~1e-15.
    model = fxopt.models.create(name).double()
    (x,) = fxopt.models.example_inputs(name, batch=1)
    result = apply_pass(pipeline(*ZOO_PIPELINE), model, x.double())
    assert result.applied["parallel-branches"] > 0
    assert convs(result.graph_module) < sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if fxopt.models.info(name).has_deploy:
        deploy = graph_of(fxopt.models.create(name, deploy=True).double(), x.double())
        assert convs(result.graph_module) == convs(deploy)


# --- declines: each leaves the graph exactly as it was -----------------------------------------


class TwoBranches(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)


def test_merge_parallel_convs_declines_different_strides():
    model = TwoBranches(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1, stride=2))  # both 3x3 on 5x5
    assert_declines(merge_parallel_convs, model, torch.randn(2, 4, 5, 5))


def test_merge_parallel_convs_declines_branches_with_different_centres():
    model = TwoBranches(nn.Conv2d(4, 4, 3, 2, padding=1), nn.Conv2d(4, 4, 2, 2))  # 4x4 both
    assert_declines(merge_parallel_convs, model, torch.randn(2, 4, 8, 8))


def test_merge_parallel_convs_declines_a_relu_inside_a_branch():
    model = TwoBranches(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()), nn.Conv2d(4, 4, 1))
    assert_declines(merge_parallel_convs, model, X)


def test_merge_parallel_convs_declines_reflect_padding():
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    assert_declines(merge_parallel_convs, TwoBranches(reflect, nn.Conv2d(4, 4, 1)), X)


def test_merge_parallel_convs_declines_bn_before_a_padded_conv():
    """conv(bn(x)) is not a linear op of x at the borders (padded zeros are not normalized)."""
    model = TwoBranches(nn.Sequential(bn(4), nn.Conv2d(4, 4, 3, padding=1)), nn.Conv2d(4, 4, 1))
    assert_declines(merge_parallel_convs, model, X)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3, self.c1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c3(x) + self.c1(x), self.c3(x * 2)


def test_merge_parallel_convs_declines_a_shared_conv_weight():
    assert_declines(merge_parallel_convs, SharedWeight(), X)


class SharedBranch(SharedWeight):
    def forward(self, x):
        y = self.c3(x)
        return y + self.c1(x), y


def test_merge_parallel_convs_declines_a_branch_value_with_another_user():
    assert_declines(merge_parallel_convs, SharedBranch(), X)


class TwoInputs(SharedWeight):
    def forward(self, x, y):
        return self.c3(x) + self.c1(y)


def test_merge_parallel_convs_declines_branches_of_different_inputs():
    assert_declines(merge_parallel_convs, TwoInputs(), X, X.clone())


def test_merge_parallel_convs_declines_different_conv_groups():
    assert_declines(
        merge_parallel_convs,
        TwoBranches(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)),
        X,
    )


@pytest.mark.parametrize(
    "pool", [nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 1, 1, ceil_mode=True)]
)
def test_merge_parallel_convs_declines_a_pool_whose_mean_is_no_kernel(pool):
    assert_declines(merge_parallel_convs, TwoBranches(nn.Conv2d(4, 4, 3, padding=1), pool), X)


def test_merge_parallel_convs_declines_a_transposed_conv_branch():
    model = TwoBranches(nn.ConvTranspose2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    assert_declines(merge_parallel_convs, model, X)


class MixedDtypes(SharedWeight):
    """A float64 layer scale promotes one branch: the sum is float64, a conv float32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(4, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return self.c3(x) * self.scale + self.c1(x)


def test_merge_parallel_convs_declines_branches_of_different_dtypes():
    assert_declines(merge_parallel_convs, MixedDtypes(), X)


def test_merge_parallel_convs_declines_a_sum_that_broadcasts():
    model = TwoBranches(nn.Conv2d(4, 4, 9), nn.Conv2d(4, 4, 1))  # (2, 4, 1, 1) + (2, 4, 9, 9)
    assert_declines(merge_parallel_convs, model, X)


class MaskedTokens(nn.Module):
    """x + fc(x) on tokens zeroed by a mask viewed with an inferred size (found by the fuzzer)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x, mask):
        x = x.masked_fill(~mask.view(x.shape[0], -1, 1), 0.0)
        return x + self.fc(x)


def test_merge_parallel_convs_reads_a_channel_count_that_is_a_constant_symint():
    # size-oblivious tracing leaves the -1 of mask.view(B, -1, 1) a SymInt whose value is 4
    model, x, mask = MaskedTokens().eval(), torch.randn(2, 4, 2), torch.rand(2, 4) > 0.5
    batch = torch.export.Dim("batch")
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        shapes = ({0: batch}, {0: batch})
        gm = torch.export.export(model, (x, mask), dynamic_shapes=shapes, strict=False).module()
    total = next(n for n in gm.graph.nodes if is_op(n, aten.add)).meta["val"]
    if not isinstance(total.shape[1], torch.SymInt):
        pytest.skip("this torch traces the inferred size as an int")
    result = merge_parallel_convs(gm)  # raised "SymIntArrayRef expected to contain only
    assert not result.modified  # concrete integers" building its per-channel vectors
    assert_equivalent(model, result.graph_module, (x, mask))


# --- DBB: branches that read x through a 1x1 conv, a zero pad and per-channel maps -------------


def dbb_block(cin=4, cout=6, kernel=3, stride=1):
    """fxopt's Diverse Branch Block, every norm away from the identity (so the shifts that the
    pads carry to the border are not zero)."""
    block = DiverseBranchBlock(cin, cout, kernel, stride)
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    for seed, norm in enumerate(norms):
        randomize_batch_norm(norm, seed)
    return block.eval()


def test_linear_combination_reads_dbb_branches_through_the_1x1_conv_and_the_pad():
    gm = graph_of(dbb_block(), X)
    root = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    combination = linear_combination(gm, root)
    assert len(combination.terms) == 4 and len(combination.sources) == 1
    inner = [t.inner for t in combination.terms if t.inner is not None]
    assert [i.padding for i in inner] == [(1, 1), (1, 1)]
    assert all(i.shift.abs().sum() > 0 for i in inner)  # the norm after the pad shifts


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 1)])
def test_merge_parallel_convs_merges_a_dbb_block_into_one_conv(kernel, stride):
    block = dbb_block(kernel=kernel, stride=stride)
    result = apply_pass(merge_parallel_convs, block, X, dynamic_batch=True)
    gm = result.graph_module
    assert result.applied == {"parallel-branches": 1} and convs(gm) == 1
    assert count_ops(gm, aten.batch_norm, aten.pad, aten.avg_pool2d, aten.add) == 0
    assert_equivalent(block, gm, (torch.randn(5, 4, 9, 9),))


def test_default_pipeline_takes_dbb_net_to_its_deploy_form_without_a_norm():
    model = fxopt.models.create("dbb_net")
    x2, x5 = (fxopt.models.example_inputs("dbb_net", batch=b)[0] for b in (2, 5))
    result = apply_pass(pipeline(*DEFAULT_PIPELINE), model, x2, dynamic_batch=True)
    deploy = graph_of(fxopt.models.create("dbb_net", deploy=True), x2)
    assert convs(result.graph_module) == convs(deploy) == 4
    assert count_ops(result.graph_module, aten.batch_norm, aten.pad, aten.avg_pool2d) == 0
    assert_equivalent(model, result.graph_module, (x5,))


class PaddedBranch(nn.Module):
    """DBB's 1x1 -> k x k branch beside a k x k conv, with the pad and 1x1 bias as given."""

    def __init__(self, pad, bias=False, groups=1):
        super().__init__()
        self.dense = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.pointwise = nn.Conv2d(4, 4, 1, bias=bias, groups=groups)
        self.norm = bn(4, seed=5)
        self.kxk = nn.Conv2d(4, 4, 3, groups=groups)
        self.pad = pad

    def forward(self, x):
        return self.dense(x) + self.kxk(self.norm(self.pad(self.pointwise(x))))


PADS = {
    "zero": lambda y: F.pad(y, [1, 1, 1, 1]),
    "constant_pad_nd": lambda y: torch.ops.aten.constant_pad_nd(y, [1, 1, 1, 1], 0.0),
    "nonzero-value": lambda y: F.pad(y, [1, 1, 1, 1], value=0.5),
    "asymmetric": lambda y: F.pad(y, [0, 2, 1, 1]),
    "reflect": lambda y: F.pad(y, [1, 1, 1, 1], mode="reflect"),
}


@pytest.mark.parametrize("pad, groups", [("zero", 1), ("constant_pad_nd", 1), ("zero", 2)])
def test_merge_parallel_convs_absorbs_a_zero_pad_after_a_bias_free_1x1_conv(pad, groups):
    result = apply_pass(merge_parallel_convs, PaddedBranch(PADS[pad], groups=groups), X)
    (merged,) = [n for n in result.graph_module.graph.nodes if is_op(n, *CONV_OPS)]
    assert merged.args[4] == [1, 1] and merged.args[6] == groups


@pytest.mark.parametrize(
    "model",
    [
        PaddedBranch(PADS["nonzero-value"]),
        PaddedBranch(PADS["asymmetric"]),
        PaddedBranch(PADS["reflect"]),
        PaddedBranch(PADS["zero"], bias=True),  # pad0(W x + b) is not W pad0(x) + b
        TwoBranches(
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Sequential(
                nn.Conv2d(4, 4, 1, bias=False), bn(4, seed=5), nn.Conv2d(4, 4, 3, padding=1)
            ),
        ),
    ],
    ids=["nonzero-pad-value", "asymmetric-pad", "reflect-pad", "biased-1x1", "shift-then-padded"],
)
def test_merge_parallel_convs_declines_a_branch_whose_pad_does_not_commute(model):
    """The last: a 3x3 conv padding its own border after bn(conv1x1(x)) reads 0 there, not the
    norm's shift."""
    assert_declines(merge_parallel_convs, model, X)
    result = apply_pass(pipeline(*DEFAULT_PIPELINE), model, X)
    assert convs(result.graph_module) > 1
