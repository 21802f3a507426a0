import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.ir.graph import clean
from fxopt.models.inceptionnext import InceptionDWConv2d
from fxopt.passes.merge_channel_branches import merge_channel_branches
from fxopt.passes.split_channel_kernels import (
    IDENTITY,
    Segment,
    channel_supports,
    runs,
    split_channel_kernels,
)
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d)


def merged_conv(supports, band=11, bias=True, identity_bias=False, seed=0) -> nn.Conv2d:
    """A depthwise band x band conv, channel i zero outside the centred box `supports[i]`
    (IDENTITY: a delta of weight 1 and, unless `identity_bias`, no bias)."""
    gen = torch.Generator().manual_seed(seed)
    channels = len(supports)
    conv = nn.Conv2d(channels, channels, band, padding=band // 2, groups=channels, bias=bias)
    weight = torch.zeros(channels, 1, band, band)
    centre = band // 2
    for i, support in enumerate(supports):
        if support == IDENTITY:
            weight[i, 0, centre, centre] = 1
            continue
        h, w = support
        box = torch.randn(h, w, generator=gen) + 0.5
        weight[
            i, 0, centre - h // 2 : centre + h // 2 + 1, centre - w // 2 : centre + w // 2 + 1
        ] = box
    conv.weight.data = weight
    if bias:
        conv.bias.data = torch.randn(channels, generator=gen)
        if not identity_bias:
            conv.bias.data[[s == IDENTITY for s in supports]] = 0
    return conv.eval()


def inception_supports(channels=32, band=11):
    group = channels // 8
    return (
        [IDENTITY] * (channels - 3 * group)
        + [(3, 3)] * group
        + [(1, band)] * group
        + [(band, 1)] * group
    )


def x2d(channels=32, batch=2, size=64):
    return torch.randn(batch, channels, size, size)


def kernel_shapes(gm):
    return sorted(
        tuple(n.args[1].meta["val"].shape)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in {op.default for op in CONV_OPS}
    )


# structural and numerical


def test_split_channel_kernels_splits_inceptionnext_merged_kernel_on_a_64x64_map():
    result = apply_pass(split_channel_kernels, merged_conv(inception_supports()), x2d())
    gm = result.graph_module
    assert result.applied == {"split-dw-kernel": 1}
    assert count_ops(gm, aten.split_with_sizes) == 1 and count_ops(gm, aten.cat) == 1
    # the 20 identity channels pass through; no conv keeps the 11x11 kernel
    convs = kernel_shapes(gm)
    assert sum(shape[0] for shape in convs) == 12
    assert all(shape[2:] != (11, 11) for shape in convs) and len(convs) == count_ops(gm, *CONV_OPS)


def test_split_channel_kernels_shrinks_a_kernel_whose_channels_all_have_a_smaller_support():
    result = apply_pass(split_channel_kernels, merged_conv([(3, 3)] * 8), x2d(8))
    gm = result.graph_module
    assert result.applied == {"split-dw-kernel": 1}
    assert kernel_shapes(gm) == [(8, 1, 3, 3)] and count_ops(gm, aten.cat) == 0


def test_split_channel_kernels_removes_a_depthwise_identity():
    result = apply_pass(split_channel_kernels, merged_conv([IDENTITY] * 8, 5), x2d(8, size=8))
    assert result.applied == {"split-dw-kernel": 1}
    assert count_ops(result.graph_module, *CONV_OPS) == 0


@pytest.mark.parametrize("name", ["inceptionnext_merged_large_map", "inceptionnext_atto_like"])
def test_split_channel_kernels_keeps_zoo_models_equivalent(name):
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    passes = ["fold_constants", "fold_conv_bn", "merge_channel_branches", "split_channel_kernels"]
    opt = fxopt.optimize(model, inputs, passes=passes)
    records = {record.name: record for record in opt.report.passes}
    assert opt.report.rolled_back == []
    if name == "inceptionnext_merged_large_map":  # the masked 11x11 kernel splits at 64x64
        assert records["split_channel_kernels"].applied == {"split-dw-kernel": 1}
        assert count_ops(opt.graph_module, aten.cat) == 1
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)
    opt = fxopt.optimize(model, inputs, passes=[*DEFAULT_PIPELINE, "split_channel_kernels"])
    assert opt.report.rolled_back == []
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)


def test_split_channel_kernels_is_idempotent():
    gm = graph_of(merged_conv(inception_supports()), x2d())
    once = split_channel_kernels(gm)
    assert once.modified
    again = split_channel_kernels(once.graph_module)
    assert not again.modified and again.applied == {}


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("start", ["branches", "merged"])
@pytest.mark.parametrize("first", [0, 1])
def test_split_and_merge_never_undo_each_other(size, start, first):
    """Alternating the two passes from either form reaches a fixed point within one round
    trip, and the result still computes the block."""
    block = InceptionDWConv2d(32).eval()
    model = block if start == "branches" else merged_conv(inception_supports(), seed=size)
    x = x2d(size=size)
    gm = graph_of(model, x)
    order = [split_channel_kernels, merge_channel_branches]
    order = order[first:] + order[:first]
    changes = []
    for pass_fn in itertools.islice(itertools.cycle(order), 8):
        result = pass_fn(gm)
        gm = result.graph_module
        clean(gm)
        changes.append(result.modified)
    assert not any(changes[3:])
    fxopt.testing.assert_equivalent(model, gm, (x,))


# declines


class WeightFromInput(nn.Module):
    def forward(self, x, w):
        return F.conv2d(x, w, padding=2, groups=8)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = merged_conv([(3, 3)] * 8, band=5)

    def forward(self, x):
        return self.conv(x) + self.conv(x * 2)


def strided():
    conv = merged_conv([(3, 3)] * 8, band=5)
    conv.stride = (2, 2)
    return conv


DECLINES = {  # name: (model, input shape)
    "full-supports": (merged_conv([(11, 11)] * 32, seed=1), (2, 32, 64, 64)),
    "small-map-favours-the-merged-kernel": (merged_conv(inception_supports()), (2, 32, 16, 16)),
    "strided": (strided(), (1, 8, 9, 9)),
    "not-depthwise": (nn.Conv2d(8, 8, 5, padding=2, groups=4), (1, 8, 9, 9)),
    "not-same-padded": (nn.Conv2d(8, 8, 5, padding=1, groups=8), (1, 8, 9, 9)),
    "shared-weight": (SharedWeight(), (1, 8, 9, 9)),
    "unbatched": (merged_conv([(3, 3)] * 8, band=5), (8, 9, 9)),
}


@pytest.mark.parametrize(("model", "shape"), DECLINES.values(), ids=DECLINES.keys())
def test_split_channel_kernels_declines_when_precondition_fails(model, shape):
    assert_declines(split_channel_kernels, model, torch.randn(shape))


def test_split_channel_kernels_declines_when_weight_is_not_constant():
    gm = graph_of(WeightFromInput(), x2d(8, size=8), torch.randn(8, 1, 5, 5))
    assert not split_channel_kernels(gm).modified


def test_split_channel_kernels_treats_a_biased_delta_as_a_1x1_conv_not_an_identity():
    conv = merged_conv([IDENTITY] * 8, identity_bias=True)
    result = apply_pass(split_channel_kernels, conv, x2d(8))
    assert kernel_shapes(result.graph_module) == [(8, 1, 1, 1)]


# the pure math


def test_channel_supports_and_runs_find_the_inceptionnext_groups():
    conv = merged_conv(inception_supports(16, band=7), band=7)
    supports = channel_supports(conv.weight.data, conv.bias.data)
    assert runs(supports) == [
        Segment(0, 10, IDENTITY),
        Segment(10, 12, (3, 3)),
        Segment(12, 14, (1, 7)),
        Segment(14, 16, (7, 1)),
    ]


# properties


@st.composite
def depthwise_cases(draw):
    """A merged depthwise conv with random per-group supports and a map to run it on."""
    band = draw(st.sampled_from([3, 5, 7, 11]))
    boxes = st.tuples(*[st.sampled_from([s for s in (1, 3, 5, 7, 11) if s <= band])] * 2)
    groups = draw(st.lists(st.one_of(st.just(IDENTITY), boxes), min_size=1, max_size=4))
    sizes = draw(st.lists(st.integers(1, 6), min_size=len(groups), max_size=len(groups)))
    supports = [s for s, n in zip(groups, sizes, strict=True) for _ in range(n)]
    conv = merged_conv(supports, band, bias=draw(st.booleans()), seed=draw(st.integers(0, 99)))
    size = draw(st.sampled_from([4, 8, 16, 48]))
    return conv, torch.randn(draw(st.integers(1, 2)), len(supports), size, size)


@settings(max_examples=25, deadline=None)
@given(depthwise_cases())
def test_split_channel_kernels_property_random_supports_match_eager(case):
    conv, x = case
    result = apply_pass(split_channel_kernels, conv, x)
    gm = result.graph_module
    assert sum(result.applied.values()) == int(result.modified)
    if result.modified:  # never a kernel larger than the channels' supports need
        shapes = kernel_shapes(gm)
        assert sum(math.prod(shape) for shape in shapes) < conv.weight.numel()
        assert not merge_channel_branches(gm).modified
    assert not split_channel_kernels(gm).modified


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(depthwise_cases())
def test_split_channel_kernels_property_random_supports_match_eager_at_length(case):
    test_split_channel_kernels_property_random_supports_match_eager.hypothesis.inner_test(case)
