import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, seeded
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.cost import conv_flops, linear_flops
from fxopt.analysis.sequential_math import (
    add_linears,
    compose_linears,
    dense_conv_weight,
    grouped_conv_weight,
    pointwise_after,
    pointwise_before,
)
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.passes.fold_linear_bn import fold_linear_bn
from fxopt.passes.merge_sequential_convs import merge_sequential_convs
from fxopt.testing import apply_pass, assert_equivalent, count_ops, graph_of
from fxopt.testing.strategies import randomize_batch_norm

aten = torch.ops.aten
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)


class SerialAdapter(nn.Module):
    """ZeroI2V's serial adapter after a host linear: h + scale * up(down(h)), h = host(x)."""

    def __init__(self, dim=16, rank=4, scale=0.5, inplace=False):
        super().__init__()
        self.host, self.down, self.up = (
            nn.Linear(dim, dim),
            nn.Linear(dim, rank),
            nn.Linear(rank, dim),
        )
        self.scale, self.inplace = scale, inplace

    def forward(self, x):
        h = self.host(x)
        if self.inplace:
            h += self.scale * self.up(self.down(h))
            return h
        return h + self.scale * self.up(self.down(h))


class ParallelAdapter(nn.Module):
    """ZeroI2V's parallel adapter beside a host linear: host(x) + up(down(x))."""

    def __init__(self, dim=16, out=24, rank=4, adapter_first=False):
        super().__init__()
        self.host, self.down, self.up = (
            nn.Linear(dim, out),
            nn.Linear(dim, rank),
            nn.Linear(rank, out),
        )
        self.adapter_first = adapter_first

    def forward(self, x):
        adapter = self.up(self.down(x))
        return adapter + self.host(x) if self.adapter_first else self.host(x) + adapter


# -- the tensor math, on its own ---------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [(1, 1), (2, 2), (2, 4), (4, 2), (2, 3), (6, 1)])
def test_pointwise_after_is_a_conv_then_a_1x1_conv(dims, groups):
    conv_groups, pointwise_groups = groups
    middle = math.lcm(*groups) * 2
    x = randn(2, 6 * conv_groups, *[6] * dims, dtype=torch.float64)
    w = randn(middle, 6, *[3] * dims, seed=1, dtype=torch.float64)
    b = randn(middle, seed=2, dtype=torch.float64)
    p = randn(3 * pointwise_groups, middle // pointwise_groups, *[1] * dims, seed=3).double()
    pb = randn(3 * pointwise_groups, seed=4, dtype=torch.float64)
    conv = CONV_FN[dims]
    geometry = {"stride": 2, "padding": 1, "dilation": 2}
    expected = conv(conv(x, w, b, groups=conv_groups, **geometry), p, pb, groups=pointwise_groups)
    weight, bias, merged_groups = pointwise_after(w, b, conv_groups, p, pb, pointwise_groups)
    assert merged_groups == math.gcd(*groups)
    torch.testing.assert_close(conv(x, weight, bias, groups=merged_groups, **geometry), expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [(1, 1), (2, 2), (2, 4), (3, 2)])
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False), (False, False)])
def test_pointwise_before_is_a_1x1_conv_then_an_unpadded_conv(dims, groups, biases):
    pointwise_groups, conv_groups = groups
    middle = math.lcm(*groups) * 2
    x = randn(2, 2 * pointwise_groups, *[7] * dims, dtype=torch.float64)
    p = randn(middle, 2, *[1] * dims, seed=1, dtype=torch.float64)
    pb = randn(middle, seed=2, dtype=torch.float64) if biases[0] else None
    w = randn(2 * conv_groups, middle // conv_groups, *[3] * dims, seed=3).double()
    b = randn(2 * conv_groups, seed=4, dtype=torch.float64) if biases[1] else None
    conv = CONV_FN[dims]
    expected = conv(conv(x, p, pb, groups=pointwise_groups), w, b, stride=2, groups=conv_groups)
    weight, bias, merged_groups = pointwise_before(p, pb, pointwise_groups, w, b, conv_groups)
    assert (bias is None) == (pb is None and b is None)
    torch.testing.assert_close(conv(x, weight, bias, stride=2, groups=merged_groups), expected)


def test_dense_and_grouped_conv_weights_round_trip():
    w = randn(6, 2, 3, 3)
    dense = dense_conv_weight(w, 3)
    assert dense.shape == (6, 6, 3, 3) and not dense[:2, 2:].any() and not dense[2:4, :2].any()
    torch.testing.assert_close(grouped_conv_weight(dense, 3), w)
    x = randn(2, 6, 5, 5, seed=1)
    torch.testing.assert_close(F.conv2d(x, dense), F.conv2d(x, w, groups=3))


def test_compose_and_add_linears_are_linear_algebra():
    x = randn(4, 5, dtype=torch.float64)
    w1, b1 = randn(3, 5, seed=1).double(), randn(3, seed=2).double()
    w2, b2 = randn(6, 3, seed=3).double(), randn(6, seed=4).double()
    w, b = compose_linears(w1, b1, w2, b2)
    torch.testing.assert_close(F.linear(x, w, b), F.linear(F.linear(x, w1, b1), w2, b2))
    assert compose_linears(w1, None, w2, None)[1] is None
    u = randn(6, 5, seed=5).double()
    w, b = add_linears(u, None, compose_linears(w1, b1, w2, b2)[0], b, alpha=-0.5)
    expected = F.linear(x, u) - 0.5 * F.linear(F.linear(x, w1, b1), w2, b2)
    torch.testing.assert_close(F.linear(x, w, b), expected)


# -- structural ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "rule"),
    [
        (nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 4, 1)), "conv-pointwise"),
        (nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3)), "pointwise-conv"),
        (
            nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 6, 3, padding=1)),
            "pointwise-conv",
        ),
    ],
    ids=["3x3-then-1x1", "1x1-then-unpadded-3x3", "bias-free-1x1-then-padded-3x3"],
)
def test_merge_sequential_convs_leaves_one_conv_and_counts_match_applied(model, rule):
    result = apply_pass(merge_sequential_convs, seeded(model), randn(2, 4, 8, 8))
    assert result.modified and result.applied == {rule: 1}
    assert count_ops(result.graph_module, *CONV_OPS) == 1


def test_merge_sequential_convs_merges_a_chain_of_three_convs():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 6, 1))
    gm = graph_of(seeded(model), randn(2, 4, 9, 9))
    result = merge_sequential_convs(gm)
    assert sum(result.applied.values()) == 2 == 3 - count_ops(gm, *CONV_OPS)


def test_merge_sequential_convs_merges_linear_chains_and_adapters():
    cases = [
        (nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), randn(3, 64), "linear-linear"),
        (SerialAdapter(), randn(2, 5, 16), "linear-sum"),
        (ParallelAdapter(), randn(2, 5, 16), "linear-sum"),
    ]
    for model, x, rule in cases:
        result = apply_pass(merge_sequential_convs, seeded(model), x)
        assert result.applied == {rule: 1}
        assert count_ops(result.graph_module, aten.linear) == 1
        assert count_ops(result.graph_module, aten.add, aten.add_, aten.mul) == 0


# -- numerical -----------------------------------------------------------------------------------


class PointwiseThenKxk(nn.Module):
    """DBB's 1x1 -> k x k branch without its padding trick: 1x1 conv-BN, unpadded k x k conv-BN
    (the 1x1's BN leaves a bias, which an unpadded k x k conv carries exactly); both convs take
    `groups`, so the merged conv keeps them."""

    def __init__(self, kernel=3, stride=1, groups=1):
        super().__init__()
        self.pointwise = nn.Conv2d(8, 8, 1, groups=groups, bias=False)
        self.bn1 = randomize_batch_norm(nn.BatchNorm2d(8), seed=1)
        self.kxk = nn.Conv2d(8, 12, kernel, stride=stride, groups=groups, bias=False)
        self.bn2 = randomize_batch_norm(nn.BatchNorm2d(12), seed=2)

    def forward(self, x):
        return self.bn2(self.kxk(self.bn1(self.pointwise(x))))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4])
def test_merge_sequential_convs_after_bn_folding_matches_eager(stride, groups):
    model, x = seeded(PointwiseThenKxk(3, stride, groups)), randn(2, 8, 9, 9)
    gm = fold_conv_bn(graph_of(model, x)).graph_module
    result = merge_sequential_convs(gm)
    assert result.applied == {"pointwise-conv": 1}
    assert count_ops(result.graph_module, *CONV_OPS) == 1
    assert_equivalent(model, result.graph_module, (x,), n_random=1)


def test_merge_sequential_convs_keeps_float64_and_a_symbolic_batch():
    model = seeded(nn.Sequential(nn.Conv1d(3, 6, 5, padding=2), nn.Conv1d(6, 4, 1))).double()
    result = apply_pass(merge_sequential_convs, model, randn(2, 3, 11).double(), dynamic_batch=True)
    assert result.applied == {"conv-pointwise": 1}
    assert result.graph_module(randn(5, 3, 11).double()).shape == (5, 4, 11)


def test_optimize_with_merge_sequential_convs_matches_eager():
    model, x = seeded(SerialAdapter(dim=32, rank=4)), randn(4, 7, 32)
    opt = fxopt.optimize(model, x, passes=["merge_sequential_convs"])
    assert "merge_sequential_convs" not in opt.report.rolled_back
    assert opt.report.after.op_counts.get("linear") == 1
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dbb_net", "repmlp_net", "vit_adapter_net"])
def test_merge_sequential_convs_after_bn_folding_keeps_zoo_models_equivalent(name):
    if name not in fxopt.models.list():
        pytest.skip(f"{name} is not in the zoo")
    model = fxopt.models.create(name)
    (x,) = fxopt.models.example_inputs(name, batch=2)
    gm = graph_of(model, x, dynamic_batch=True)
    for pass_fn in (fold_conv_bn, fold_linear_bn, merge_sequential_convs):
        gm = pass_fn(gm).graph_module
    for inputs in ((x,), fxopt.models.example_inputs(name, batch=3, seed=3)):
        assert_equivalent(model, gm, inputs)
    if name == "vit_adapter_net":  # every adapter, serial or parallel, joins its host linear
        assert count_ops(gm, aten.linear) < count_ops(graph_of(model, x), aten.linear)


# -- property ------------------------------------------------------------------------------------

# A symbolic batch doubles the capture time; a quarter of the examples is enough to cover it.
SOMETIMES_DYNAMIC = st.sampled_from([False, False, False, True])


@st.composite
def conv_pairs(draw):
    """(model, input, can be exact, merged flops, separate flops, symbolic batch): a 1x1 conv
    before or after a conv of random kernel, stride, padding, dilation, groups and biases."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    pointwise_first = draw(st.booleans())
    first_groups, second_groups = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4]))
    channels = first_groups * draw(st.integers(1, 3))
    middle = math.lcm(first_groups, second_groups) * draw(st.integers(1, 3))
    out = second_groups * draw(st.integers(1, 3))
    kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding, dilation = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    biases = draw(st.booleans()), draw(st.booleans())
    conv = CONV[dims]
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    if pointwise_first:
        first = conv(channels, middle, 1, groups=first_groups, bias=biases[0])
        second = conv(middle, out, kernel, groups=second_groups, bias=biases[1], **geometry)
    else:
        first = conv(channels, middle, kernel, groups=first_groups, bias=biases[0], **geometry)
        second = conv(middle, out, 1, groups=second_groups, bias=biases[1])
    seed = draw(st.integers(0, 2**16))
    model = seeded(nn.Sequential(first, second), seed)
    size = draw(st.integers(5, 8 if dims < 3 else 6))
    x = randn(draw(st.integers(1, 3)), channels, *[size] * dims, seed=seed)
    middle_value = first(x)
    outputs = [middle_value.shape, second(middle_value).shape]
    separate = sum(
        conv_flops(s[0], s[2:], c.weight.shape, c.bias is not None)
        for s, c in zip(outputs, (first, second), strict=True)
    )
    merged_kernel = (second if pointwise_first else first).weight.shape[2:]
    merged_shape = (out, channels // math.gcd(first_groups, second_groups), *merged_kernel)
    merged = conv_flops(outputs[1][0], outputs[1][2:], merged_shape, any(biases))
    # a biased 1x1 before a zero-padded conv cannot merge exactly
    exact = not (pointwise_first and biases[0] and padding > 0)
    return model, x, exact, merged, separate, draw(SOMETIMES_DYNAMIC)


def check_conv_pair(case):
    model, x, exact, merged, separate, dynamic = case
    result = apply_pass(merge_sequential_convs, model, x, dynamic_batch=dynamic)
    fired = sum(result.applied.values())
    assert fired <= 1 and count_ops(result.graph_module, *CONV_OPS) == 2 - fired
    if not exact or merged > separate:
        assert fired == 0, (exact, merged, separate)
    elif merged < separate:
        assert fired == 1, (merged, separate)


@settings(max_examples=150, deadline=None)
@given(conv_pairs())
def test_merge_sequential_convs_property_conv_pairs_merge_exactly_when_cheaper(case):
    check_conv_pair(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(conv_pairs())
def test_merge_sequential_convs_property_conv_pairs_slow(case):
    check_conv_pair(case)


@st.composite
def linear_graphs(draw):
    """(model, input, linears left or None for a cost tie, symbolic batch): linear -> linear of
    random widths, or a serial or parallel adapter of random rank, scale, operand order and
    in-place add."""
    kind = draw(st.sampled_from(["chain", "serial", "parallel"]))
    seed = draw(st.integers(0, 2**16))
    leading = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    if kind == "chain":
        widths = [draw(st.integers(1, 12)) for _ in range(3)]
        biases = draw(st.booleans()), draw(st.booleans())
        layers = [
            nn.Linear(a, b, bias=c) for a, b, c in zip(widths[:-1], widths[1:], biases, strict=True)
        ]
        model = nn.Sequential(*layers)
        rows = math.prod(leading)
        separate = sum(
            linear_flops(rows, a, b, c)
            for a, b, c in zip(widths[:-1], widths[1:], biases, strict=True)
        )
        merged = linear_flops(rows, widths[0], widths[2], any(biases))
        expected = 1 if merged < separate else 2 if merged > separate else None
        features = widths[0]
    elif kind == "serial":
        features, rank = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        scale = draw(st.sampled_from([1.0, 0.5, -2.0]))
        model, expected = SerialAdapter(features, rank, scale, inplace=draw(st.booleans())), 1
    else:
        features, out, rank = (
            draw(st.integers(1, 12)),
            draw(st.integers(1, 12)),
            draw(st.integers(1, 12)),
        )
        model, expected = ParallelAdapter(features, out, rank, adapter_first=draw(st.booleans())), 1
    x = randn(*leading, features, seed=seed)
    return seeded(model, seed), x, expected, draw(SOMETIMES_DYNAMIC)


def check_linear_graph(case):
    model, x, expected, dynamic = case
    result = apply_pass(merge_sequential_convs, model, x, dynamic_batch=dynamic)
    if expected is not None:
        assert count_ops(result.graph_module, aten.linear) == expected


@settings(max_examples=150, deadline=None)
@given(linear_graphs())
def test_merge_sequential_convs_property_linear_chains_and_adapters_match_eager(case):
    check_linear_graph(case)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(linear_graphs())
def test_merge_sequential_convs_property_linear_chains_and_adapters_slow(case):
    check_linear_graph(case)


# -- idempotence ---------------------------------------------------------------------------------


def test_merge_sequential_convs_is_idempotent():
    model = nn.Sequential(
        PointwiseThenKxk(), nn.Flatten(), nn.Linear(12 * 7 * 7, 16), nn.Linear(16, 16)
    )
    model, x = seeded(model), randn(2, 8, 9, 9)
    gm = merge_sequential_convs(graph_of(model, x)).graph_module
    again = merge_sequential_convs(gm)
    assert not again.modified and again.applied == {}


# -- declines ------------------------------------------------------------------------------------


class ReturnsIntermediate(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        y = self.first(x)
        return self.second(y), y


class SameConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.conv(x))


class WeightFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, w):
        return self.fc(F.linear(x, w))


class AdapterWithGelu(ParallelAdapter):
    def forward(self, x):
        return self.host(x) + self.up(F.gelu(self.down(x)))


class AdapterOnAnotherInput(ParallelAdapter):
    def forward(self, x, y):
        return self.host(x) + self.up(self.down(y))


class SerialHostReturned(SerialAdapter):
    def forward(self, x):
        h = self.host(x)
        return h + self.up(self.down(h)), h


class SourceWrittenBetween(ParallelAdapter):
    """Host and adapter read one view node, but an in-place op writes its base in between, so
    one merged linear (placed at the add) would read the written values for both."""

    def forward(self, x):
        y = x.clone()
        view = y.view(y.shape)
        host = self.host(view)
        y.mul_(2)
        return host + self.up(self.down(view))


x4 = randn(2, 4, 8, 8)
DECLINES = {
    # a 1x1 conv's bias before a zero-padded conv: the border reads 0, not the bias
    "pointwise-bias-before-padded-conv": (
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3, padding=1)),
        (x4,),
    ),
    "pointwise-bias-before-same-conv": (
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3, padding="same")),
        (x4,),
    ),
    "linear-relu-linear": (
        nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)),
        (randn(3, 6),),
    ),
    "conv-relu-conv": (nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), (x4,)),
    # 256 -> 4 -> 256: merged 256 * 256 multiply-adds per row against 4 * 512
    "narrow-middle-linear": (nn.Sequential(nn.Linear(256, 4), nn.Linear(4, 256)), (randn(3, 256),)),
    "narrow-middle-conv": (
        nn.Sequential(nn.Conv2d(32, 2, 3), nn.Conv2d(2, 32, 1)),
        (randn(2, 32, 8, 8),),
    ),
    # a depthwise 3x3 before a dense 1x1 would turn into a dense 3x3
    "depthwise-then-pointwise": (
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)),
        (randn(2, 16, 8, 8),),
    ),
    "linear-output-shared": (ReturnsIntermediate(nn.Linear(6, 8), nn.Linear(8, 6)), (randn(3, 6),)),
    "conv-output-shared": (ReturnsIntermediate(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 1)), (x4,)),
    "shared-conv-weight": (SameConvTwice(), (x4,)),
    "weight-from-input": (WeightFromInput(), (randn(3, 6), randn(6, 6, seed=1))),
    "transposed-conv-then-pointwise": (
        nn.Sequential(nn.ConvTranspose2d(4, 8, 3, stride=2), nn.Conv2d(8, 4, 1)),
        (x4,),
    ),
    "strided-pointwise-first": (
        nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 4, 3)),
        (x4,),
    ),
    "padded-pointwise-second": (
        nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 1, padding=1)),
        (x4,),
    ),
    "unbatched-conv": (nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 1)), (randn(4, 8, 8),)),
    "adapter-with-gelu": (AdapterWithGelu(), (randn(3, 16),)),
    "adapter-on-another-input": (AdapterOnAnotherInput(), (randn(3, 16), randn(3, 16, seed=1))),
    "serial-host-output-shared": (SerialHostReturned(), (randn(3, 16),)),
    "source-written-in-place-between": (SourceWrittenBetween(), (randn(3, 16),)),
}


@pytest.mark.parametrize("name", DECLINES)
def test_merge_sequential_convs_declines_when_precondition_fails(name):
    model, inputs = DECLINES[name]
    model = seeded(model)
    gm = graph_of(model, *inputs)
    code = gm.code
    result = merge_sequential_convs(gm)
    assert not result.modified and result.applied == {}
    assert result.graph_module.code == code
    torch.testing.assert_close(result.graph_module(*inputs), model(*inputs))


def test_a_naive_merge_of_a_biased_1x1_before_a_padded_conv_is_wrong_at_the_border():
    """The decline is not caution: the merged conv would assume the 1x1's bias where the
    original reads a padded zero, so the border differs while the interior agrees."""
    model = seeded(nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3, padding=1)))
    first, second = model
    x = randn(2, 4, 8, 8)
    weight, bias, groups = pointwise_before(
        first.weight.detach(),
        first.bias.detach(),
        1,
        second.weight.detach(),
        second.bias.detach(),
        1,
    )
    naive = F.conv2d(x, weight.float(), bias.float(), padding=1, groups=groups)
    error = (naive - model(x)).abs()
    torch.testing.assert_close(naive[..., 1:-1, 1:-1], model(x)[..., 1:-1, 1:-1])
    assert error[..., 0, :].max() > 1e-2 and error[..., :, -1].max() > 1e-2


def test_merge_sequential_convs_leaves_the_model_untouched():
    model = seeded(SerialAdapter())
    state = copy.deepcopy(model.state_dict())
    apply_pass(merge_sequential_convs, model, randn(3, 16))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
