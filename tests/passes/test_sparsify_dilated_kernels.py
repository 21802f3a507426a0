import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.decompose_math import Grid, grid_kernel, tap_grid
from fxopt.analysis.kernels import dilate
from fxopt.passes.sparsify_dilated_kernels import sparsify_dilated_kernels
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.testing import apply_pass, assert_declines, graph_of

aten = torch.ops.aten
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FixedConv(nn.Module):
    """A conv with a fixed weight (a buffer, as a filter bank's kernels are)."""

    def __init__(self, weight, bias=None, **options):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.options = options

    def forward(self, x):
        return CONV[self.weight.dim() - 2](x, self.weight, self.bias, **self.options)


def placed(kernel, size, start):
    """`kernel` inside a zero kernel of `size` taps per axis, from tap `start` on."""
    dense = kernel.new_zeros(*kernel.shape[:2], *size)
    index = (..., *(slice(s, s + k) for s, k in zip(start, kernel.shape[2:], strict=True)))
    dense[index] = kernel
    return dense


def the_conv(gm):
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    return node


def geometry(gm):
    """(kernel shape, padding, dilation) of the graph's only conv."""
    node = the_conv(gm)
    padding = node.args[4] if isinstance(node.args[4], str) else list(node.args[4])
    return tuple(node.args[1].meta["val"].shape), padding, list(node.args[5])


# the tensor math


def test_tap_grid_finds_the_coarsest_grid_holding_every_nonzero_tap():
    kernel = placed(dilate(torch.randn(2, 2, 3, 2), (2, 3)), (7, 5), (1, 0))
    grid = tap_grid(kernel)
    assert grid == Grid(start=(1, 0), stop=(5, 3), step=(2, 3))
    assert grid_kernel(kernel, grid).shape == (2, 2, 3, 2)
    assert tap_grid(torch.zeros(1, 1, 3, 3)) is None


# structural and numerical


def grid_3x3(channels=8, per_group=8, step=(2, 2)):
    return dilate(torch.randn(channels, per_group, 3, 3), step)


CASES = {  # weight, conv options, expected (kernel shape, padding, dilation)
    "depthwise": (grid_3x3(per_group=1), dict(padding=2, groups=8), ((8, 1, 3, 3), [2, 2], [2, 2])),
    "same": (grid_3x3(step=(3, 3)), dict(padding="same"), ((8, 8, 3, 3), "same", [3, 3])),
    "crop": (
        placed(grid_3x3(step=(1, 1)), (7, 7), (2, 2)),
        dict(padding=3),
        ((8, 8, 3, 3), [1, 1], [1, 1]),
    ),
    "offset-grid": (
        placed(grid_3x3(), (7, 7), (1, 1)),
        dict(padding=3),
        ((8, 8, 3, 3), [2, 2], [2, 2]),
    ),
    "already-dilated": (
        dilate(torch.randn(8, 8, 2, 2), (2, 2)),
        dict(padding=3, dilation=2),
        ((8, 8, 2, 2), [3, 3], [4, 4]),
    ),
    "strided-band": (
        dilate(torch.randn(8, 8, 3, 1), (2, 1)),
        dict(padding=(2, 0), stride=2),
        ((8, 8, 3, 1), [2, 0], [2, 1]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_sparsify_dilated_kernels_turns_a_kernel_on_a_grid_into_a_dilated_conv(case):
    weight, options, expected = CASES[case]
    model = FixedConv(weight, torch.randn(8), **options)
    result = apply_pass(sparsify_dilated_kernels, model, torch.randn(2, 8, 15, 15))
    assert result.applied == {"sparsify-dilated": 1}
    assert geometry(result.graph_module) == expected


@pytest.mark.parametrize("dims", [1, 3])
def test_sparsify_dilated_kernels_handles_conv1d_and_conv3d(dims):
    weight = dilate(torch.randn(4, 4, *(3,) * dims), (2,) * dims)
    model = FixedConv(weight, padding=2)
    result = apply_pass(sparsify_dilated_kernels, model, torch.randn(2, 4, *(9,) * dims))
    assert result.applied == {"sparsify-dilated": 1}
    assert geometry(result.graph_module)[2] == [2] * dims


def test_sparsify_dilated_kernels_keeps_image_filter_net_equivalent():
    """The a trous B3-spline is stored as a dense 9x9 kernel; it becomes a 5x5 at dilation 2."""
    model = fxopt.models.create("image_filter_net")
    (x,) = fxopt.models.example_inputs("image_filter_net", batch=2)
    result = apply_pass(sparsify_dilated_kernels, model, x)
    assert result.applied == {"sparsify-dilated": 1}
    opt = fxopt.optimize(model, (x,))  # the default pipeline runs the pass
    assert opt.report.rolled_back == []
    records = [r for r in opt.report.passes if r.name == "sparsify_dilated_kernels"]
    assert [r.applied for r in records] == [{"sparsify-dilated": 1}]
    fxopt.testing.assert_equivalent(model, opt, (x,), n_random=1)


class DenseDilatedBranches(nn.Module):
    """Dilated and dense branches that merge_parallel_convs merges into one dense kernel, then
    a kernel that is zero off a grid, and a residual."""

    def __init__(self, channels=8):
        super().__init__()
        self.small = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=channels)
        self.large = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.register_buffer("sparse", dilate(torch.randn(channels, 1, 3, 3), (3, 3)))

    def forward(self, x):
        y = self.small(x) + self.large(x)
        return F.conv2d(y, self.sparse, padding=3, groups=y.shape[1]) + x


@pytest.mark.parametrize("name", ["unireplknet_like", "image_filter_net", None])
def test_sparsify_dilated_kernels_and_the_default_pipeline_reach_a_fixed_point(name):
    """The default pipeline twice, then both decompositions: running them all again changes
    nothing (merge_parallel_convs does not densify what this pass made dilated)."""
    if name is None:
        model, inputs = DenseDilatedBranches().eval(), (torch.randn(2, 8, 16, 16),)
    else:
        model, inputs = fxopt.models.create(name), fxopt.models.example_inputs(name, batch=2)
    decompositions = ["sparsify_dilated_kernels", "split_separable_kernels"]
    first = [*DEFAULT_PIPELINE, *DEFAULT_PIPELINE, *decompositions]
    opt = fxopt.optimize(model, inputs, passes=[*first, *DEFAULT_PIPELINE, *decompositions])
    assert opt.report.rolled_back == []
    again = opt.report.passes[len(first) :]
    assert [r.name for r in again if r.status != "no change"] == []
    fired = {r.name for r in opt.report.passes[: len(first)] if r.status == "applied"}
    if name is None:
        assert {"merge_parallel_convs", "sparsify_dilated_kernels"} <= fired
    if name == "image_filter_net":
        assert set(decompositions) <= fired
    fxopt.testing.assert_equivalent(model, opt, inputs)


# property


@st.composite
def sparse_convs(draw):
    """A conv whose kernel is a small one dilated by `step` and centred in zeros, with padding
    that reaches the first tap; and whether that kernel has zeros to drop."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    small = [draw(st.integers(1, 3)) for _ in range(dims)]
    step = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    kernel = dilate(torch.randn(2 * groups, 2, *small), step)
    start = [draw(st.integers(0, 1)) for _ in range(dims)]
    size = [k + 2 * s for k, s in zip(kernel.shape[2:], start, strict=True)]
    weight = placed(kernel, size, start)
    padding = [s * d + draw(st.integers(0, 2)) for s, d in zip(start, dilation, strict=True)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    bias = torch.randn(2 * groups) if draw(st.booleans()) else None
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    lengths = [
        draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 6))
        for d, k in zip(dilation, size, strict=True)
    ]
    sparse = any(s > 0 or (k > 1 and t > 1) for s, k, t in zip(start, small, step, strict=True))
    return FixedConv(weight, bias, **options), torch.randn(2, 2 * groups, *lengths), sparse


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(sparse_convs())
def test_sparsify_dilated_kernels_keeps_random_sparse_convs_equivalent(case):
    model, x, sparse = case
    result = apply_pass(sparsify_dilated_kernels, model, x)
    assert result.applied == ({"sparsify-dilated": 1} if sparse else {})
    weight = the_conv(result.graph_module).args[1]
    kept = getattr(result.graph_module, weight.target)
    assert int(kept.ne(0).sum()) == int(model.weight.ne(0).sum())  # only zeros are dropped
    assert (kept.numel() < model.weight.numel()) == sparse


def test_sparsify_dilated_kernels_is_idempotent():
    model = FixedConv(dilate(torch.randn(4, 4, 3, 3), (2, 2)), padding=2)
    first = sparsify_dilated_kernels(graph_of(model.eval(), torch.randn(1, 4, 9, 9)))
    assert first.modified
    again = sparsify_dilated_kernels(first.graph_module)
    assert not again.modified and again.applied == {}


# declines


class WeightFromInput(nn.Module):
    def forward(self, x, weight):
        return F.conv2d(x, weight, padding=2)


class SharedWeight(FixedConv):
    def forward(self, x):
        return super().forward(x) + super().forward(2 * x)


def test_sparsify_dilated_kernels_leaves_a_dense_kernel_alone():
    declined = assert_declines(
        sparsify_dilated_kernels,
        FixedConv(torch.randn(4, 4, 3, 3), padding=1),
        torch.randn(1, 4, 8, 8),
    ).declined
    assert declined == {}


def test_sparsify_dilated_kernels_declines_a_weight_that_is_not_a_constant():
    weight = dilate(torch.randn(4, 4, 3, 3), (2, 2))
    assert_declines(sparsify_dilated_kernels, WeightFromInput(), torch.randn(1, 4, 9, 9), weight)


def test_sparsify_dilated_kernels_declines_a_shared_weight():
    model = SharedWeight(dilate(torch.randn(4, 4, 3, 3), (2, 2)), padding=2)
    declined = assert_declines(sparsify_dilated_kernels, model, torch.randn(1, 4, 9, 9)).declined
    assert "read by another op" in declined["sparsify-dilated"][0]


@pytest.mark.parametrize(
    ("start", "options"),
    [((2, 2), dict(padding=0)), ((2, 2), dict(padding=3, stride=2))],
    ids=["padding-below-zero", "asymmetric-padding-changes-the-output-size"],
)
def test_sparsify_dilated_kernels_declines_a_grid_the_padding_cannot_express(start, options):
    weight = placed(dilate(torch.randn(4, 4, 3, 3), (2, 2)), (7, 7), start)
    declined = assert_declines(
        sparsify_dilated_kernels, FixedConv(weight, **options), torch.randn(1, 4, 16, 16)
    ).declined
    assert "need padding" in declined["sparsify-dilated"][0]


def test_sparsify_dilated_kernels_leaves_transposed_convs_alone():
    model = nn.ConvTranspose2d(4, 4, 5, padding=2)
    with torch.no_grad():
        model.weight.copy_(dilate(torch.randn(4, 4, 3, 3), (2, 2)))
    assert_declines(sparsify_dilated_kernels, model, torch.randn(1, 4, 9, 9))


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(sparse_convs())
def test_sparsify_dilated_kernels_keeps_random_sparse_convs_equivalent_at_length(case):
    test_sparsify_dilated_kernels_keeps_random_sparse_convs_equivalent.hypothesis.inner_test(case)
