import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.ir.block_ops import (
    ACTIVATIONS,
    BLOCK_OPS,
    DW_PW_BLOCK,
    PW_DW_PW_BLOCK,
    block_flops,
    tile_for,
)
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.passes.fuse_blocks import activation, fuse_blocks
from fxopt.testing import apply_pass, count_ops, graph_of

aten = torch.ops.aten
ACTS = {
    "none": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
}


def dw_conv(channels, kernel=3, stride=1, dilation=1, bias=True, multiplier=1):
    padding = dilation * (kernel - 1) // 2
    return nn.Conv2d(
        channels,
        channels * multiplier,
        kernel,
        stride,
        padding,
        dilation,
        groups=channels,
        bias=bias,
    )


class DwPw(nn.Module):
    """MobileNetV1's depthwise-separable conv: dw k x k (+ act), then 1x1 (+ act)."""

    def __init__(self, channels=8, out=12, kernel=3, stride=1, act_mid="relu", act_out="none"):
        super().__init__()
        self.dw, self.act_mid = dw_conv(channels, kernel, stride), ACTS[act_mid]()
        self.pw, self.act_out = nn.Conv2d(channels, out, 1), ACTS[act_out]()

    def forward(self, x):
        return self.act_out(self.pw(self.act_mid(self.dw(x))))


class Inverted(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand, dw, 1x1 project (+ x)."""

    def __init__(
        self, channels=8, hidden=24, out=8, kernel=3, stride=1, acts=("relu6",) * 2 + ("none",)
    ):
        super().__init__()
        self.expand, self.act_expand = nn.Conv2d(channels, hidden, 1), ACTS[acts[0]]()
        self.dw, self.act_mid = dw_conv(hidden, kernel, stride), ACTS[acts[1]]()
        self.project, self.act_out = nn.Conv2d(hidden, out, 1), ACTS[acts[2]]()
        self.residual = stride == 1 and channels == out

    def forward(self, x):
        out = self.act_expand(self.expand(x))
        out = self.act_out(self.project(self.act_mid(self.dw(out))))
        return x + out if self.residual else out


def mobilenet_v1_stack():
    """Three dw + BN + ReLU -> pw + BN + ReLU pairs, as in MobileNetV1."""
    layers = []
    for cin, cout, stride in ((8, 16, 1), (16, 32, 2), (32, 32, 1)):
        layers += [dw_conv(cin, stride=stride, bias=False), nn.BatchNorm2d(cin), nn.ReLU()]
        layers += [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


def x2d(channels=8, batch=2, size=9):
    return torch.randn(batch, channels, size, size)


def fused(gm):
    return count_ops(gm, *BLOCK_OPS)


def graph_after_bn_fold(model, *inputs):
    return fold_conv_bn(graph_of(model.eval(), *inputs)).graph_module


# structural


def test_fuse_blocks_fuses_each_dw_pw_pair_of_a_mobilenet_v1_stack():
    gm = graph_after_bn_fold(mobilenet_v1_stack(), x2d())
    result = fuse_blocks(gm)
    assert result.applied == {"dw-pw": 3}
    assert count_ops(result.graph_module, DW_PW_BLOCK) == 3
    assert count_ops(result.graph_module, aten.conv2d, aten.relu) == 0


def test_fuse_blocks_fuses_every_inverted_residual_of_mobilenetv2():
    model = fxopt.models.create("mobilenetv2_like")
    blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual"]
    expanded = sum(len(b.layers) == 4 for b in blocks)  # pw, dw, pw, bn: expansion > 1
    inputs = fxopt.models.example_inputs("mobilenetv2_like", batch=2)
    result = fuse_blocks(graph_after_bn_fold(model, *inputs))
    assert result.applied == {"pw-dw-pw": expanded, "dw-pw": len(blocks) - expanded}
    gm = result.graph_module
    assert count_ops(gm, PW_DW_PW_BLOCK) == expanded
    assert fused(gm) == sum(result.applied.values())
    residuals = [n for n in gm.graph.nodes if n.target is PW_DW_PW_BLOCK and n.args[-1]]
    assert len(residuals) == sum(b.use_residual for b in blocks)
    assert count_ops(gm, aten.add) == 0
    # only the stem 3x3 conv and the 1x1 head conv stay
    assert count_ops(gm, aten.conv2d) == 2


def test_fuse_blocks_leaves_convnext_blocks_alone_because_a_layer_norm_splits_dw_and_pw():
    model = fxopt.models.create("convnext_atto_like")
    inputs = fxopt.models.example_inputs("convnext_atto_like", batch=2)
    result = fuse_blocks(graph_of(model.eval(), *inputs))
    assert not result.modified and result.applied == {}
    assert fused(result.graph_module) == 0


def test_fused_block_op_replays_the_unfused_aten_calls_bit_for_bit():
    x = x2d(8)
    for model in (DwPw(act_mid="gelu", act_out="silu"), Inverted()):
        gm = graph_of(model.eval(), x)
        expected = gm(x)
        result = fuse_blocks(gm)
        assert fused(result.graph_module) == 1
        assert torch.equal(result.graph_module(x), expected)


# numerical


@pytest.mark.parametrize("name", ["mobilenetv2_like", "convnext_atto_like"])
def test_fuse_blocks_keeps_zoo_models_equivalent_after_fold_conv_bn(name):
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    opt = fxopt.optimize(model, inputs, passes=["fold_conv_bn", "fuse_blocks"])
    assert opt.report.rolled_back == []
    fxopt.testing.assert_equivalent(model.eval(), opt, inputs)


# properties


@st.composite
def block_cases(draw):
    """(model, x): a dw-pw pair or an inverted residual with random hyper-parameters."""
    kernel, stride = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([1, 2]))
    channels = draw(st.integers(1, 12))
    acts = draw(st.lists(st.sampled_from(sorted(ACTS)), min_size=3, max_size=3))
    size = draw(st.integers(kernel // 2 + 1, 12))
    if draw(st.booleans()):
        out = draw(st.integers(1, 12))
        model = DwPw(channels, out, kernel, stride, act_mid=acts[0], act_out=acts[1])
    else:
        residual = draw(st.booleans())
        hidden = draw(st.integers(1, 24))
        out = channels if residual else draw(st.integers(1, 12))
        model = Inverted(channels, hidden, out, kernel, 1 if residual else stride, tuple(acts))
    return model.eval(), x2d(channels, draw(st.sampled_from([1, 2])), size)


def check_block_case(case):
    model, x = case
    result = apply_pass(fuse_blocks, model, x)
    assert sum(result.applied.values()) == 1
    assert fused(result.graph_module) == 1
    assert count_ops(result.graph_module, aten.conv2d, aten.add) == 0
    assert not fuse_blocks(result.graph_module).modified


@settings(max_examples=20, deadline=None)
@given(block_cases())
def test_fuse_blocks_property_random_blocks_fuse_and_match_eager(case):
    check_block_case(case)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(block_cases())
def test_fuse_blocks_property_random_blocks_fuse_and_match_eager_slow(case):
    check_block_case(case)


# idempotence


def test_fuse_blocks_is_idempotent():
    gm = fuse_blocks(graph_after_bn_fold(mobilenet_v1_stack(), x2d())).graph_module
    again = fuse_blocks(gm)
    assert not again.modified and again.applied == {}


# declines


class SecondUser(DwPw):
    def forward(self, x):
        mid = self.act_mid(self.dw(x))
        return self.pw(mid), mid


class WeightFromInput(nn.Module):
    def forward(self, x, w):
        return F.conv2d(F.conv2d(x, w, padding=1, groups=8), torch.ones(4, 8, 1, 1))


class SharedPw(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.pw = dw_conv(8), dw_conv(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.pw(self.a(x)) + self.pw(self.b(x))


class Custom(nn.Module):
    """dw -> 1x1 with the given modules."""

    def __init__(self, dw, pw):
        super().__init__()
        self.dw, self.pw = dw, pw

    def forward(self, x):
        return self.pw(self.dw(x))


DECLINES = {  # name: (model, x, reason fragment)
    "intermediate-has-another-user": (SecondUser(), x2d(), "another user"),
    "shared-pw-weight": (SharedPw(), x2d(), "constant of its own"),
    "channel-multiplier": (Custom(dw_conv(8, multiplier=2), nn.Conv2d(16, 4, 1)), x2d(), "mult"),
    "grouped-pw": (Custom(dw_conv(8), nn.Conv2d(8, 4, 1, groups=2)), x2d(), "grouped"),
    "strided-pw": (Custom(dw_conv(8), nn.Conv2d(8, 4, 1, stride=2)), x2d(), "strided"),
    "dw-stride-3": (Custom(dw_conv(8, stride=3), nn.Conv2d(8, 4, 1)), x2d(), "stride 1 and 2"),
    "same-padding": (
        Custom(nn.Conv2d(8, 8, 3, padding="same", groups=8), nn.Conv2d(8, 4, 1)),
        x2d(),
        "padding",
    ),
    "fp64": (
        Custom(dw_conv(8), nn.Conv2d(8, 4, 1)).double(),
        x2d().double(),
        "fp32",
    ),
    "over-budget": (Custom(dw_conv(3200), nn.Conv2d(3200, 1, 1)), x2d(3200, 1, 2), "budget"),
}


@pytest.mark.parametrize(("model", "x", "reason"), DECLINES.values(), ids=DECLINES.keys())
def test_fuse_blocks_declines_when_precondition_fails(model, x, reason):
    gm = graph_of(model.eval(), x)
    code = gm.code
    result = fuse_blocks(gm)
    assert not result.modified and result.graph_module.code == code
    reasons = [r for rs in result.declined.values() for r in rs]
    assert any(reason in r for r in reasons), reasons


def test_fuse_blocks_declines_when_weight_is_not_constant():
    gm = graph_of(WeightFromInput(), x2d(), torch.randn(8, 1, 3, 3))
    assert not fuse_blocks(gm).modified


def test_fuse_blocks_falls_back_to_dw_pw_when_the_inverted_residual_is_over_budget():
    model = Inverted(channels=4, hidden=1200, out=4)
    result = fuse_blocks(graph_of(model.eval(), x2d(4, 1, 4)))
    assert result.applied == {"dw-pw": 1}
    assert count_ops(result.graph_module, aten.conv2d) == 1  # the expand conv stays


# the pure helpers


def test_tile_for_picks_the_largest_tile_that_fits_and_none_past_the_budget():
    assert tile_for(16, (3, 3), (1, 1), (1, 1), expand=False) == (8, 16)
    assert tile_for(1000, (3, 3), (1, 1), (1, 1), expand=False) == (2, 4)
    assert tile_for(4000, (3, 3), (1, 1), (1, 1), expand=False) is None
    assert tile_for(1200, (3, 3), (1, 1), (1, 1), expand=True) is None


def test_block_flops_equals_the_flops_of_the_unfused_convs():
    x = torch.randn(2, 8, 10, 10)
    model = Inverted(8, 24, 16, kernel=5, stride=2).eval()
    expand, dw, project = model.expand, model.dw, model.project
    hidden = expand(x)
    mid = dw(hidden)
    out = project(mid)
    expected = 2 * (
        hidden[:, :1].numel() * expand.weight.numel()
        + mid[:, :1].numel() * dw.weight.numel()
        + out[:, :1].numel() * project.weight.numel()
    )
    args = [x, expand.weight, None, dw.weight, None, project.weight, None]
    assert block_flops(True, args, out) == expected
    pair = [hidden, dw.weight, None, project.weight, None]
    assert block_flops(False, pair, out) == expected - 2 * hidden[:, :1].numel() * 8 * 24


def test_tile_for_avoids_partial_tiles_when_it_knows_the_output_size():
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, out_size=(56, 56)) == (8, 14)
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, out_size=(28, 28)) == (7, 14)
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, out_size=(7, 7)) == (7, 7)


def test_tile_for_exact_picks_the_largest_tile_dividing_the_output():
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, (56, 56), exact=True) == (8, 8)
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, (28, 28), exact=True) == (7, 7)
    assert tile_for(64, (3, 3), (1, 1), (1, 1), False, (13, 12), exact=True) == (1, 6)
    assert tile_for(192, (5, 5), (2, 2), (1, 1), True, (7, 7), exact=True) == (1, 1)


def test_activation_names_every_module_activation_the_blocks_accept():
    for name, module in ACTS.items():
        if name == "none":
            continue
        gm = graph_of(module().eval(), x2d())
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.users]
        assert activation(node) == name
        assert torch.equal(ACTIVATIONS[name](x2d()[:1] * 0 + 2.5), module()(x2d()[:1] * 0 + 2.5))
