from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.decompose_math import (
    Factors,
    compose_separable,
    numerical_rank,
    rank_exceeds,
    separable_factors,
)
from fxopt.passes import split_separable_kernels as split_module
from fxopt.passes.split_separable_kernels import split_separable_kernels
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten


class FixedConv(nn.Module):
    """F.conv2d with a fixed weight (a buffer, as a filter bank's kernels are)."""

    def __init__(self, weight, bias=None, **options):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.options = options

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, **self.options)


def low_rank(out, per_group, kh, kw, rank, groups=1, seed=0):
    """A (out, per_group, kh, kw) kernel whose every group has rank `rank`."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(groups * rank, per_group, 1, kw, generator=generator)
    second = torch.randn(out, rank, kh, 1, generator=generator)
    return compose_separable(Factors(first, second, rank, "w"), groups)


def gaussian(size, sigma):
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    return g / g.sum()


def convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_TARGETS]


CONV_TARGETS = (aten.conv2d.default, aten.conv2d.padding)


def kernel_shape(node):
    return tuple(node.args[1].meta["val"].shape)


def splits(model, x) -> bool:
    return split_separable_kernels(graph_of(model.eval(), x)).modified


# the tensor math


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("order", ["w", "h"])
def test_separable_factors_compose_back_to_the_kernel(groups, order):
    kernel = low_rank(8, 4 // groups * 2, 3, 5, rank=2, groups=groups)
    factors = separable_factors(kernel, groups, order)
    assert factors.rank == 2 or order == "h"  # the other reading of the kernel has its own rank
    torch.testing.assert_close(compose_separable(factors, groups), kernel, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([1, 2, 4]),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(2, 5),
    st.integers(2, 5),
    st.integers(1, 12),
    st.sampled_from(["w", "h"]),
    st.integers(0, 2**16),
)
def test_rank_exceeds_never_claims_more_than_the_rank_the_svd_finds(
    groups, out_per_group, per_group, kh, kw, rank, order, seed
):
    rank = min(rank, out_per_group * kh, per_group * kw)
    kernel = low_rank(out_per_group * groups, per_group, kh, kw, rank, groups, seed)
    exact = separable_factors(kernel, groups, order).rank
    claimed = [
        r
        for r in range(out_per_group * kh * per_group * kw)
        if rank_exceeds(kernel, groups, r, order)
    ]
    assert all(r < exact for r in claimed)


def test_rank_exceeds_settles_a_dense_kernel_without_an_svd():
    kernel = torch.randn(64, 64, 3, 3)
    with mock.patch("torch.linalg.svd", side_effect=AssertionError("no SVD")):
        assert rank_exceeds(kernel, 1, 95, "w") and rank_exceeds(kernel, 1, 95, "h")
    assert not rank_exceeds(low_rank(64, 64, 3, 3, rank=8), 1, 8)


def test_numerical_rank_sees_through_fp32_rounding_but_not_a_real_second_component():
    g = gaussian(7, 1.5)
    kernel = (g[:, None] * g[None, :]).float()  # rank 1, then rounded to fp32
    eps = torch.finfo(torch.float32).eps
    assert numerical_rank(torch.linalg.svdvals(kernel.double()), eps) == 1
    perturbed = kernel.double() + 1e-4 * torch.outer(torch.ones(7), torch.arange(7.0))
    assert numerical_rank(torch.linalg.svdvals(perturbed), eps) == 2
    assert numerical_rank(torch.zeros(3), eps) == 0


# structural and numerical


def test_split_separable_kernels_splits_a_colour_gaussian_blur_into_two_band_convs():
    mix = torch.eye(3) * 0.7 + 0.1
    g = gaussian(5, 1.0)
    weight = (mix[:, :, None, None] * (g[:, None] * g[None, :])).float()
    model = FixedConv(weight, torch.randn(3), padding=2)
    result = apply_pass(split_separable_kernels, model, torch.randn(2, 3, 64, 64))
    assert result.applied == {"split-separable": 1}
    first, second = convs(result.graph_module)
    assert {kernel_shape(first), kernel_shape(second)} == {(3, 3, 1, 5), (3, 3, 5, 1)}
    assert first.args[2] is None and second.args[2] is not None
    pads = [list(first.args[4]), list(second.args[4])]
    assert pads in ([[0, 2], [2, 0]], [[2, 0], [0, 2]])


def test_split_separable_kernels_gives_a_large_rank_1_depthwise_kernel_channel_multiplier_1():
    weight = low_rank(32, 1, 31, 31, rank=1, groups=32)
    model = FixedConv(weight, padding=15, groups=32)
    result = apply_pass(split_separable_kernels, model, torch.randn(1, 32, 32, 32))
    assert result.applied == {"split-separable": 1}
    shapes = [kernel_shape(n) for n in convs(result.graph_module)]
    assert shapes in ([(32, 1, 1, 31), (32, 1, 31, 1)], [(32, 1, 31, 1), (32, 1, 1, 31)])
    assert all(n.args[6] == 32 for n in convs(result.graph_module))


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        (dict(padding="same"), (2, 16, 13, 11)),
        (dict(padding="valid", stride=(2, 3)), (2, 16, 13, 11)),
        (dict(padding=(1, 3), stride=(1, 2), dilation=(2, 3)), (2, 16, 13, 17)),
        (dict(padding=2, groups=4), (2, 16, 12, 12)),
        (dict(padding=2), (16, 12, 12)),  # unbatched
    ],
    ids=["same", "valid-strided", "dilated", "grouped", "unbatched"],
)
def test_split_separable_kernels_splits_padding_stride_and_dilation_per_axis(
    options, shape, monkeypatch
):
    groups = options.get("groups", 1)
    # grouped band convs are priced to decline (they ran slow); the split itself is exact
    monkeypatch.setattr(split_module, "split_price", lambda *args: 0.0)
    weight = low_rank(32, 16 // groups, 3, 5, rank=1, groups=groups)
    model = FixedConv(weight, torch.randn(32), **options)
    result = apply_pass(split_separable_kernels, model, torch.randn(shape))
    assert result.applied == {"split-separable": 1}
    assert count_ops(result.graph_module, aten.conv2d) == 2


@pytest.mark.parametrize(
    ("kernel", "rank", "expected"),
    [
        (3, 8, True),
        (3, 16, True),
        (3, 48, False),
        (5, 32, True),
        (5, 64, False),
        (7, 64, True),
        (7, 128, False),
    ],
)
def test_split_separable_kernels_follows_the_measured_crossover_for_dense_convs(
    kernel, rank, expected
):
    """32 -> 32 channels at 32x32 (measured split / one conv: 3x3 R 8 0.57, R 16 0.63, R 48
    1.41; 5x5 R 32 0.69, R 64 1.09; 7x7 R 64 0.75, R 128 1.32)."""
    model = FixedConv(low_rank(32, 32, kernel, kernel, rank), padding=kernel // 2)
    assert splits(model, torch.randn(1, 32, 32, 32)) == expected


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "rank", "expected"),
    [
        (64, 56, 7, 1, False),  # measured 1.19
        (64, 14, 7, 1, False),  # 1.82
        (3, 224, 5, 1, False),  # Gaussian on an RGB image: 1.20
        (64, 56, 7, 2, False),  # a channel multiplier: 9.4
        (64, 56, 17, 1, True),  # 0.13
    ],
)
def test_split_separable_kernels_follows_the_measured_crossover_for_depthwise_convs(
    channels, size, kernel, rank, expected
):
    weight = low_rank(channels, 1, kernel, kernel, rank, groups=channels)
    model = FixedConv(weight, padding=kernel // 2, groups=channels)
    assert splits(model, torch.randn(1, channels, size, size)) == expected


def test_split_separable_kernels_keeps_a_grouped_conv_where_band_convs_ran_slower():
    # 16 -> 32 channels in 4 groups, 3x5 of rank 1, batch 2 at 32x32: measured 1.17
    model = FixedConv(low_rank(32, 4, 3, 5, rank=1, groups=4), padding=(1, 2), groups=4)
    assert not splits(model, torch.randn(2, 16, 32, 32))


def test_split_separable_kernels_keeps_image_filter_net_equivalent():
    model = fxopt.models.create("image_filter_net")
    (x,) = fxopt.models.example_inputs("image_filter_net", batch=2)
    result = apply_pass(split_separable_kernels, model, x)
    assert result.applied == {"split-separable": 1}  # the dense colour blur; depthwise ones stay
    opt = fxopt.optimize(model, (x,))  # the default pipeline runs the pass
    assert opt.report.rolled_back == []
    records = [r for r in opt.report.passes if r.name == "split_separable_kernels"]
    assert [r.applied for r in records] == [{"split-separable": 1}]
    fxopt.testing.assert_equivalent(model, opt, (x,), n_random=1)


# property


@st.composite
def separable_convs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 3))
    out = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    rank = draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, kh)), draw(st.integers(0, kw)))
    weight = low_rank(out, per_group, kh, kw, rank, groups, seed=draw(st.integers(0, 99)))
    bias = torch.randn(out) if draw(st.booleans()) else None
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    size = draw(st.integers(2 * kh + 2, 16)), draw(st.integers(2 * kw + 2, 16))
    return FixedConv(weight, bias, **options), torch.randn(2, groups * per_group, *size), rank


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(separable_convs())
def test_split_separable_kernels_keeps_random_low_rank_convs_equivalent(case):
    """With the cost model out of the way, every kernel whose rank saves FLOPs splits, exactly."""
    model, x, rank = case
    out, per_group, kh, kw = model.weight.shape
    out_per_group = out // model.options["groups"]
    saves = rank * (per_group * kw + out_per_group * kh) < out_per_group * per_group * kh * kw
    with mock.patch.object(split_module, "split_price", lambda *args: 0.0):
        result = apply_pass(split_separable_kernels, model, x)
    assert result.applied == ({"split-separable": 1} if saves else {})
    assert count_ops(result.graph_module, aten.conv2d) == (2 if saves else 1)


def test_split_separable_kernels_is_idempotent():
    model = FixedConv(low_rank(16, 16, 5, 5, rank=2), padding=2)
    first = split_separable_kernels(graph_of(model.eval(), torch.randn(1, 16, 24, 24)))
    assert first.modified
    again = split_separable_kernels(first.graph_module)
    assert not again.modified and again.applied == {}


# declines


def test_split_separable_kernels_declines_a_full_rank_kernel():
    declined = assert_declines(
        split_separable_kernels,
        FixedConv(torch.randn(16, 16, 3, 3), padding=1),
        torch.randn(1, 16, 8, 8),
    ).declined
    assert "saves no FLOPs" in declined["split-separable"][0]


def test_split_separable_kernels_declines_a_large_dense_kernel_without_an_svd():
    model = FixedConv(torch.randn(128, 128, 3, 3), padding=1)
    with mock.patch.object(split_module, "separable_factors", side_effect=AssertionError):
        declined = assert_declines(
            split_separable_kernels, model, torch.randn(1, 128, 8, 8)
        ).declined
    (reason,) = declined["split-separable"]
    assert "or more: two band convs cost more than one 3x3 conv" in reason


def test_split_separable_kernels_declines_a_rank_that_does_not_pay():
    model = FixedConv(low_rank(32, 32, 3, 3, rank=32), padding=1)
    declined = assert_declines(split_separable_kernels, model, torch.randn(1, 32, 32, 32)).declined
    assert "cost more" in declined["split-separable"][0]


class WeightFromInput(nn.Module):
    def forward(self, x, weight):
        return F.conv2d(x, weight, padding=1)


class SharedWeight(FixedConv):
    def forward(self, x):
        return super().forward(x) + super().forward(2 * x)


def test_split_separable_kernels_declines_a_weight_that_is_not_a_constant():
    weight = low_rank(16, 16, 3, 3, rank=1)
    declined = assert_declines(
        split_separable_kernels, WeightFromInput(), torch.randn(1, 16, 16, 16), weight
    ).declined
    assert "not a constant" in declined["split-separable"][0]


def test_split_separable_kernels_declines_a_shared_weight():
    model = SharedWeight(low_rank(16, 16, 3, 3, rank=1), padding=1)
    assert_declines(split_separable_kernels, model, torch.randn(1, 16, 16, 16))


def test_split_separable_kernels_leaves_transposed_convs_alone():
    model = nn.ConvTranspose2d(16, 16, 3, padding=1)
    with torch.no_grad():
        model.weight.copy_(low_rank(16, 16, 3, 3, rank=1))
    assert_declines(split_separable_kernels, model, torch.randn(1, 16, 16, 16))


def test_split_separable_kernels_keeps_a_reflect_pad_in_front_of_the_split():
    """nn.Conv2d(padding_mode="reflect") is a reflect pad op, then a conv with no padding: the
    split applies to that conv and the pad stays, exact at the borders."""
    model = nn.Conv2d(16, 16, 5, padding=2, padding_mode="reflect", bias=False)
    with torch.no_grad():
        model.weight.copy_(low_rank(16, 16, 5, 5, rank=1))
    result = apply_pass(split_separable_kernels, model, torch.randn(1, 16, 24, 24))
    assert result.applied == {"split-separable": 1}
    first, second = convs(result.graph_module)
    assert list(first.args[4]) == [0, 0] and list(second.args[4]) == [0, 0]
    assert count_ops(result.graph_module, aten.pad, aten.reflection_pad2d) == 1


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(separable_convs())
def test_split_separable_kernels_keeps_random_low_rank_convs_equivalent_at_length(case):
    test_split_separable_kernels_keeps_random_low_rank_convs_equivalent.hypothesis.inner_test(case)
