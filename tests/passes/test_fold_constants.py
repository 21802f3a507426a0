import pytest
import torch
import torch.nn.functional as F
from helpers import remaining_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.passes.fold_constants import MAX_ELEMENTS, fold_constants
from fxopt.testing import apply_pass, assert_declines, count_ops, graph_of

aten = torch.ops.aten


class MaskedConv(nn.Module):
    """A pruning mask applied in forward, as weight-masking code does."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.register_buffer("mask", (torch.rand(6, 4, 3, 3) > 0.3).float())

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, padding=1)


class ReshapedKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 36))

    def forward(self, x):
        return F.conv2d(x, self.weight.reshape(6, 4, 3, 3))


class KroneckerLinear(nn.Module):
    """A PHNN-style weight: the Kronecker product of two small factors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 4))
        self.b = nn.Parameter(torch.randn(3, 2))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.linear(x, torch.kron(self.a, self.b), self.bias)


class GeneratedKernel(nn.Module):
    """A DCLS-like kernel: Gaussian bumps at learned positions, built from parameters."""

    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.rand(4, 1, 1, 1) * 5)
        self.width = nn.Parameter(torch.rand(4, 1, 1, 1) + 0.5)
        self.scale = nn.Parameter(torch.randn(4, 1, 1, 1))

    def forward(self, x):
        grid = torch.arange(5, dtype=x.dtype).reshape(1, 1, 1, 5)
        kernel = self.scale * torch.exp(-((grid - self.position) ** 2) / self.width)
        return F.conv2d(x, kernel, padding=(0, 2), groups=4)


CASES = {
    "weight-mask": (MaskedConv, (2, 4, 8, 8), aten.mul),
    "reshaped-kernel": (ReshapedKernel, (2, 4, 8, 8), aten.reshape),
    "kronecker-weight": (KroneckerLinear, (2, 5, 8), aten.kron),
    "generated-kernel": (GeneratedKernel, (2, 4, 6, 6), aten.exp),
}


@pytest.mark.parametrize("name", CASES)
def test_fold_constants_turns_weight_computations_into_one_constant(name):
    model, shape, op = CASES[name]
    result = apply_pass(fold_constants, model(), torch.randn(shape), dynamic_batch=True)
    assert result.applied == {"constant-subgraph": 1}
    assert count_ops(result.graph_module, op) == 0
    assert remaining_ops(result.graph_module) in (["conv2d"], ["linear"])


def test_fold_constants_applied_counts_each_folded_value():
    class TwoMasks(MaskedConv):
        def forward(self, x):
            y = super().forward(x)
            return y + F.conv2d(x, self.weight.flip(3) * 2, padding=1)

    result = apply_pass(fold_constants, TwoMasks(), torch.randn(2, 4, 8, 8))
    assert result.applied == {"constant-subgraph": 2}
    assert remaining_ops(result.graph_module) == ["add", "conv2d", "conv2d"]


def test_fold_constants_on_zoo_model_matches_eager():
    if "convnext_atto_like" not in fxopt.models.list():
        pytest.skip("convnext_atto_like is not in the zoo yet")
    model = fxopt.models.create("convnext_atto_like")
    (x,) = fxopt.models.example_inputs("convnext_atto_like", batch=2)
    before = graph_of(model, x)
    result = apply_pass(fold_constants, model, x)
    # Each channels-first LayerNorm's weight[:, None, None] and bias[:, None, None] fold.
    folded = result.applied["constant-subgraph"]
    assert folded > 0 and count_ops(result.graph_module, aten.unsqueeze) == 0
    assert count_ops(before, aten.unsqueeze) >= folded
    assert count_ops(result.graph_module, aten.conv2d) == count_ops(before, aten.conv2d)


def test_fold_constants_is_idempotent():
    gm = fold_constants(graph_of(GeneratedKernel(), torch.randn(2, 4, 6, 6))).graph_module
    again = fold_constants(gm)
    assert not again.modified and again.applied == {}


class RandomWeight(MaskedConv):
    def forward(self, x):
        noise = torch.randn(6, 4, 3, 3) * 0.0
        return F.conv2d(x, self.weight + noise, padding=1)


class RandomLikeWeight(MaskedConv):
    def forward(self, x):
        return F.conv2d(x, self.weight * torch.rand_like(self.weight).ge(2.0), padding=1)


class TrainingDropoutWeight(MaskedConv):
    def forward(self, x):
        return F.conv2d(x, F.dropout(self.weight, 0.5, training=True), padding=1)


class HugeExpand(nn.Module):
    """Folding would store 2M elements computed from 4."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return x * self.c.expand(2, 4, 512, 512)


class WrittenInPlace(MaskedConv):
    """The product is written by an in-place op; a folded constant would accumulate the writes."""

    def forward(self, x):
        weight = self.weight * 2
        weight.view(-1).add_(1)
        return F.conv2d(x, weight, padding=1)


class ReturnsConstant(MaskedConv):
    """A stored tensor returned to the caller could be edited in place between calls."""

    def forward(self, x):
        return x + 1, self.weight * self.mask


class InputDependent(MaskedConv):
    def forward(self, x):
        return F.conv2d(x, self.weight * x.mean(), padding=1)


@pytest.mark.parametrize(
    "model",
    [
        RandomWeight(),
        RandomLikeWeight(),
        TrainingDropoutWeight(),
        WrittenInPlace(),
        ReturnsConstant(),
        InputDependent(),
    ],
    ids=["randn", "rand-like", "training-dropout", "written-in-place", "returned", "input"],
)
def test_fold_constants_declines_when_precondition_fails(model):
    assert_declines(fold_constants, model, torch.randn(2, 4, 8, 8))


def test_fold_constants_declines_when_the_result_would_grow_memory():
    assert 2 * 4 * 512 * 512 > MAX_ELEMENTS
    assert_declines(fold_constants, HugeExpand(), torch.randn(2, 4, 1, 1))


def test_fold_constants_folds_a_small_expand():
    class SmallExpand(HugeExpand):
        def forward(self, x):
            return x * self.c.expand(2, 4, 8, 8)

    result = apply_pass(fold_constants, SmallExpand(), torch.randn(2, 4, 8, 8))
    assert result.applied == {"constant-subgraph": 1}
    assert remaining_ops(result.graph_module) == ["mul"]


def test_fold_constants_in_optimize_removes_the_mask_multiply_and_matches_eager():
    model = MaskedConv().eval()
    x = torch.randn(2, 4, 8, 8)
    opt = fxopt.optimize(model, x)  # the default pipeline
    record = next(p for p in opt.report.passes if p.name == "fold_constants")
    assert record.status == "applied", str(opt.report)
    assert "mul" not in opt.report.after.op_counts
    assert opt.report.before.op_counts["mul"] == 1
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


# Steps from an (out, in) weight to another (out, in) weight, using constants only.
STEPS = {
    "mask": lambda m, w: w * m.mask,
    "shift": lambda m, w: w + m.shift,
    "double-transpose": lambda m, w: w.t().t(),
    "flatten-reshape": lambda m, w: w.reshape(-1).reshape(m.out_features, m.in_features),
    "tanh": lambda m, w: torch.tanh(w),
    "divide": lambda m, w: w / m.divisor,
    "kronecker": lambda m, w: w * torch.kron(m.column, m.row),
    "flip": lambda m, w: w.flip(0),
    "where": lambda m, w: torch.where(m.mask > 0.5, w, -w),
    "cat-split": lambda m, w: torch.cat([w, w]).chunk(2)[1],
}


class GeneratedLinear(nn.Module):
    def __init__(self, steps, out_features, in_features, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.steps, self.out_features, self.in_features = steps, out_features, in_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=g))
        self.shift = nn.Parameter(torch.randn(out_features, in_features, generator=g))
        self.divisor = nn.Parameter(torch.rand(out_features, 1, generator=g) + 0.5)
        self.column = nn.Parameter(torch.randn(out_features, 1, generator=g))
        self.row = nn.Parameter(torch.randn(1, in_features, generator=g))
        self.register_buffer("mask", torch.rand(out_features, in_features, generator=g))

    def forward(self, x):
        weight = self.weight
        for step in self.steps:
            weight = STEPS[step](self, weight)
        return F.linear(x, weight)


@st.composite
def generated_linears(draw):
    steps = draw(st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=5))
    out_features, in_features = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    model = GeneratedLinear(steps, out_features, in_features, draw(st.integers(0, 2**16)))
    batch = draw(st.integers(2, 3))
    return model, torch.randn(batch, in_features), draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(generated_linears())
def test_fold_constants_property_generated_weights_become_one_constant(case):
    model, x, dynamic = case
    result = apply_pass(fold_constants, model, x, dynamic_batch=dynamic)
    assert result.applied == {"constant-subgraph": 1}
    assert remaining_ops(result.graph_module) == ["linear"]
