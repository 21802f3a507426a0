import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.affine import elementwise_affine, per_channel
from fxopt.passes.fold_channel_affine import fold_channel_affine
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten
AFFINE_OPS = (aten.mul, aten.div, aten.add, aten.sub, aten.rsub)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ThenAffine(nn.Module):
    """`layer` followed by `step(y, a, b)` with a per-channel scale `a` and shift `b`."""

    def __init__(self, layer, step, scale_shape, shift_shape=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer, self.step = layer, step
        sign = torch.randint(0, 2, scale_shape, generator=g) * 2 - 1
        self.a = nn.Parameter((torch.rand(scale_shape, generator=g) + 0.5) * sign)
        self.b = nn.Parameter(torch.randn(shift_shape or scale_shape, generator=g))

    def forward(self, x):
        return self.step(self.layer(x), self.a, self.b)


def conv_then(step, scale_shape=(6, 1, 1), shift_shape=None, **conv_kwargs):
    conv = nn.Conv2d(4, 6, 3, **conv_kwargs)
    return ThenAffine(conv, step, scale_shape, shift_shape)


X = torch.randn(2, 4, 8, 8)

STEPS = {
    "y*a": lambda y, a, b: y * a,
    "a*y": lambda y, a, b: a * y,
    "y/a": lambda y, a, b: y / a,
    "y+b": lambda y, a, b: y + b,
    "b+y": lambda y, a, b: b + y,
    "y-b": lambda y, a, b: y - b,
    "b-y": lambda y, a, b: b - y,
    "2-y": lambda y, a, b: 2 - y,
    "y*0.5": lambda y, a, b: y * 0.5,
    "y/4": lambda y, a, b: y / 4,
    "add-alpha": lambda y, a, b: torch.add(y, b, alpha=2),
    "sub-alpha": lambda y, a, b: torch.sub(y, b, alpha=0.5),
    "b+alpha*y": lambda y, a, b: torch.add(b, y, alpha=-3),
}


@pytest.mark.parametrize("name", STEPS)
def test_fold_channel_affine_folds_each_elementwise_form_into_the_conv(name):
    result = apply_pass(fold_channel_affine, conv_then(STEPS[name]), X, dynamic_batch=True)
    assert sum(result.applied.values()) == 1
    assert count_ops(result.graph_module, *AFFINE_OPS) == 0
    assert count_ops(result.graph_module, aten.conv2d) == 1


def test_fold_channel_affine_folds_scale_then_shift_step_by_step_and_counts_match_applied():
    model = conv_then(lambda y, a, b: y * a + b, shift_shape=(1, 6, 1, 1), bias=False)
    result = apply_pass(fold_channel_affine, model, X)
    assert result.applied == {"channel-scale": 1, "channel-shift": 1}
    assert count_ops(result.graph_module, aten.mul, aten.add) == 0
    (conv,) = [n for n in result.graph_module.graph.nodes if n.target is aten.conv2d.default]
    assert conv.args[2] is not None  # the conv had no bias; the fold created one


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_channel_affine_matches_eager_for_conv_and_conv_transpose(dims, transposed):
    conv = (TCONV if transposed else CONV)[dims](4, 6, 3, stride=2, groups=2, dilation=2)
    model = ThenAffine(conv, lambda y, a, b: (y * a - b) / a, (6, *[1] * dims))
    result = apply_pass(fold_channel_affine, model, torch.randn(2, 4, *[7] * dims))
    assert result.applied == {"channel-scale": 2, "channel-shift": 1}
    assert count_ops(result.graph_module, *AFFINE_OPS) == 0


def test_fold_channel_affine_folds_layer_scale_after_linear():
    model = ThenAffine(nn.Linear(8, 6), lambda y, a, b: y * a, (6,))
    result = apply_pass(fold_channel_affine, model, torch.randn(2, 5, 8), dynamic_batch=True)
    assert result.applied == {"channel-scale": 1}
    assert count_ops(result.graph_module, aten.mul) == 0


def test_fold_channel_affine_on_zoo_model_folds_every_layer_scale():
    if "convnext_atto_like" not in fxopt.models.list():
        pytest.skip("convnext_atto_like is not in the zoo yet")
    model = fxopt.models.create("convnext_atto_like")
    (x,) = fxopt.models.example_inputs("convnext_atto_like", batch=2)
    before = graph_of(model, x)
    result = apply_pass(fold_channel_affine, model, x)
    blocks = sum(len(stage) for stage in model.stages)
    assert result.applied == {"channel-scale": blocks}
    assert count_ops(result.graph_module, aten.mul) == count_ops(before, aten.mul) - blocks
    assert count_ops(result.graph_module, aten.linear) == count_ops(before, aten.linear)


def test_fold_channel_affine_is_idempotent():
    model = conv_then(lambda y, a, b: y * a + b)
    gm = fold_channel_affine(graph_of(model, X)).graph_module
    again = fold_channel_affine(gm)
    assert not again.modified and again.applied == {}


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.a = nn.Parameter(torch.rand(6, 1, 1) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        return y * self.a + y


class SharedWeight(SharedOutput):
    """One conv module called twice; scaling its weight would change the other call."""

    def forward(self, x):
        return self.conv(x) * self.a + self.conv(x)


class InputScale(SharedOutput):
    def forward(self, x):
        return self.conv(x) * x.mean()


class ScaledTwice(SharedOutput):
    """The scale is itself written in place before use."""

    def forward(self, x):
        a = self.a * 1.0
        a.mul_(2)
        return self.conv(x) * a


@pytest.mark.parametrize(
    "model",
    [
        SharedOutput(),
        SharedWeight(),
        InputScale(),
        ScaledTwice(),
        conv_then(STEPS["y*a"], scale_shape=(1, 6, 6, 6)),  # varies over space
        conv_then(STEPS["y*a"], scale_shape=(2, 1, 1, 1)),  # varies over the batch
        conv_then(STEPS["y*a"], scale_shape=(1, 1, 6, 1, 1)),  # adds an axis
        conv_then(STEPS["y*a"], scale_shape=(1, 1, 1, 6)),  # the last axis is not the channel
        conv_then(lambda y, a, b: a / y),
    ],
    ids=[
        "shared-output",
        "shared-weight",
        "input-scale",
        "scale-written-in-place",
        "scale-over-space",
        "scale-over-batch",
        "scale-adds-axis",
        "scale-on-width",
        "reciprocal",
    ],
)
def test_fold_channel_affine_declines_when_precondition_fails(model):
    assert_declines(fold_channel_affine, model, X)


def test_fold_channel_affine_declines_when_the_scale_would_promote_the_dtype():
    model = conv_then(STEPS["y*a"]).double()
    model.layer.float()
    assert_declines(fold_channel_affine, model, X)


def test_fold_channel_affine_declines_division_by_a_constant_containing_zero():
    model = conv_then(STEPS["y/a"])
    with torch.no_grad():
        model.a[2] = 0.0
    assert_declines(fold_channel_affine, model, X)


def test_fold_channel_affine_declines_when_the_linear_scale_varies_over_tokens():
    model = ThenAffine(nn.Linear(8, 6), STEPS["y*a"], (5, 1))
    assert_declines(fold_channel_affine, model, torch.randn(2, 5, 8))


def test_fold_channel_affine_in_optimize_removes_layer_scale_and_matches_eager():
    model = ThenAffine(nn.Linear(8, 6), lambda y, a, b: y * a + b, (6,)).eval()
    x = torch.randn(3, 5, 8)
    opt = fxopt.optimize(model, x)  # the default pipeline
    record = next(p for p in opt.report.passes if p.name == "fold_channel_affine")
    assert record.status == "applied", str(opt.report)
    assert not {"mul", "add"} & set(opt.report.after.op_counts)
    assert opt.report.after.op_counts["linear"] == 1
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


def test_per_channel_accepts_channel_and_scalar_shapes_only():
    a = torch.arange(6.0)
    assert torch.equal(per_channel(a.reshape(6, 1, 1), 4, 1, 6), a.double())
    assert torch.equal(per_channel(a.reshape(1, 6, 1, 1), 4, 1, 6), a.double())
    assert torch.equal(per_channel(torch.tensor(2.0), 4, 1, 6), torch.full((6,), 2.0).double())
    assert torch.equal(per_channel(a, 3, 2, 6), a.double())
    assert per_channel(a, 4, 1, 6) is None  # (6,) lines up with width, not channels
    assert per_channel(a.reshape(1, 1, 6, 1, 1), 4, 1, 6) is None
    assert per_channel(torch.ones(2, 6, 1, 1), 4, 1, 6) is None
    assert per_channel(torch.ones(3, 1, 1), 4, 1, 6) is None


@pytest.mark.parametrize(
    "op, first, alpha, expected",
    [
        ("mul", False, 1, lambda y, v: y * v),
        ("mul", True, 1, lambda y, v: v * y),
        ("div", False, 1, lambda y, v: y / v),
        ("add", False, 2, lambda y, v: y + 2 * v),
        ("add", True, 2, lambda y, v: v + 2 * y),
        ("sub", False, 3, lambda y, v: y - 3 * v),
        ("sub", True, 3, lambda y, v: v - 3 * y),
        ("rsub", False, 0.5, lambda y, v: v - 0.5 * y),
    ],
)
def test_elementwise_affine_matches_the_op(op, first, alpha, expected):
    y, value = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    scale, shift = elementwise_affine(op, value, first, alpha)
    torch.testing.assert_close(y * scale + shift, expected(y, value))


def test_elementwise_affine_refuses_a_reciprocal():
    with pytest.raises(ValueError):
        elementwise_affine("div", torch.ones(3), operand_first=True)


def apply_step(y, op, value, first, alpha):
    if op == "mul":
        return value * y if first else y * value
    if op == "div":
        return y / value
    if op == "add":
        return value + y if first else torch.add(y, value, alpha=alpha)
    return value - y if first else torch.sub(y, value, alpha=alpha)


class Chain(nn.Module):
    def __init__(self, layer, steps, values):
        super().__init__()
        self.layer, self.steps = layer, steps
        self.values = nn.ParameterList(v for v in values if isinstance(v, torch.Tensor))
        self.scalars = [v for v in values if not isinstance(v, torch.Tensor)]

    def forward(self, x):
        y = self.layer(x)
        tensors, scalars = iter(self.values), iter(self.scalars)
        for op, is_tensor, first, alpha in self.steps:
            value = next(tensors) if is_tensor else next(scalars)
            y = apply_step(y, op, value, first, alpha)
        return y


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["conv", "transposed", "linear"]))
    groups = draw(st.sampled_from([1, 2]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    bias = draw(st.booleans())
    if kind == "linear":
        rank = draw(st.integers(2, 3))
        x = torch.randn(*[draw(st.integers(2, 3)) for _ in range(rank - 1)], in_ch)
        return nn.Linear(in_ch, out_ch, bias=bias), x, rank - 1
    dims, kernel = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    if kind == "transposed":
        layer = TCONV[dims](
            in_ch, out_ch, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias
        )
    else:
        layer = CONV[dims](
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            dilation=dilation,
            padding=draw(st.integers(0, 1)),
            groups=groups,
            bias=bias,
        )
    size = draw(st.integers(5, 7 if dims < 3 else 5))  # conv3d is slow on a CPU
    x = torch.randn(draw(st.integers(2, 3)), in_ch, *[size] * dims)
    return layer, x, 1


@st.composite
def affine_chains(draw):
    layer, x, axis = draw(layers())
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    rank = x.dim()
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    steps, values = [], []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["mul", "div", "add", "sub"]))
        form = draw(st.sampled_from(["scalar", "0-dim", "channel", "channel-keepdim"]))
        first = op != "div" and draw(st.booleans())
        alpha = draw(st.sampled_from([1, 2, -0.5])) if op in ("add", "sub") and not first else 1
        shape = {
            "scalar": (),
            "0-dim": (),
            "channel": (channels,) + (1,) * (rank - axis - 1),
            "channel-keepdim": (1,) * axis + (channels,) + (1,) * (rank - axis - 1),
        }[form]
        value = (torch.rand(shape, generator=g) + 0.5) * (1 if draw(st.booleans()) else -1)
        if form == "scalar":
            value = float(value)
        else:
            value = nn.Parameter(value)
        steps.append((op, form != "scalar", first, alpha))
        values.append(value)
    return Chain(layer, steps, values), x, draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(affine_chains())
def test_fold_channel_affine_property_random_affine_chains_fold_into_the_layer(case):
    model, x, dynamic = case
    result = apply_pass(fold_channel_affine, model, x, dynamic_batch=dynamic)
    assert sum(result.applied.values()) == len(model.steps)
    assert count_ops(result.graph_module, *AFFINE_OPS) == 0
