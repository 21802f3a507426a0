import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, seeded
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import fxopt
from fxopt.analysis.sequential_math import conv_as_matrix, conv_bias_as_vector
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.passes.fold_linear_bn import fold_linear_bn
from fxopt.passes.merge_conv_into_linear import merge_conv_into_linear
from fxopt.testing import apply_pass, assert_equivalent, count_ops, graph_of

aten = torch.ops.aten
module = importlib.import_module("fxopt.passes.merge_conv_into_linear")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)


class FcPlusConvs(nn.Module):
    """RepMLP's partition perceptron on whole samples: an FC over the flattened (C, *spatial)
    sample, reshaped like the conv branches' output, plus the branches.

    `fc` is "linear" or "conv" (a 1x1 conv over (N, C * H * W, 1, 1), RepMLP's fc3, with
    `fc_groups`); `style` is how the branches join: "chained" (out = out + conv(x) per branch),
    "inplace" (out += conv(x)), "summed" (fc + sum(convs)) or "conv-first" (sum(convs) + fc).
    """

    def __init__(
        self,
        channels=3,
        out=4,
        spatial=(5, 4),
        branches=None,
        fc="linear",
        fc_groups=1,
        fc_bias=True,
        style="chained",
    ):
        super().__init__()
        branches = branches or [{"kernel_size": 1}, {"kernel_size": 3, "padding": 1}]
        dims = len(spatial)
        self.convs = nn.ModuleList(CONV[dims](channels, out, **kwargs) for kwargs in branches)
        self.out_shape = self.convs[0](torch.zeros(1, channels, *spatial)).shape[1:]
        features_in, features_out = channels * math.prod(spatial), math.prod(self.out_shape)
        if fc == "linear":
            self.fc = nn.Linear(features_in, features_out, bias=fc_bias)
        else:
            self.fc = nn.Conv2d(features_in, features_out, 1, groups=fc_groups, bias=fc_bias)
        self.fc_kind, self.style = fc, style

    def forward(self, x):
        n = x.shape[0]
        if self.fc_kind == "linear":
            fc_out = self.fc(x.flatten(1))
        else:
            fc_out = self.fc(x.reshape(n, -1, 1, 1))
        out = fc_out.reshape(n, *self.out_shape)
        if self.style == "summed":
            return out + sum(conv(x) for conv in self.convs)
        if self.style == "conv-first":
            return sum(conv(x) for conv in self.convs) + out
        for conv in self.convs:
            if self.style == "inplace":
                out += conv(x)
            else:
                out = out + conv(x)
        return out


class PartitionedRepMLP(nn.Module):
    """RepMLPNet's block: (N, C, H, W) cut into h x w partitions, a grouped 1x1 conv FC over each
    flattened partition (one group per channel, as RepMLPNet's shared sets), depthwise conv
    branches on the partitions added in place, and the partitions put back."""

    def __init__(self, channels=2, patch=(4, 4), kernels=(1, 3)):
        super().__init__()
        self.channels, self.patch = channels, patch
        features = channels * patch[0] * patch[1]
        self.fc = nn.Conv2d(features, features, 1, groups=channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in kernels
        )

    def forward(self, x):
        n, c, height, width = x.shape
        (h, w), parts = self.patch, (height // self.patch[0], width // self.patch[1])
        partitions = x.reshape(-1, c, parts[0], h, parts[1], w).permute(0, 2, 4, 1, 3, 5)
        out = self.fc(partitions.reshape(-1, c * h * w, 1, 1))
        out = out.reshape(-1, parts[0], parts[1], c, h, w)
        conv_in = partitions.reshape(-1, c, h, w)
        conv_out = 0
        for conv in self.convs:
            conv_out += conv(conv_in)
        out += conv_out.reshape(-1, parts[0], parts[1], c, h, w)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


# -- the tensor math, on its own ---------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("groups", "blocks"), [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": 1, "padding": 1, "dilation": 1},
        {"stride": 2, "padding": 0, "dilation": 2},
        {"stride": 1, "padding": "same", "dilation": 1},
    ],
    ids=["padded", "strided-dilated", "same"],
)
def test_conv_as_matrix_is_the_conv_on_flattened_samples(dims, groups, blocks, geometry):
    spatial = (6, 5, 4)[:dims]
    kernel = (3, 3, 2)[:dims] if geometry["padding"] != "same" else (3,) * dims
    w = randn(2 * groups, 2, *kernel, dtype=torch.float64)
    b = randn(2 * groups, seed=1, dtype=torch.float64)
    x = randn(3, 2 * groups, *spatial, seed=2, dtype=torch.float64)
    expected = CONV_FN[dims](x, w, b, groups=groups, **geometry)
    expand = {k: (v if isinstance(v, str) else (v,) * dims) for k, v in geometry.items()}
    matrix = conv_as_matrix(
        w, spatial, expand["stride"], expand["padding"], expand["dilation"], groups, blocks
    )
    positions = math.prod(expected.shape[2:])
    assert matrix.shape == (blocks, expected[0].numel() // blocks, x[0].numel() // blocks)
    flat = torch.einsum("bfk,nbk->nbf", matrix, x.reshape(3, blocks, -1)).reshape(3, -1)
    flat = flat + conv_bias_as_vector(b, positions)
    torch.testing.assert_close(flat.reshape(expected.shape), expected)


def test_conv_as_matrix_of_a_1x1_conv_on_one_position_is_its_weight():
    w = randn(5, 3, 1, 1)
    matrix = conv_as_matrix(w, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    torch.testing.assert_close(matrix[0].float(), w.flatten(1))


# -- structural ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["chained", "inplace", "summed", "conv-first"])
def test_merge_conv_into_linear_leaves_only_the_fc_and_counts_match_applied(style):
    model, x = seeded(FcPlusConvs(style=style)), randn(2, 3, 5, 4)
    result = apply_pass(merge_conv_into_linear, model, x)
    assert result.applied == {"fc-conv": 2 if style in ("chained", "inplace") else 1}
    assert count_ops(result.graph_module, *CONV_OPS) == 0
    assert count_ops(result.graph_module, aten.linear) == 1
    assert count_ops(result.graph_module, aten.add, aten.add_) == 0


def test_merge_conv_into_linear_merges_repmlpnet_partitions_into_the_grouped_fc():
    model, x = seeded(PartitionedRepMLP()), randn(2, 2, 8, 12)
    result = apply_pass(merge_conv_into_linear, model, x, dynamic_batch=True)
    assert result.applied == {"fc-conv": 1}
    gm = result.graph_module
    assert count_ops(gm, *CONV_OPS) == 1 and count_ops(gm, aten.add, aten.add_) == 0
    fc = next(
        n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.conv2d.default
    )
    assert fc.args[-1] == 2  # still one group per channel
    assert_equivalent(model, gm, (randn(5, 2, 8, 12, seed=1),))


# -- numerical -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fc", ["linear", "conv"])
def test_merge_conv_into_linear_matches_eager_on_1d_and_3d_convs(fc):
    for spatial in ((7,), (3, 4, 2)):
        dims = len(spatial)
        branches = [
            {"kernel_size": 3, "padding": 1, "groups": 2, "bias": False},
            {"kernel_size": 1, "groups": 2},
        ]
        model = seeded(FcPlusConvs(4, 2, spatial, branches, fc=fc, fc_groups=2, fc_bias=False))
        result = apply_pass(
            merge_conv_into_linear, model, randn(3, 4, *spatial), dynamic_batch=True
        )
        assert result.applied == {"fc-conv": 2}, dims


def test_merge_conv_into_linear_after_bn_folding_merges_conv_bn_branches():
    """RepMLP trains each branch with BN; fold_conv_bn and fold_linear_bn run first."""

    class WithNorms(FcPlusConvs):
        def __init__(self):
            super().__init__(fc_bias=False)
            self.fc_bn = fxopt.testing.strategies.randomize_batch_norm(nn.BatchNorm1d(80), 1)
            self.bns = nn.ModuleList(
                fxopt.testing.strategies.randomize_batch_norm(nn.BatchNorm2d(4), i) for i in (2, 3)
            )

        def forward(self, x):
            out = self.fc_bn(self.fc(x.flatten(1))).reshape(x.shape[0], *self.out_shape)
            for conv, bn in zip(self.convs, self.bns, strict=True):
                out = out + bn(conv(x))
            return out

    model, x = seeded(WithNorms()), randn(4, 3, 5, 4)
    gm = graph_of(model, x)
    for pass_fn in (fold_conv_bn, fold_linear_bn, merge_conv_into_linear):
        gm = pass_fn(gm).graph_module
    assert count_ops(gm, *CONV_OPS) == 0 and count_ops(gm, aten.batch_norm) == 0
    assert_equivalent(model, gm, (x,), n_random=1)


def test_optimize_with_merge_conv_into_linear_matches_eager():
    model, x = seeded(FcPlusConvs()), randn(4, 3, 5, 4)
    opt = fxopt.optimize(model, x, passes=["merge_conv_into_linear"])
    assert "merge_conv_into_linear" not in opt.report.rolled_back
    assert "conv2d" not in opt.report.after.op_counts
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["repmlp_net", "dbb_net", "vit_adapter_net"])
def test_merge_conv_into_linear_after_bn_folding_keeps_zoo_models_equivalent(name):
    if name not in fxopt.models.list():
        pytest.skip(f"{name} is not in the zoo")
    model = fxopt.models.create(name)
    (x,) = fxopt.models.example_inputs(name, batch=2)
    gm = graph_of(model, x, dynamic_batch=True)
    for pass_fn in (fold_conv_bn, fold_linear_bn, merge_conv_into_linear):
        gm = pass_fn(gm).graph_module
    for inputs in ((x,), fxopt.models.example_inputs(name, batch=3, seed=3)):
        assert_equivalent(model, gm, inputs)
    if name == "repmlp_net":  # the conv branches of every unit join its FC
        assert count_ops(gm, *CONV_OPS) < count_ops(graph_of(model, x), *CONV_OPS)


# -- property ------------------------------------------------------------------------------------

# A symbolic batch doubles the capture time; a quarter of the examples is enough to cover it.
SOMETIMES_DYNAMIC = st.sampled_from([False, False, False, True])


@st.composite
def fc_conv_blocks(draw):
    """(model, input, branches, convs left, symbolic batch): an FC (linear or grouped 1x1 conv)
    plus one conv of random geometry, or several size-keeping ones, on 1-, 2- or 3-D samples,
    joined in any style, with random biases and groups."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    fc = draw(st.sampled_from(["linear", "conv"]))
    fc_groups = draw(st.sampled_from([1, groups])) if fc == "conv" else 1
    channels, out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    count = draw(st.integers(1, 3))
    branches = []
    for _ in range(count):
        bias = draw(st.booleans())
        if count == 1:
            kernel, stride, dilation = (
                draw(st.integers(1, 3)),
                draw(st.integers(1, 2)),
                draw(st.integers(1, 2)),
            )
            reach = dilation * (kernel - 1) + 1  # the padded input must cover one dilated kernel
            padding = max(draw(st.integers(0, 2)), math.ceil((reach - min(spatial)) / 2))
        else:
            kernel, stride, dilation = draw(st.sampled_from([1, 3])), 1, draw(st.integers(1, 2))
            padding = dilation * (kernel // 2)
        branches.append(
            {
                "kernel_size": kernel,
                "stride": stride,
                "padding": padding,
                "dilation": dilation,
                "groups": groups,
                "bias": bias,
            }
        )
    style = draw(st.sampled_from(["chained", "inplace", "summed", "conv-first"]))
    seed = draw(st.integers(0, 2**16))
    model = FcPlusConvs(channels, out, spatial, branches, fc, fc_groups, draw(st.booleans()), style)
    x = randn(draw(st.integers(1, 3)), channels, *spatial, seed=seed)
    return seeded(model, seed), x, count, int(fc == "conv"), draw(SOMETIMES_DYNAMIC)


def check_fc_conv_block(case):
    model, x, branches, convs_left, dynamic = case
    result = apply_pass(merge_conv_into_linear, model, x, dynamic_batch=dynamic)
    # a conv on a one-position sample is an FC itself, so a sum of branches may merge in steps
    assert 1 <= result.applied["fc-conv"] <= branches
    assert count_ops(result.graph_module, *CONV_OPS) == convs_left
    assert count_ops(result.graph_module, aten.add, aten.add_) == 0


@settings(max_examples=150, deadline=None)
@given(fc_conv_blocks())
def test_merge_conv_into_linear_property_random_fc_conv_blocks_merge_and_match_eager(case):
    check_fc_conv_block(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(fc_conv_blocks())
def test_merge_conv_into_linear_property_random_fc_conv_blocks_slow(case):
    check_fc_conv_block(case)


# -- idempotence ---------------------------------------------------------------------------------


def test_merge_conv_into_linear_is_idempotent():
    gm = graph_of(seeded(PartitionedRepMLP()), randn(2, 2, 8, 8))
    gm = merge_conv_into_linear(gm).graph_module
    again = merge_conv_into_linear(gm)
    assert not again.modified and again.applied == {}


# -- declines ------------------------------------------------------------------------------------


class ConvOnTransposedInput(FcPlusConvs):
    """The conv reads the sample with H and W swapped: not the FC's row-major features."""

    def forward(self, x):
        out = self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape)
        return out + self.convs[0](x.transpose(2, 3))


class ConvOutputTransposed(FcPlusConvs):
    def forward(self, x):
        out = self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape)
        return out + self.convs[0](x).transpose(2, 3)


class ReluOnBranch(FcPlusConvs):
    def forward(self, x):
        return self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape) + F.relu(self.convs[0](x))


class ConvOutputShared(FcPlusConvs):
    def forward(self, x):
        branch = self.convs[0](x)
        return self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape) + branch, branch


class FcOutputShared(FcPlusConvs):
    def forward(self, x):
        fc_out = self.fc(x.flatten(1))
        return fc_out.reshape(x.shape[0], *self.out_shape) + self.convs[0](x), fc_out


class SharedConvWeight(FcPlusConvs):
    def forward(self, x):
        out = self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape)
        return out + self.convs[0](x) + self.convs[0](x)


class ConvWeightFromInput(FcPlusConvs):
    def forward(self, x, w):
        return self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape) + F.conv2d(x, w)


class ConvOnAnotherInput(FcPlusConvs):
    def forward(self, x, y):
        return self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape) + self.convs[0](y)


class TransposedConvBranch(FcPlusConvs):
    def __init__(self):
        super().__init__(branches=[{"kernel_size": 1}])
        self.up = nn.ConvTranspose2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.fc(x.flatten(1)).reshape(x.shape[0], *self.out_shape) + self.up(x)


square = randn(2, 3, 4, 4)
one_branch = [{"kernel_size": 3, "padding": 1}]
DECLINES = {
    "conv-input-transposed": (
        ConvOnTransposedInput(spatial=(4, 4), branches=one_branch),
        (square,),
    ),
    "conv-output-transposed": (
        ConvOutputTransposed(spatial=(4, 4), branches=one_branch),
        (square,),
    ),
    "relu-on-conv-branch": (ReluOnBranch(branches=one_branch), (randn(2, 3, 5, 4),)),
    "conv-output-shared": (ConvOutputShared(branches=one_branch), (randn(2, 3, 5, 4),)),
    "fc-output-shared": (FcOutputShared(branches=one_branch), (randn(2, 3, 5, 4),)),
    "shared-conv-weight": (SharedConvWeight(branches=one_branch), (randn(2, 3, 5, 4),)),
    "conv-weight-from-input": (
        ConvWeightFromInput(branches=[{"kernel_size": 1}]),
        (randn(2, 3, 5, 4), randn(4, 3, 1, 1, seed=1)),
    ),
    "conv-on-another-input": (
        ConvOnAnotherInput(branches=one_branch),
        (randn(2, 3, 5, 4), randn(2, 3, 5, 4, seed=1)),
    ),
    "transposed-conv-branch": (TransposedConvBranch(), (randn(2, 3, 5, 4),)),
    # a 2-group FC cannot take a conv that mixes all channels
    "conv-mixes-fc-groups": (
        FcPlusConvs(4, 2, (3, 3), one_branch, fc="conv", fc_groups=2),
        (randn(2, 4, 3, 3),),
    ),
}


@pytest.mark.parametrize("name", DECLINES)
def test_merge_conv_into_linear_declines_when_precondition_fails(name):
    model, inputs = DECLINES[name]
    model = seeded(model)
    gm = graph_of(model, *inputs)
    code = gm.code
    result = merge_conv_into_linear(gm)
    assert not result.modified and result.applied == {}
    assert result.graph_module.code == code
    torch.testing.assert_close(result.graph_module(*inputs), model(*inputs))


def test_a_naive_merge_of_a_conv_on_a_transposed_input_is_wrong():
    """The layout check is not caution: the conv's matrix acts on (C, H, W) features, and the
    FC reads them with H and W swapped."""
    model = seeded(ConvOnTransposedInput(spatial=(4, 4), branches=one_branch))
    conv = model.convs[0]
    matrix = conv_as_matrix(conv.weight.detach(), (4, 4), (1, 1), (1, 1), (1, 1), 1)[0]
    weight = model.fc.weight.detach() + matrix.float()
    bias = model.fc.bias.detach() + conv_bias_as_vector(conv.bias.detach(), 16).float()
    naive = F.linear(square.flatten(1), weight, bias).reshape(model(square).shape)
    assert (naive - model(square)).abs().max() > 1e-2


def test_merge_conv_into_linear_declines_on_a_symbolic_spatial_size():
    model, x = seeded(FcPlusConvs(branches=one_branch)), randn(2, 3, 5, 4)
    gm = graph_of(model, x)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    dynamic = [DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.DYNAMIC]
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        placeholder.meta["val"] = mode.from_tensor(
            x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic)
        )
    assert not isinstance(placeholder.meta["val"].shape[2], int)
    result = merge_conv_into_linear(gm)
    assert not result.modified and result.applied == {}


def test_merge_conv_into_linear_declines_above_the_weight_cap(monkeypatch):
    model, x = seeded(FcPlusConvs()), randn(2, 3, 5, 4)
    monkeypatch.setattr(module, "MAX_WEIGHT_ELEMENTS", 60 * 80 - 1)  # the FC is 80 x 60
    assert merge_conv_into_linear(graph_of(model, x)).applied == {}
    monkeypatch.setattr(module, "MAX_WEIGHT_ELEMENTS", 60 * 80)
    assert merge_conv_into_linear(graph_of(model, x)).applied == {"fc-conv": 2}


def test_merge_conv_into_linear_leaves_the_model_untouched():
    model = seeded(FcPlusConvs())
    state = copy.deepcopy(model.state_dict())
    apply_pass(merge_conv_into_linear, model, randn(2, 3, 5, 4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
