"""The float64 arbiter: a float32 miss is kept only when it is float32 rounding no worse than
the original graph's own, and a wrong rewrite is still rolled back."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassResult, register_pass
from fxopt.ir.errors import VerificationError
from fxopt.precision import Float64Reference, float64_copy, judge
from fxopt.testing import graph_of

aten = torch.ops.aten
SHIFT = 1e4  # x + 1e4 keeps about 3 decimal digits of x in float32


class Cancel(nn.Module):
    """(x + c) - c: x in exact arithmetic, x to within ~5e-4 in float32."""

    def forward(self, x):
        return (x + SHIFT) - SHIFT


class Identity(nn.Module):
    def forward(self, x):
        return x * 1.0


def _cancelling_pairs(gm):
    for node in list(gm.graph.nodes):
        inner = node.args[0] if node.args else None
        if node.target is aten.sub.Tensor and getattr(inner, "target", None) is aten.add.Tensor:
            if inner.args[1] == node.args[1]:
                yield node, inner.args[0]


def _rewrite_cancelling(gm, replacement):
    count = 0
    for node, x in _cancelling_pairs(gm):
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(replacement(gm, x))
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, count > 0, {"cancel": count})


@register_pass("test_drop_cancelling_shift", exact=True)
def drop_cancelling_shift(gm):
    """(x + c) - c => x: exact, and more accurate than float32 eager."""
    return _rewrite_cancelling(gm, lambda gm, x: x)


@register_pass("test_cancel_to_scaled", exact=True)
def cancel_to_scaled(gm):
    """(x + c) - c => 1.00005 x: wrong by 5e-5 relative, as far off as float32 rounding is."""
    return _rewrite_cancelling(
        gm, lambda gm, x: gm.graph.call_function(aten.mul.Tensor, (x, 1.00005))
    )


@register_pass("test_add_cancelling_shift", exact=True)
def add_cancelling_shift(gm):
    """x * 1.0 => (x + 1e6) - 1e6: exact in float64, far worse than eager in float32."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is aten.mul.Tensor and node.args[1] == 1.0:
            with gm.graph.inserting_before(node):
                shifted = gm.graph.call_function(aten.add.Tensor, (node.args[0], 1e6))
                node.replace_all_uses_with(gm.graph.call_function(aten.sub.Tensor, (shifted, 1e6)))
            count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, count > 0, {"shift": count})


def x_for(seed=0, batch=4):
    return torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed)) * 3


def test_an_exact_rewrite_more_accurate_than_float32_eager_is_kept():
    model, x = Cancel().eval(), x_for()
    with torch.no_grad():
        eager = model(x)
    bound = 1e-5 * eager.abs().max().item() + 1e-6
    assert (eager - x).abs().max().item() > 3 * bound  # the float32 check alone must fail
    fast = fxopt.optimize(model, x, passes=["test_drop_cancelling_shift"])
    record = fast.report.passes[0]
    assert record.status == "applied" and record.max_error > bound
    assert "float32 rounding" in record.message
    assert any("end-to-end check passed in float64" in n for n in fast.report.notes)
    exact = model.double()(x.double())
    assert (fast(x).double() - exact).abs().max() < (eager.double() - exact).abs().max()


def test_a_wrong_rewrite_of_the_same_size_is_still_rolled_back():
    fast = fxopt.optimize(Cancel().eval(), x_for(), passes=["test_cancel_to_scaled"])
    record = fast.report.passes[0]
    assert record.status == "rolled back"
    assert "float64 check" in record.message and "not float32 rounding" in record.message
    assert fast.report.after.op_counts.get("sub") == 1


def test_a_rewrite_exact_in_float64_but_worse_in_float32_is_rolled_back():
    fast = fxopt.optimize(Identity().eval(), x_for(), passes=["test_add_cancelling_shift"])
    record = fast.report.passes[0]
    assert record.status == "rolled back"
    assert "from the float64 result" in record.message
    assert fast.report.after.op_counts.get("add", 0) == 0


def test_judge_keeps_integer_shape_and_finiteness_checks():
    truth = torch.randn(8, dtype=torch.float64)
    ref32 = truth.float()
    assert judge(ref32, ref32, truth, truth).exact == 0.0
    with pytest.raises(VerificationError, match="NaN or Inf"):
        judge(ref32, torch.full_like(ref32, float("nan")), truth, truth)
    with pytest.raises(VerificationError, match="expected"):
        judge(ref32, ref32[:4], truth, truth[:4])
    with pytest.raises(VerificationError, match="integer"):
        ints = torch.arange(4)
        judge((ref32, ints), (ref32, ints + 1), (truth, ints), (truth, ints + 1))


def test_judge_measures_both_conditions():
    truth = torch.linspace(-5, 5, 101, dtype=torch.float64)
    bound = 1e-5 * 5 + 1e-6
    noisy = (truth + 2 * bound).float()  # the reference, off by twice the bound
    other = (truth - 2 * bound).float()  # the candidate, as far off on the other side
    rounding = judge(noisy, other, truth, truth + bound / 10)
    assert rounding.floor == pytest.approx(2 * bound, rel=0.05)
    assert rounding.off == pytest.approx(2 * bound, rel=0.05)
    with pytest.raises(VerificationError, match="not float32 rounding"):
        judge(noisy, other, truth, truth + 2 * bound)
    with pytest.raises(VerificationError, match="from the float64 result"):
        judge(noisy, (truth - 4 * bound).float(), truth, truth)


class Casts(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        y = self.linear(x).to(torch.float32)
        return y + torch.ones(6, dtype=torch.float32)


def test_float64_copy_casts_weights_and_dtype_arguments_and_leaves_the_original():
    model, x = Casts().eval(), torch.randn(2, 6)
    gm = graph_of(model, x)
    copy = float64_copy(gm)
    assert copy(x.double()).dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    assert gm(x).dtype == torch.float32
    weight, bias = (p.detach().double() for p in model.linear.parameters())
    expected = x.double() @ weight.T + bias + 1
    assert torch.allclose(copy(x.double()), expected, rtol=1e-12, atol=1e-12)


def test_the_reference_keeps_the_graph_before_the_passes_ran():
    model, x = Cancel().eval(), x_for()
    gm = graph_of(model, x)
    reference = Float64Reference(gm)
    drop_cancelling_shift(gm)  # rewrites `gm` in place
    assert reference.check(gm, [gm(x)], [(x,)]).off == 0.0


def test_assert_equivalent_can_judge_a_float32_miss_in_float64():
    model, x = Cancel().eval(), x_for()
    fast = fxopt.optimize(model, x, passes=["test_drop_cancelling_shift"])
    with pytest.raises(VerificationError, match="exceeds"):
        fxopt.testing.assert_equivalent(model, fast, (x,))
    assert fxopt.testing.assert_equivalent(model, fast, (x,), float64=True) > 0
    scaled = fxopt.optimize(model, x, passes=["test_cancel_to_scaled"], verify=False)
    with pytest.raises(VerificationError, match="not float32 rounding"):
        fxopt.testing.assert_equivalent(model, scaled, (x,), float64=True)


@register_pass("test_nudge_conv_weight", exact=True)
def nudge_conv_weight(gm):
    """conv weight => (1 + 3e-5) * weight, as a new constant: wrong by 3e-5 relative, a few
    times the float32 bound and far more than rounding a weight costs."""
    from fxopt.ir.graph import add_constant, constant

    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    nudged = constant(gm, conv.args[1]) * (1 + 3e-5)
    with gm.graph.inserting_before(conv):
        conv.args = (conv.args[0], add_constant(gm, nudged, "nudged"), *conv.args[2:])
    gm.recompile()
    return PassResult(gm, True, {"nudge": 1})


def test_the_weight_rounding_allowance_stays_far_below_a_wrong_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    fast = fxopt.optimize(model, torch.randn(2, 3, 9, 9), passes=["test_nudge_conv_weight"])
    record = fast.report.passes[0]
    assert record.status == "rolled back" and "not float32 rounding" in record.message
    assert "for weight rounding" in record.message  # it had an allowance, and it was too small
