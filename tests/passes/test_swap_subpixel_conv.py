import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.passes.swap_subpixel_conv import (
    phase_taps,
    swap_subpixel_conv,
    to_subpixel_weight,
    to_transposed_weight,
    transposed_params,
)
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
ZOO = ("fsrcnn_like", "fsrcnn_x3_like", "espcn")


class Upsampler(nn.Module):
    """A feature conv, then a transposed conv (FSRCNN's last layer)."""

    def __init__(self, cin=16, cout=1, r=2, k=9, p=4, op=1, groups=1, dilation=1, bias=True):
        super().__init__()
        self.features = nn.Conv2d(1, cin, 3, padding=1)
        self.up = nn.ConvTranspose2d(cin, cout, k, r, p, op, groups, bias, dilation)

    def forward(self, x):
        return self.up(torch.relu(self.features(x)))


class Subpixel(nn.Module):
    """conv -> pixel_shuffle(r) (ESPCN's last layer). bias: None, "per-channel" (the same for
    the r * r phases of an output channel, as a transposed conv's) or "per-phase"."""

    def __init__(self, cin=64, cout=64, r=2, k=1, p=0, groups=1, bias=None, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout * r * r, k, stride, p, groups=groups, bias=bias is not None)
        if bias == "per-channel":
            self.conv.bias.data = torch.randn(cout).repeat_interleave(r * r)
        self.r = r

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), self.r)


# structural and numerical


def test_swap_subpixel_conv_turns_fsrcnn_upsampler_into_conv_and_pixel_shuffle():
    result = apply_pass(swap_subpixel_conv, Upsampler(), torch.randn(2, 1, 12, 12))
    gm = result.graph_module
    assert result.applied == {"transposed-to-subpixel": 1}
    assert count_ops(gm, aten.conv_transpose2d) == 0 and count_ops(gm, aten.pixel_shuffle) == 1
    (conv,) = [n for n in gm.graph.nodes if n.target is aten.conv2d.default and n.args[4] != [1, 1]]
    # k=9, r=2, p=4: phases read 5 and 4 taps; one 5x5 conv with 4 phase channels per output
    assert tuple(conv.args[1].meta["val"].shape) == (4, 16, 5, 5) and conv.args[4] == [2, 2]


def test_swap_subpixel_conv_turns_a_wide_1x1_conv_and_shuffle_into_a_2x2_transposed_conv():
    """U-Net's upsampler: 64 output channels, where the transposed conv is the cheaper form."""
    result = apply_pass(swap_subpixel_conv, Subpixel(), torch.randn(2, 64, 8, 8))
    gm = result.graph_module
    assert result.applied == {"subpixel-to-transposed": 1}
    assert count_ops(gm, aten.conv2d, aten.pixel_shuffle) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is aten.conv_transpose2d.input]
    assert tuple(node.args[1].meta["val"].shape) == (64, 64, 2, 2) and node.args[3] == [2, 2]


@pytest.mark.parametrize("name", ZOO)
def test_swap_subpixel_conv_keeps_zoo_models_equivalent(name):
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    result = apply_pass(swap_subpixel_conv, model, *inputs)
    fsrcnn = name.startswith("fsrcnn")
    assert result.applied == ({"transposed-to-subpixel": 1} if fsrcnn else {})
    opt = fxopt.optimize(model, inputs, passes=[*DEFAULT_PIPELINE, "swap_subpixel_conv"])
    assert opt.report.rolled_back == []
    assert count_ops(opt.graph_module, aten.conv_transpose2d) == 0
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)


def test_swap_subpixel_conv_moves_a_per_channel_bias_into_the_transposed_conv():
    result = apply_pass(swap_subpixel_conv, Subpixel(bias="per-channel"), torch.randn(2, 64, 6, 6))
    assert result.applied == {"subpixel-to-transposed": 1}


def test_swap_subpixel_conv_is_idempotent_in_both_directions():
    for model, x in [(Upsampler(), (2, 1, 8, 8)), (Subpixel(), (2, 64, 6, 6))]:
        once = swap_subpixel_conv(graph_of(model.eval(), torch.randn(x)))
        assert once.modified
        again = swap_subpixel_conv(once.graph_module)
        assert not again.modified and again.applied == {}


# declines


class WeightFromInput(nn.Module):
    def forward(self, x, w):
        return F.conv_transpose2d(x, w, stride=2, padding=4, output_padding=1)


class SecondUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 256, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.pixel_shuffle(y, 2), y


DECLINES = {  # name: (model, input shape)
    "dilated": (Upsampler(k=5, p=4, op=1, dilation=2), (1, 1, 6, 6)),
    "different-strides": (Upsampler(r=(2, 3), k=9, p=4, op=(1, 0)), (1, 1, 6, 6)),
    "stride-1": (Upsampler(r=1, k=3, p=1, op=0), (1, 1, 6, 6)),
    "length-not-a-multiple-of-r": (Upsampler(k=3, p=1, op=0), (1, 1, 6, 6)),
    "cheaper-as-transposed": (Upsampler(cin=64, cout=64, k=4, p=1, op=0), (1, 1, 6, 6)),
    "bias-differs-between-phases": (Subpixel(bias="per-phase"), (1, 64, 6, 6)),
    "espcn-conv-cheaper-than-transposed": (Subpixel(64, 1, 3, 3, 1), (1, 64, 6, 6)),
    "same-padding-with-an-even-kernel": (Subpixel(k=2, p="same"), (1, 64, 6, 6)),
    "strided-conv": (Subpixel(stride=2), (1, 64, 6, 6)),
    "conv-output-has-another-user": (SecondUser(), (1, 64, 6, 6)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("model", "shape"), DECLINES.values(), ids=DECLINES.keys())
def test_swap_subpixel_conv_declines_when_precondition_fails(model, shape):
    assert_declines(swap_subpixel_conv, model, torch.randn(shape))


def test_swap_subpixel_conv_declines_when_weight_is_not_constant():
    gm = graph_of(WeightFromInput(), torch.randn(1, 4, 6, 6), torch.randn(4, 1, 9, 9))
    assert not swap_subpixel_conv(gm).modified


def test_swap_subpixel_conv_says_why_it_declines_a_phase_dependent_bias():
    model = Subpixel(bias="per-phase")
    result = swap_subpixel_conv(graph_of(model.eval(), torch.randn(1, 64, 6, 6)))
    (reason,) = result.declined["subpixel-to-transposed"]
    assert "bias differs between the phases" in reason


# the pure math and properties


def test_phase_taps_of_a_k4_r2_p1_transposed_conv():
    taps = phase_taps(4, 2, 1, 0)
    assert (taps.size, taps.padding) == (3, 1)
    # phase 0 reads taps 3 and 1 of the transposed kernel, phase 1 reads taps 2 and 0
    used = [[(u, a) for u, a in taps.table[s].nonzero().tolist()] for s in range(2)]
    assert used == [[(0, 3), (1, 1)], [(1, 2), (2, 0)]]


def test_phase_taps_is_none_when_pixel_shuffle_cannot_give_the_output_length():
    assert phase_taps(3, 2, 1, 0) is None and phase_taps(9, 3, 4, 0) is None


@st.composite
def transposed_cases(draw):
    r = draw(st.integers(2, 4))
    groups = draw(st.sampled_from([1, 2]))
    kernel = [draw(st.integers(1, 3 * r)) for _ in range(2)]
    padding, output_padding = [], []
    for k in kernel:
        p = draw(st.integers(0, k // 2 + 1))
        # output_padding < r makes (k - 2p + op) a multiple of r: the exact cases
        op = (2 * p - k) % r
        padding.append(p), output_padding.append(op)
    size = [draw(st.integers(2, 6)) for _ in range(2)]
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    return r, groups, kernel, padding, output_padding, size, cin, cout


@settings(max_examples=25, deadline=None)
@given(transposed_cases(), st.integers(0, 2**16))
def test_subpixel_weight_reproduces_the_transposed_conv(case, seed):
    r, groups, kernel, padding, output_padding, size, cin, cout = case
    torch.manual_seed(seed)
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    weight = torch.randn(cin, cout // groups, *kernel, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    if any(
        (n - 1) * r - 2 * p + k + op <= 0
        for n, p, k, op in zip(size, padding, kernel, output_padding, strict=True)
    ):
        return  # the transposed conv has no output
    expected = F.conv_transpose2d(x, weight, bias, r, padding, output_padding, groups)
    rows, cols = (
        phase_taps(k, r, p, op) for k, p, op in zip(kernel, padding, output_padding, strict=True)
    )
    conv_weight = to_subpixel_weight(weight, groups, rows, cols)
    conv = F.conv2d(
        x, conv_weight, bias.repeat_interleave(r * r), 1, (rows.padding, cols.padding), 1, groups
    )
    torch.testing.assert_close(F.pixel_shuffle(conv, r), expected, rtol=1e-12, atol=1e-12)
    # and back: the conv weight maps to a transposed conv with r * K taps that equals it too
    back = [transposed_params(t.size, t.padding, r) for t in (rows, cols)]
    back_taps = [phase_taps(k, r, p, 0) for k, p in back]
    dense = to_transposed_weight(conv_weight, groups, *back_taps)
    again = F.conv_transpose2d(x, dense, bias, r, [p for _, p in back], 0, groups)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)


@st.composite
def upsampler_cases(draw):
    r = draw(st.integers(2, 4))
    k = draw(st.integers(r, 3 * r))
    p = draw(st.integers(0, (k - 1) // 2))
    groups = draw(st.sampled_from([1, 2]))
    cout = groups * draw(st.sampled_from([1, 2, 32]))
    model = Upsampler(4 * groups, cout, r, k, p, (2 * p - k) % r, groups, bias=draw(st.booleans()))
    return model.eval(), torch.randn(draw(st.integers(1, 2)), 1, *[draw(st.integers(3, 9))] * 2)


@settings(max_examples=25, deadline=None)
@given(upsampler_cases())
def test_swap_subpixel_conv_property_random_upsamplers_match_eager(case):
    model, x = case
    result = apply_pass(swap_subpixel_conv, model, x)
    ops = count_ops(result.graph_module, aten.conv_transpose2d, aten.pixel_shuffle)
    assert ops == 1 and sum(result.applied.values()) == int(result.modified)
    assert not swap_subpixel_conv(result.graph_module).modified


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(transposed_cases(), st.integers(0, 2**16))
def test_subpixel_weight_reproduces_the_transposed_conv_at_length(case, seed):
    test_subpixel_weight_reproduces_the_transposed_conv.hypothesis.inner_test(case, seed)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(upsampler_cases())
def test_swap_subpixel_conv_property_random_upsamplers_match_eager_at_length(case):
    test_swap_subpixel_conv_property_random_upsamplers_match_eager.hypothesis.inner_test(case)
