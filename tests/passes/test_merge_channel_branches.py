import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.channel_math import concat_biases, depthwise_weight
from fxopt.analysis.cost import Cost, conv_cost, roofline, static_cost
from fxopt.ir.graph import is_op
from fxopt.passes.merge_channel_branches import merge_channel_branches
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
ZOO = ("inceptionnext_atto_like", "vit_adapter_net")


class InceptionDW(nn.Module):
    """InceptionNeXt's token mixer: identity, a square and two band depthwise convs, each on a
    group of channels, concatenated back."""

    def __init__(self, channels=16, square=3, band=11, ratio=0.125, bias=True):
        super().__init__()
        g = int(channels * ratio)
        self.hw = nn.Conv2d(g, g, square, padding=square // 2, groups=g, bias=bias)
        self.w = nn.Conv2d(g, g, (1, band), padding=(0, band // 2), groups=g, bias=bias)
        self.h = nn.Conv2d(g, g, (band, 1), padding=(band // 2, 0), groups=g, bias=bias)
        self.sizes = (channels - 3 * g, g, g, g)

    def forward(self, x):
        x_id, x_hw, x_w, x_h = torch.split(x, self.sizes, dim=1)
        return torch.cat((x_id, self.hw(x_hw), self.w(x_w), self.h(x_h)), dim=1)


class Branches(nn.Module):
    """cat(branch_i(piece_i)) along `axis`, the pieces consecutive channel groups of x of
    `sizes` from channel `start` (cut by split, chunk or slicing), or x itself (sizes=None)."""

    def __init__(self, branches, sizes=None, slicing="split", axis=1, start=0):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.sizes, self.slicing, self.axis, self.start = sizes, slicing, axis, start

    def pieces(self, x):
        if self.sizes is None:
            return [x] * len(self.branches)
        whole = self.start == 0 and sum(self.sizes) == x.shape[self.axis]
        if self.slicing == "split" and whole:
            return torch.split(x, list(self.sizes), self.axis)
        if self.slicing == "chunk" and whole:
            return x.chunk(len(self.sizes), self.axis)
        if self.slicing == "reversed":  # consecutive groups, taken last first
            return self.cut(x, self.sizes[::-1])[::-1]
        return self.cut(x, self.sizes, gap=int(self.slicing == "gap"))

    def cut(self, x, sizes, gap=0):
        ends = [self.start + e + i * gap for i, e in enumerate(itertools.accumulate(sizes))]
        if self.slicing == "narrow":
            return [x.narrow(self.axis, e - n, n) for e, n in zip(ends, sizes, strict=True)]
        lead = (slice(None),) * self.axis
        return [x[(*lead, slice(e - n, e))] for e, n in zip(ends, sizes, strict=True)]

    def forward(self, x):
        pieces = self.pieces(x)
        return torch.cat([b(p) for b, p in zip(self.branches, pieces, strict=True)], self.axis)


def dw(channels, kernel, dims=2, **kwargs):
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    dilation = kwargs.pop("dilation", 1)
    padding = kwargs.pop("padding", tuple(dilation * (k - 1) // 2 for k in kernel))
    return CONV[dims](
        channels, channels, kernel, padding=padding, dilation=dilation, groups=channels, **kwargs
    )


def only_conv(gm):
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and is_op(n, *CONV_OPS)]
    return node


def x2d(channels=16, batch=2, size=8):
    return torch.randn(batch, channels, size, size)


# structural and numerical


def test_merge_channel_branches_turns_3x3_and_identity_into_one_depthwise_conv():
    model = Branches([nn.Identity(), dw(4, 3)], sizes=[12, 4])
    result = apply_pass(merge_channel_branches, model, x2d())
    gm = result.graph_module
    assert result.applied == {"split-dw-branches": 1}
    assert count_ops(gm, *CONV_OPS) == 1 and count_ops(gm, aten.cat, aten.split_with_sizes) == 0
    conv = only_conv(gm)
    assert conv.args[6] == 16 and tuple(conv.args[1].meta["val"].shape) == (16, 1, 3, 3)


@pytest.mark.parametrize(
    ("band", "size", "merges"), [(3, 8, True), (11, 8, True), (3, 64, True), (11, 64, False)]
)
def test_merge_channel_branches_merges_inceptionnext_bands_only_below_the_crossover(
    band, size, merges
):
    """1/8 of the channels in each of 3x3, 1xk, kx1. On small maps the three depthwise calls'
    fixed cost outweighs the merged kernel's extra work (measured: 236 us against 84 us at
    32x16x16); on 64x64 maps the 11x11 kernel's 2.7x work wins and the branches stay."""
    model, x = InceptionDW(band=band).eval(), x2d(size=size)
    if not merges:
        assert_declines(merge_channel_branches, model, x)
        return
    result = apply_pass(merge_channel_branches, model, x)
    assert result.applied == {"split-dw-branches": 1}
    assert count_ops(result.graph_module, *CONV_OPS) == 1
    assert tuple(only_conv(result.graph_module).args[4]) == (band // 2, band // 2)


def test_merge_channel_branches_writes_a_dilated_branch_out_as_a_dense_kernel():
    model = Branches([nn.Identity(), dw(8, 3, dilation=2, bias=False)], sizes=[8, 8])
    result = apply_pass(merge_channel_branches, model, x2d())
    assert result.applied == {"split-dw-branches": 1}
    conv = only_conv(result.graph_module)
    assert tuple(conv.args[1].meta["val"].shape) == (16, 1, 5, 5) and conv.args[2] is None


def test_merge_channel_branches_handles_an_unbatched_conv1d():
    model = Branches([dw(3, 3, dims=1), nn.Identity(), dw(2, 5, dims=1)], sizes=[3, 3, 2], axis=0)
    result = apply_pass(merge_channel_branches, model, torch.randn(8, 12))
    assert result.applied == {"split-dw-branches": 1}
    assert count_ops(result.graph_module, aten.conv1d) == 1


@pytest.mark.parametrize("slicing", ["split", "chunk", "slice", "narrow"])
@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_merge_channel_branches_turns_resnext_branches_into_one_grouped_conv(
    slicing, dynamic_batch
):
    # ResNeXt's 32 paths: one grouped call beats 32 small dense ones (a grouped conv's fixed
    # cost is about that of 7 dense calls on this CPU, so 3 paths stay as they are)
    branches = [nn.Conv2d(1, 2, 3, padding=1, stride=2) for _ in range(32)]
    model = Branches(branches, sizes=[1] * 32, slicing=slicing)
    result = apply_pass(merge_channel_branches, model, x2d(32), dynamic_batch=dynamic_batch)
    assert result.applied == {"grouped-branches": 1}
    conv = only_conv(result.graph_module)
    assert conv.args[6] == 32 and count_ops(result.graph_module, aten.cat) == 0


def test_merge_channel_branches_keeps_a_few_dense_branches_where_one_grouped_call_costs_more():
    branches = [nn.Conv2d(4, 6, 3, padding=1, stride=2) for _ in range(3)]
    assert_declines(merge_channel_branches, Branches(branches, sizes=[4, 4, 4]), x2d(12))


def test_merge_channel_branches_multiplies_the_groups_of_grouped_branches():
    branches = [nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=i != 1) for i in range(2)]
    result = apply_pass(merge_channel_branches, Branches(branches, sizes=[4, 4]), x2d(8))
    assert result.applied == {"grouped-branches": 1}
    assert only_conv(result.graph_module).args[6] == 4


def test_merge_channel_branches_slices_x_once_when_branches_cover_part_of_it():
    branches = [nn.Conv2d(1, 2, 1) for _ in range(24)]
    model = Branches(branches, sizes=[1] * 24, slicing="slice", start=4)
    result = apply_pass(merge_channel_branches, model, x2d(32))
    assert result.applied == {"grouped-branches": 1}
    assert count_ops(result.graph_module, aten.slice) == 1


def test_merge_channel_branches_sees_through_nested_slices():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = dw(4, 3), dw(4, 5)

        def forward(self, x):
            rest = x[:, 4:]
            return torch.cat([self.a(x[:, :4]), self.b(rest[:, :4]), rest[:, 4:]], 1)

    result = apply_pass(merge_channel_branches, Nested(), x2d(12), dynamic_batch=True)
    assert result.applied == {"split-dw-branches": 1}
    assert count_ops(result.graph_module, aten.slice, aten.cat) == 0


def test_merge_channel_branches_stacks_the_filters_of_convs_on_the_same_x():
    branches = [nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1, bias=False)]
    result = apply_pass(merge_channel_branches, Branches(branches), x2d(8))
    assert result.applied == {"stacked-branches": 1}
    conv = only_conv(result.graph_module)
    assert tuple(conv.args[1].meta["val"].shape) == (10, 8, 3, 3)


@pytest.mark.parametrize("name", ZOO)
def test_merge_channel_branches_keeps_zoo_models_equivalent_after_fold_conv_bn(name):
    if name not in fxopt.models.list():
        pytest.skip(f"{name} is not in the zoo yet")
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    opt = fxopt.optimize(model, inputs, passes=["fold_conv_bn", "merge_channel_branches"])
    assert opt.report.rolled_back == []
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)


def test_merge_channel_branches_is_idempotent():
    model = Branches([nn.Identity(), dw(4, 3), dw(4, 5)], sizes=[8, 4, 4])
    gm = merge_channel_branches(graph_of(model.eval(), x2d())).graph_module
    again = merge_channel_branches(gm)
    assert not again.modified and again.applied == {}


# declines


class WeightFromInput(nn.Module):
    def forward(self, x, w):
        a, b = torch.split(x, [12, 4], 1)
        return torch.cat([a, F.conv2d(b, w, padding=1, groups=4)], 1)


class SecondUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = dw(4, 3)

    def forward(self, x):
        a, b = torch.split(x, [12, 4], 1)
        y = self.dw(b)
        return torch.cat([a, y], 1), y


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x[:, :4]), self.b(x[:, 4:8] * 2)], 1)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(p) for p in x.chunk(3, 1)], 1)


DECLINES = {  # name: (model, channels of x)
    "non-depthwise-branch": (Branches([nn.Identity(), nn.Conv2d(4, 4, 3, padding=1)], [12, 4]), 16),
    "strided-depthwise-branches": (Branches([dw(8, 3, stride=2), dw(8, 5, stride=2)], [8, 8]), 16),
    "even-kernel-same-padding": (Branches([nn.Identity(), dw(4, 2, padding="same")], [12, 4]), 16),
    "different-kernels": (
        Branches([nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)], [8, 8]),
        16,
    ),
    "different-strides": (
        Branches([nn.Conv2d(8, 4, 3), nn.Conv2d(8, 4, 3, stride=2, padding=3)]),
        8,
    ),
    "out-of-order": (Branches([nn.Identity(), dw(4, 3)], [12, 4], slicing="reversed"), 16),
    "a-gap-between-slices": (Branches([nn.Identity(), dw(4, 3)], [4, 4], slicing="gap"), 16),
    "conv-output-has-another-user": (SecondUser(), 16),
    "different-inputs": (TwoInputs(), 16),
    "shared-weight": (SharedConv(), 12),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("model", "channels"), DECLINES.values(), ids=DECLINES.keys())
def test_merge_channel_branches_declines_when_precondition_fails(model, channels):
    assert_declines(merge_channel_branches, model, x2d(channels))


def test_merge_channel_branches_declines_when_weight_is_not_constant():
    gm = graph_of(WeightFromInput(), x2d(), torch.randn(4, 1, 3, 3))
    assert not merge_channel_branches(gm).modified


# the pure math


def test_depthwise_weight_equals_the_branches_side_by_side():
    x = torch.randn(2, 7, 9, 9, dtype=torch.float64)
    band = torch.randn(3, 1, 1, 5, dtype=torch.float64)
    square = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    weight = depthwise_weight([2, band, square], (5, 5), torch.float64)
    merged = F.conv2d(x, weight, padding=2, groups=7)
    expected = torch.cat(
        [
            x[:, :2],
            F.conv2d(x[:, 2:5], band, padding=(0, 2), groups=3),
            F.conv2d(x[:, 5:], square, padding=1, groups=2),
        ],
        1,
    )
    torch.testing.assert_close(merged, expected)


def test_concat_biases_fills_zeros_and_keeps_none_when_no_branch_has_one():
    assert concat_biases([None, None], [2, 3]) is None
    bias = concat_biases([None, torch.ones(2)], [3, 2])
    assert bias.tolist() == [0, 0, 0, 1, 1]


def test_conv_cost_agrees_with_static_cost_of_the_conv_it_plans():
    conv = nn.Conv2d(6, 4, (3, 5), stride=2, padding=1)
    gm = graph_of(conv, torch.randn(2, 6, 9, 9))
    (node,) = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    out = node.meta["val"]
    planned = conv_cost(out.shape, conv.weight.shape, True, 2 * 6 * 81, 4)
    assert planned == static_cost([node])


def test_roofline_charges_the_slower_of_compute_and_memory_plus_the_call():
    assert roofline(Cost(flops=80, bytes=4), overhead=0) == 10
    assert roofline(Cost(flops=8, bytes=40), overhead=0) == 40
    assert roofline(Cost(flops=8, bytes=40), overhead=5) == 45


# properties


@st.composite
def branch_cases(draw):
    """(model, x, kind): InceptionNeXt-like splits, ResNeXt-like slices, or stacked filters."""
    kind = draw(st.sampled_from(["split-dw", "grouped", "stacked"]))
    dims = draw(st.sampled_from([1, 2]))
    bias = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    slicing = draw(st.sampled_from(["split", "slice", "narrow"]))
    if kind == "split-dw":
        count = draw(st.integers(2, 4))
        sizes = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
        branches = []
        for i, size in enumerate(sizes):
            if i and draw(st.booleans()) or i == count - 1:
                kernel = draw(st.tuples(*[st.sampled_from([1, 3, 5])] * dims))
                dilation = draw(st.sampled_from([1, 2]))
                branches.append(dw(size, kernel, dims, dilation=dilation, bias=bias[i]))
            else:
                branches.append(nn.Identity())
        model = Branches(branches, sizes, slicing, start=draw(st.integers(0, 1)))
    else:
        count, groups = draw(st.integers(2, 3)), draw(st.sampled_from([1, 2]))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
        kernel, stride = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 2))
        padding, dilation = draw(st.integers(0, 1)), draw(st.integers(1, 2))
        if kind == "stacked":
            groups, outs = 1, draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
        else:
            outs = [cout] * count
        branches = [
            CONV[dims](cin, o, kernel, stride, padding, dilation, groups, bias=bias[i])
            for i, o in enumerate(outs)
        ]
        sizes = None if kind == "stacked" else [cin] * count
        model = Branches(branches, sizes, slicing, start=draw(st.integers(0, 1)))
    if sizes is None:
        channels = cin
    else:
        channels = model.start + sum(sizes) + draw(st.integers(0, 1))
    size = draw(st.integers(5, 8))
    batch = draw(st.sampled_from([1, 2]))
    x = torch.randn(batch, channels, *(size,) * dims)
    return model.eval(), x, kind


def check_branch_case(case):
    model, x, kind = case
    result = apply_pass(merge_channel_branches, model, x)
    # the same FLOPs without the cat's copy and no more grouped-conv calls: always cheaper
    if kind == "stacked" or (kind == "grouped" and model.branches[0].groups > 1):
        assert sum(result.applied.values()) == 1
    if result.modified:
        assert count_ops(result.graph_module, *CONV_OPS) == 1
        assert count_ops(result.graph_module, aten.cat) == 0
    assert not merge_channel_branches(result.graph_module).modified


@settings(max_examples=150, deadline=None)
@given(branch_cases())
def test_merge_channel_branches_property_random_branches_match_eager(case):
    check_branch_case(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(branch_cases())
def test_merge_channel_branches_property_random_branches_match_eager_slow(case):
    check_branch_case(case)
