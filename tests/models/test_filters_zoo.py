"""The filter models: fixed kernels stay exactly what they are, and VAN's LKA (Guo et al. 2022,
arXiv:2202.09741) is a negative control for merging two zero-padded depthwise convs: the merged
conv would read zeros at the borders where the second conv reads the first one's output."""

import torch

import fxopt
from fxopt.analysis.decompose_math import numerical_rank, tap_grid
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.testing import count_ops

aten = torch.ops.aten
EPS = torch.finfo(torch.float32).eps
WITH_DECOMPOSITIONS = [*DEFAULT_PIPELINE, "sparsify_dilated_kernels", "split_separable_kernels"]


def rank(kernel: torch.Tensor) -> int:
    """The numerical rank of a depthwise kernel (per channel, the largest) or of a dense one
    read as the matrix M[(o, h), (i, w)]."""
    out, per_group, kh, kw = kernel.shape
    if per_group == 1:
        return max(numerical_rank(torch.linalg.svdvals(k[0].double()), EPS) for k in kernel)
    matrix = kernel.double().permute(0, 2, 1, 3).reshape(out * kh, per_group * kw)
    return numerical_rank(torch.linalg.svdvals(matrix), EPS)


def test_image_filter_net_keeps_its_filters_fixed_and_separable_across_seeds():
    first, second = (fxopt.models.create("image_filter_net", seed=s) for s in (0, 1))
    for name in ("blur", "smooth", "box", "sobel", "spline"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert [rank(getattr(first, n)) for n in ("blur", "smooth", "box", "sobel")] == [3, 1, 1, 2]
    grid = tap_grid(first.spline)
    assert grid.step == (2, 2) and grid.start == (0, 0) and grid.stop == (8, 8)
    assert not torch.equal(first.mix[0].weight, second.mix[0].weight)  # learned: redrawn


def test_image_filter_net_optimizes_with_the_decompositions_and_matches_eager():
    model = fxopt.models.create("image_filter_net")
    inputs = fxopt.models.example_inputs("image_filter_net", batch=2)
    opt = fxopt.optimize(model, inputs, passes=WITH_DECOMPOSITIONS)
    assert opt.report.rolled_back == []
    fired = {r.name: r.applied for r in opt.report.passes if r.status == "applied"}
    assert fired["sparsify_dilated_kernels"] == {"sparsify-dilated": 1}
    assert fired["split_separable_kernels"] == {"split-separable": 1}
    assert opt.report.after.flops < opt.report.before.flops
    fxopt.testing.assert_equivalent(model, opt, inputs, n_random=1)


def depthwise_convs(gm, channels: int) -> list:
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in (aten.conv2d.default, aten.conv2d.padding)
        and n.args[6:] == (channels,)
    ]


def test_van_lka_block_keeps_both_depthwise_convs_under_the_default_pipeline():
    """dw 5x5 then dw 7x7 at dilation 3, both zero-padded: one 23x23 conv would read real
    pixels where the second conv reads the first one's zero padding, so they must stay two."""
    model = fxopt.models.create("van_lka_block")
    inputs = fxopt.models.example_inputs("van_lka_block", batch=2)
    for passes in (None, WITH_DECOMPOSITIONS):
        opt = fxopt.optimize(model, inputs, passes=passes)
        assert opt.report.rolled_back == []
        kernels = [
            tuple(n.args[1].meta["val"].shape) for n in depthwise_convs(opt.graph_module, 32)
        ]
        assert kernels == [(32, 1, 5, 5), (32, 1, 7, 7)]
        assert count_ops(opt.graph_module, aten.mul) == 1  # the attention gate
        fxopt.testing.assert_equivalent(model, opt, inputs, n_random=1)
