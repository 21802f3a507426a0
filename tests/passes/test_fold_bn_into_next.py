import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import seeded, x_for
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.affine import bn_scale_shift, input_shift_bias, scale_input_channels
from fxopt.passes.fold_bn_into_next import fold_bn_into_next
from fxopt.testing import apply_pass, count_ops, graph_of
from fxopt.testing.strategies import randomize_batch_norm

aten = torch.ops.aten
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


randomized = randomize_batch_norm


def bn_conv(dims=2, in_channels=4, affine=True, **conv_kwargs) -> nn.Sequential:
    conv = CONV[dims](in_channels, 6, **{"kernel_size": 1, **conv_kwargs})
    return nn.Sequential(randomized(BN[dims](in_channels, affine=affine)), conv).eval()


def naive_fold(bn: nn.Module, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The BN -> conv fold written out by hand (groups 1): W * s per input channel, and
    b + sum over input channels and taps of W * t. Independent of fxopt's helpers."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    weight = conv.weight.detach()
    folded = weight * scale.reshape(1, -1, 1, 1)
    bias = conv.bias.detach() + (weight * shift.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return folded, bias


# -- the tensor math, on its own ---------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_input_channel_helpers_fold_an_affine_before_an_unpadded_conv(dims, groups, bias):
    g = torch.Generator().manual_seed(dims * 10 + groups)
    x = torch.randn(2, 3 * groups, *([6] * dims), dtype=torch.float64, generator=g)
    w = torch.randn(2 * groups, 3, *([3] * dims), dtype=torch.float64, generator=g)
    b = torch.randn(2 * groups, dtype=torch.float64, generator=g) if bias else None
    scale, shift = torch.randn(3 * groups, generator=g), torch.randn(3 * groups, generator=g)
    per_channel = (1, -1) + (1,) * dims
    conv = CONV_FN[dims]
    expected = conv(
        x * scale.double().reshape(per_channel) + shift.double().reshape(per_channel),
        w,
        b,
        stride=2,
        dilation=2,
        groups=groups,
    )
    folded = conv(
        x,
        scale_input_channels(w, scale, groups),
        input_shift_bias(w, b, shift, groups),
        stride=2,
        dilation=2,
        groups=groups,
    )
    torch.testing.assert_close(folded, expected)


def test_scale_input_channels_maps_each_group_to_its_own_input_channels():
    w = torch.ones(4, 2, 1, 1)  # groups=2: out 0,1 read in 0,1; out 2,3 read in 2,3
    scaled = scale_input_channels(w, torch.tensor([1.0, 2.0, 3.0, 4.0]), groups=2)
    assert scaled[:, :, 0, 0].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]


def test_input_shift_bias_sums_over_every_kernel_tap():
    w = torch.ones(1, 1, 3, 3)
    assert input_shift_bias(w, torch.tensor([1.0]), torch.tensor([2.0])).item() == 19.0


# -- structural ----------------------------------------------------------------------------------


def test_fold_bn_into_next_removes_the_batch_norm_and_counts_match_applied():
    model = nn.Sequential(bn_conv(), nn.ReLU())
    result = apply_pass(fold_bn_into_next, model, x_for(2))
    assert result.modified and result.applied == {"bn-conv": 1}
    assert count_ops(result.graph_module, aten.batch_norm) == 0
    assert count_ops(result.graph_module, aten.conv2d) == 1


def test_fold_bn_into_next_counts_match_applied_on_a_chain():
    model = nn.Sequential(
        randomized(nn.BatchNorm2d(4), 1),
        nn.Conv2d(4, 8, 1),
        randomized(nn.BatchNorm2d(8), 2),
        nn.Conv2d(8, 8, 3),  # unpadded k x k: folds
        randomized(nn.BatchNorm2d(8), 3),
        nn.Conv2d(8, 8, 3, padding=1),  # padded: stays
    ).eval()
    gm = graph_of(model, x_for(2))
    result = fold_bn_into_next(gm)
    assert result.applied == {"bn-conv": 2}
    assert count_ops(result.graph_module, aten.batch_norm) == 1


# -- numerical -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 1},
        {"kernel_size": 1, "padding": "same"},
        {"kernel_size": 3, "padding": "valid"},
        {"kernel_size": 3, "stride": 2, "dilation": 2, "groups": 2},
        {"kernel_size": 2, "bias": False},
    ],
    ids=["1x1", "1x1-same", "3x3-valid", "3x3-strided-dilated-grouped", "2x2-no-bias"],
)
def test_fold_bn_into_next_matches_eager_on_unpadded_convs(dims, conv_kwargs):
    result = apply_pass(fold_bn_into_next, bn_conv(dims, **conv_kwargs), x_for(dims))
    assert result.applied == {"bn-conv": 1}


def test_fold_bn_into_next_handles_non_affine_norm_and_a_symbolic_batch():
    result = apply_pass(fold_bn_into_next, bn_conv(affine=False), x_for(2), dynamic_batch=True)
    assert result.applied == {"bn-conv": 1}
    assert result.graph_module(x_for(2, batch=5)).shape == (5, 6, 9, 9)


def test_fold_bn_into_next_on_zoo_model_matches_eager():
    """MobileNetV2's linear bottleneck ends in a BN that feeds the next block's 1x1 expand conv
    where there is no residual."""
    if "mobilenetv2_like" not in fxopt.models.list():
        pytest.skip("mobilenetv2_like is not in the zoo")
    model = fxopt.models.create("mobilenetv2_like")
    (x,) = fxopt.models.example_inputs("mobilenetv2_like", batch=2)
    norms = count_ops(graph_of(model, x), aten.batch_norm)
    result = apply_pass(fold_bn_into_next, model, x)
    assert result.applied.get("bn-conv", 0) >= 1
    assert count_ops(result.graph_module, aten.batch_norm) == norms - result.applied["bn-conv"]


class PreActivationChannelMlp(nn.Module):
    """A pre-norm channel MLP: BN -> 1x1 conv -> GELU -> 1x1 conv, plus a residual."""

    def __init__(self, channels=8, hidden=32):
        super().__init__()
        self.norm = randomized(nn.BatchNorm2d(channels), seed=4)
        self.expand, self.project = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.project(F.gelu(self.expand(self.norm(x))))


def test_optimize_removes_the_batch_norm_before_a_1x1_conv_and_matches_eager():
    model = PreActivationChannelMlp().eval()
    x = torch.randn(2, 8, 7, 7)
    opt = fxopt.optimize(model, x)
    assert "batch_norm" not in opt.report.after.op_counts
    assert "fold_bn_into_next" not in opt.report.rolled_back
    for inputs in (x, torch.randn(3, 8, 7, 7)):
        torch.testing.assert_close(opt(inputs), model(inputs), rtol=1e-5, atol=1e-5)


# -- property ------------------------------------------------------------------------------------


@st.composite
def bn_conv_cases(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    # padding 0 in its three spellings folds; zero padding > 0 must decline
    paddings = [0, 0, "valid", 1, 2] + (["same"] if stride == 1 else [])
    padding = draw(st.sampled_from(paddings))
    seed = draw(st.integers(0, 2**16))
    conv = seeded(
        CONV[dims](
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
        ),
        seed,
        scale=0.3,
    )
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bn = randomized(BN[dims](in_ch, eps=eps, affine=draw(st.booleans())), seed + 1)
    size = draw(st.integers(dilation * (kernel - 1) + 1, 8 if dims < 3 else 5))
    x = torch.randn(
        draw(st.integers(1, 3)),
        in_ch,
        *([size] * dims),
        generator=torch.Generator().manual_seed(seed),
    )
    folds = padding in (0, "valid") or (padding == "same" and kernel == 1)
    return nn.Sequential(bn, conv).eval(), x, folds


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=200, deadline=None)
@given(bn_conv_cases())
def test_fold_bn_into_next_property_folds_exactly_when_the_conv_is_unpadded(case):
    model, x, folds = case
    result = apply_pass(fold_bn_into_next, model, x)
    assert result.applied == ({"bn-conv": 1} if folds else {})
    assert count_ops(result.graph_module, aten.batch_norm) == (0 if folds else 1)


# -- idempotence ---------------------------------------------------------------------------------


def test_fold_bn_into_next_is_idempotent():
    gm = fold_bn_into_next(graph_of(bn_conv(kernel_size=3), x_for(2))).graph_module
    again = fold_bn_into_next(gm)
    assert not again.modified and again.applied == {}


# -- declines, and the negative control: BN before a zero-padded conv -------------------------


@pytest.mark.parametrize("kernel", [3, 1])
def test_fold_bn_into_next_declines_before_a_zero_padded_conv(kernel):
    model = bn_conv(kernel_size=kernel, padding=1)
    gm = graph_of(model, x_for(2))
    code = gm.code
    result = fold_bn_into_next(gm)
    assert not result.modified and result.graph_module.code == code


@pytest.mark.parametrize("kernel", [3, 1])
def test_a_naive_fold_before_a_zero_padded_conv_differs_from_eager_at_the_borders(kernel):
    """Why the decline above is needed: the padded zeros are not normalized, so a hand-written
    fold agrees with eager in the interior and differs on the one-pixel border."""
    model = bn_conv(kernel_size=kernel, padding=1)
    bn, conv = model[0], model[1]
    x = x_for(2)
    weight, bias = naive_fold(bn, conv)
    with torch.no_grad():
        expected, naive = model(x), F.conv2d(x, weight, bias, padding=1)
    interior = (..., slice(1, -1), slice(1, -1))
    torch.testing.assert_close(naive[interior], expected[interior], rtol=1e-5, atol=1e-5)
    border = torch.ones_like(expected, dtype=torch.bool)
    border[interior] = False
    assert (naive - expected)[border].abs().max() > 1e-2
    # the same hand-written fold is right on the unpadded conv the pass does fold
    unpadded = bn_conv(kernel_size=kernel)
    unpadded.load_state_dict(model.state_dict())
    weight, bias = naive_fold(unpadded[0], unpadded[1])
    torch.testing.assert_close(
        F.conv2d(x, weight, bias), unpadded(x).detach(), rtol=1e-5, atol=1e-5
    )


class GenericConvolution(nn.Module):
    """`aten.convolution`, the overload that carries `transposed` as an argument. Square
    weights, so that only the `transposed` flag tells the channel layouts apart."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.bn, self.transposed = randomized(nn.BatchNorm2d(4)), transposed
        self.weight, self.bias = nn.Parameter(torch.randn(4, 4, 1, 1)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.ops.aten.convolution(
            self.bn(x), self.weight, self.bias, [1, 1], [0, 0], [1, 1], self.transposed, [0, 0], 1
        )


def test_fold_bn_into_next_folds_into_generic_aten_convolution():
    result = apply_pass(fold_bn_into_next, GenericConvolution(transposed=False), x_for(2))
    assert result.applied == {"bn-conv": 1}


class SharedNormOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(x)
        return self.conv(y) + y


class SharedConvWeight(nn.Module):
    """One conv called twice, one call after BN (pytorch issue 104593's mirror image)."""

    def __init__(self, bias=True):
        super().__init__()
        self.bn = randomized(nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1, bias=bias)

    def forward(self, x):
        return self.conv(self.bn(x)) + self.conv(x)


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


class WeightFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm2d(4))

    def forward(self, x, w):
        return F.conv2d(self.bn(x), w)


class UnbatchedConv(nn.Module):
    """BatchNorm1d on a 2-D (C, L) tensor normalizes dim 1 (L), but conv1d reads that tensor
    unbatched with C channels; C == L makes the channel counts agree anyway."""

    def __init__(self):
        super().__init__()
        self.bn = randomized(nn.BatchNorm1d(5))
        self.conv = nn.Conv1d(5, 3, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


DECLINES = {
    "same-3x3": (bn_conv(kernel_size=3, padding="same"), (x_for(2),)),
    "transposed": (
        nn.Sequential(randomized(nn.BatchNorm2d(4)), nn.ConvTranspose2d(4, 6, 3)),
        (x_for(2),),
    ),
    "transposed-convolution": (GenericConvolution(transposed=True), (x_for(2),)),
    "bn-relu-conv": (
        nn.Sequential(randomized(nn.BatchNorm2d(4)), nn.ReLU(), nn.Conv2d(4, 6, 1)),
        (x_for(2),),
    ),
    "bn-linear": (
        nn.Sequential(randomized(nn.BatchNorm1d(4)), nn.Linear(4, 6)),
        (torch.randn(3, 4),),
    ),
    "shared-norm-output": (SharedNormOutput(), (x_for(2),)),
    "shared-weight": (SharedConvWeight(bias=False), (x_for(2),)),
    "shared-weight-and-bias": (SharedConvWeight(), (x_for(2),)),
    "no-running-stats": (NoRunningStats(), (x_for(2),)),
    "weight-from-input": (WeightFromInput(), (x_for(2), torch.randn(6, 4, 1, 1))),
    "unbatched-conv": (UnbatchedConv(), (torch.randn(5, 5),)),
}


@pytest.mark.parametrize("name", DECLINES)
def test_fold_bn_into_next_declines_when_precondition_fails(name):
    model, inputs = DECLINES[name]
    gm = graph_of(model.eval(), *inputs)
    code = gm.code
    result = fold_bn_into_next(gm)
    assert not result.modified and result.applied == {}
    assert result.graph_module.code == code
    torch.testing.assert_close(result.graph_module(*inputs), model(*inputs))


def test_a_naive_fold_into_an_unbatched_conv_would_be_wrong():
    model = UnbatchedConv().eval()
    x = torch.randn(5, 5)
    scale, shift = bn_scale_shift(
        model.bn.running_mean, model.bn.running_var, model.bn.weight, model.bn.bias, model.bn.eps
    )
    conv = model.conv
    naive = F.conv1d(
        x,
        scale_input_channels(conv.weight.detach(), scale),
        input_shift_bias(conv.weight.detach(), conv.bias.detach(), shift),
    )
    assert (naive - model(x)).abs().max() > 1e-2


def test_fold_bn_into_next_leaves_the_model_untouched():
    model = bn_conv(kernel_size=3)
    state = copy.deepcopy(model.state_dict())
    apply_pass(fold_bn_into_next, model, x_for(2))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
