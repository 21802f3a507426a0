import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.passes.decompose_large_kernel import (
    DecomposeSettings,
    decompose_large_kernel,
    project,
)
from fxopt.pipeline import output_error, run_passes
from fxopt.report import Report
from fxopt.testing import apply_pass, count_ops, graph_of
from fxopt.verify import input_sets

aten = torch.ops.aten


def support(k: int) -> torch.Tensor:
    """The taps the square and band branches can hold."""
    mask, c = torch.zeros(k, k, dtype=torch.bool), k // 2
    mask[c - 1 : c + 2, c - 1 : c + 2] = True
    mask[c, :] = mask[:, c] = True
    return mask


def depthwise(k=31, channels=16, on_support=False, seed=0, **kwargs):
    options = {"padding": k // 2, "groups": channels} | kwargs
    net = nn.Sequential(nn.Conv2d(channels, channels, k, **options)).eval()
    if on_support:
        with torch.no_grad():
            net[0].weight.mul_(support(k))
    return net


def x_for(channels=16, batch=8, size=32):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def centred_sum(square, row, column, k):
    kernel, c = torch.zeros(*square.shape[:2], k, k, dtype=square.dtype), k // 2
    kernel[..., c - 1 : c + 2, c - 1 : c + 2] += square
    kernel[..., c : c + 1, :] += row
    kernel[..., :, c : c + 1] += column
    return kernel


def test_decompose_large_kernel_replaces_the_dense_conv_by_three_branches():
    result = apply_pass(decompose_large_kernel, depthwise(on_support=True), x_for())
    assert result.applied == {"dw-square-bands": 1}
    gm = result.graph_module
    shapes = sorted(tuple(t.shape[-2:]) for n, t in gm.named_buffers() if "calib_band" in n)
    assert shapes == [(1, 31), (3, 3), (31, 1)]
    assert count_ops(gm, aten.conv2d) == 3 and count_ops(gm, aten.add) == 2
    assert result.summary["max relative residual"] == pytest.approx(0.0, abs=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(3, 12).map(lambda n: 2 * n + 1), channels=st.integers(1, 4), seed=st.integers()
)
def test_projection_is_the_least_squares_fit_on_the_branch_supports(k, channels, seed):
    kernel = torch.randn(channels, 1, k, k, generator=torch.Generator().manual_seed(seed % 2**32))
    square, row, column, residual = project(kernel)
    kept = centred_sum(square, row, column, k)
    assert torch.allclose(kept, kernel * support(k), atol=1e-6)  # keeps the supported taps
    assert torch.all(kept[..., ~support(k)] == 0)
    # the residual is orthogonal to every kernel on the supports, hence least squares
    assert abs(((kernel - kept) * kept).sum().item()) < 1e-4 * kernel.square().sum().item()
    expected = (kernel - kept).norm() / kernel.norm()
    assert residual == pytest.approx(expected.item(), rel=1e-5)


def test_reported_error_and_residual_on_a_zoo_model():
    model = fxopt.models.create("replknet_like").eval()
    (x,) = fxopt.models.example_inputs("replknet_like", batch=2)
    gm, report, original = graph_of(model, x), Report("replknet", "eager"), graph_of(model, x)
    gm = run_passes(gm, ["decompose_large_kernel"], input_sets((x,), n_random=1), report)
    (record,) = report.passes
    assert record.status == "applied" and record.applied == {"dw-square-bands": 1}
    assert record.error["example"] == pytest.approx(output_error(original(x), gm(x)), rel=1e-6)
    assert record.summary["kernels"] == "31x31"  # 13x13 at 8x8: the dense conv is faster
    assert 0 < record.summary["max relative residual"] < 1


def test_error_grows_with_the_weight_off_the_branch_supports():
    x, errors = x_for(), []
    for off in (0.0, 0.1, 0.5):
        net = depthwise(on_support=True)
        with torch.no_grad():
            net[0].weight.add_(off * torch.randn(16, 1, 31, 31) * ~support(31))
        result = decompose_large_kernel(graph_of(net, x))
        errors.append(output_error(net(x), result.graph_module(x))["rel_l2"])
    assert errors[0] < 1e-5 < errors[1] < errors[2]


def test_decompose_large_kernel_is_idempotent():
    once = decompose_large_kernel(graph_of(depthwise(), x_for())).graph_module
    again = decompose_large_kernel(once)
    assert not again.modified and not again.declined


@pytest.mark.parametrize(
    ("net", "x", "reason"),
    [
        (depthwise(dilation=2, padding=30), x_for(), "dilated"),
        (depthwise(padding=0), x_for(size=40), "padding"),
        (depthwise(k=7), x_for(batch=1, size=8), "cost model"),
        (depthwise(k=8, padding=4), x_for(), "even kernel"),
    ],
)
def test_decompose_large_kernel_declines(net, x, reason):
    gm = graph_of(net, x)
    before = str(gm.graph)
    result = decompose_large_kernel(gm)
    assert not result.modified and str(result.graph_module.graph) == before
    assert reason in " ".join(result.declined["dw-square-bands"])


def test_decompose_large_kernel_declines_over_the_residual_limit():
    gm = graph_of(depthwise(), x_for())
    result = decompose_large_kernel(gm, DecomposeSettings(max_residual=0.5))
    assert not result.modified and "residual" in result.declined["dw-square-bands"][0]
    assert decompose_large_kernel(gm).modified  # the default limit (1.0) takes it


def test_min_kernel_is_a_setting():
    gm = graph_of(depthwise(), x_for())  # a 31 x 31 kernel
    assert not decompose_large_kernel(gm, DecomposeSettings(min_kernel=33)).applied


def test_dense_and_small_kernels_are_not_matched():
    for net in (nn.Conv2d(16, 16, 31, padding=15), nn.Conv2d(16, 16, 5, padding=2, groups=16)):
        result = decompose_large_kernel(graph_of(nn.Sequential(net).eval(), x_for(batch=1)))
        assert not result.modified and not result.declined
