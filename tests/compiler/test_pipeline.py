import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassResult, Rule, register_pass, rewrite
from fxopt.ir.errors import InputError, VerificationError
from fxopt.ir.graph import call, constant
from fxopt.pipeline import run_passes
from fxopt.report import Report
from fxopt.testing import graph_of
from fxopt.verify import input_sets, outputs

aten = torch.ops.aten


def model() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    net[1].running_mean.normal_()
    return net


RELU_TO_NEG = [
    Rule(
        "relu-neg",
        pattern=(aten.relu,),
        build=lambda m: call(m.gm, aten.neg.default, (m.root.args[0],)),
    )
]


@register_pass("test_wrong_relu", exact=True)
def wrong_relu(gm):
    """test_wrong_relu: relu => neg (deliberately wrong)."""
    return rewrite(gm, RELU_TO_NEG)


@register_pass("test_raising_pass", exact=True)
def raising_pass(gm):
    """test_raising_pass: raises halfway."""
    raise RuntimeError("boom")


@register_pass("test_approximate_pass", exact=False)
def approximate_pass(gm):
    """test_approximate_pass: changes nothing, but says it is approximate."""
    return PassResult(gm, False, {})


def test_a_wrong_pass_is_rolled_back_and_reported_and_the_rest_still_runs():
    net, x = model(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(net, x, passes=["test_wrong_relu", "fold_conv_bn"])
    records = {p.name: p for p in opt.report.passes}
    assert records["test_wrong_relu"].status == "rolled back"
    assert "exceeds" in records["test_wrong_relu"].message
    assert records["fold_conv_bn"].status == "applied"
    assert opt.report.rolled_back == ["test_wrong_relu"]
    assert opt.report.after.op_counts.get("relu") == 1
    fxopt.testing.assert_equivalent(net, opt, (x,))
    assert "rolled back" in str(opt.report)


def test_a_pass_that_raises_is_reported_as_failed_and_skipped():
    net, x = model(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(net, x, passes=["test_raising_pass", "fold_conv_bn"])
    record = opt.report.passes[0]
    assert record.status == "failed" and "boom" in record.message
    fxopt.testing.assert_equivalent(net, opt, (x,))


def test_without_verification_a_raising_pass_propagates():
    with pytest.raises(RuntimeError, match="boom"):
        fxopt.optimize(model(), torch.randn(2, 3, 8, 8), passes=["test_raising_pass"], verify=False)


def test_approximate_passes_need_approximate_true():
    with pytest.raises(InputError, match="approximate=True"):
        fxopt.optimize(model(), torch.randn(2, 3, 8, 8), passes=["test_approximate_pass"])
    fxopt.optimize(
        model(), torch.randn(2, 3, 8, 8), passes=["test_approximate_pass"], approximate=True
    )


def test_default_pipeline_contains_only_exact_registered_passes():
    infos = {p.name: p for p in fxopt.list_passes()}
    assert all(infos[name].exact for name in fxopt.DEFAULT_PIPELINE)


@register_pass("test_no_change_pass", exact=True)
def no_change_pass(gm):
    """test_no_change_pass: changes nothing."""
    return PassResult(gm, False, {})


@register_pass("test_scale_weight_in_place", exact=True)
def scale_weight_in_place(gm):
    """test_scale_weight_in_place: conv weight => 2 * conv weight, written in place (wrong: the
    graph before the pass reads the same tensor)."""
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    with torch.no_grad():
        constant(gm, conv.args[1]).mul_(2)
    return PassResult(gm, True, {"scale": 1})


@register_pass("test_scale_weight_data_in_place", exact=True)
def scale_weight_data_in_place(gm):
    """test_scale_weight_data_in_place: the same write through `.data`, which no version
    counter sees."""
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    constant(gm, conv.args[1]).data.mul_(2)
    return PassResult(gm, True, {"scale": 1})


@register_pass("test_quiet_in_place_write", exact=True)
def quiet_in_place_write(gm):
    """test_quiet_in_place_write: writes a weight in place and reports no change."""
    scale_weight_in_place(gm)
    return PassResult(gm, False, {})


def graph_runs(gm) -> list:
    """Count calls of `gm` from now on."""
    calls = []
    gm.register_forward_pre_hook(lambda module, args: calls.append(args))
    return calls


def verification_sets(x):
    return input_sets((x,), n_random=2, other_batch=x.shape[0] + 2)


def test_a_pass_that_reports_no_change_is_not_run_on_the_verification_inputs():
    x = torch.randn(2, 3, 8, 8)
    gm, sets = graph_of(model(), x, dynamic_batch=True), verification_sets(x)
    expected = outputs(gm, sets)
    calls = graph_runs(gm)
    run_passes(
        gm,
        ["test_no_change_pass", "fold_linear_bn"],
        sets,
        Report("m", "eager"),
        True,
        expected=expected,
    )
    assert calls == []


def test_an_applied_pass_runs_only_the_new_graph_the_reference_is_reused():
    x = torch.randn(2, 3, 8, 8)
    gm, sets = graph_of(model(), x, dynamic_batch=True), verification_sets(x)
    expected = outputs(gm, sets)
    calls = graph_runs(gm)
    report = Report("m", "eager")
    gm = run_passes(
        gm, ["fold_conv_bn", "test_no_change_pass"], sets, report, True, expected=expected
    )
    assert report.passes[0].status == "applied" and report.passes[0].verify_seconds > 0
    assert report.passes[1].status == "no change"
    assert len(calls) == len(sets) == 4  # the folded graph, once per input set


def test_a_pass_that_scales_a_shared_weight_in_place_is_caught():
    net, x = model(), torch.randn(2, 3, 8, 8)
    weight = net[0].weight.detach().clone()
    with pytest.raises(VerificationError, match="test_scale_weight_in_place .* in place"):
        fxopt.optimize(net, x, passes=["test_scale_weight_in_place"])
    assert torch.equal(net[0].weight, weight)  # the caller's model is a different copy


def test_an_in_place_write_that_no_version_counter_sees_still_fails_verification():
    net, x = model(), torch.randn(2, 3, 8, 8)
    with pytest.raises(VerificationError):
        fxopt.optimize(net, x, passes=["test_scale_weight_data_in_place"])


def test_a_pass_that_writes_in_place_and_reports_no_change_is_caught():
    net, x = model(), torch.randn(2, 3, 8, 8)
    with pytest.raises(VerificationError, match="reports no change but wrote"):
        fxopt.optimize(net, x, passes=["test_quiet_in_place_write"])


def test_report_seconds_split_capture_passes_verification_and_final_check():
    opt = fxopt.optimize(model(), torch.randn(2, 3, 8, 8))
    seconds = opt.report.seconds
    for phase in ("capture", "stats", "reference", "rewrite", "verify", "final check", "total"):
        assert phase in seconds, seconds
    records = {p.name: p for p in opt.report.passes}
    assert records["fold_conv_bn"].verify_seconds > 0
    assert seconds["rewrite"] == pytest.approx(sum(p.seconds for p in opt.report.passes))
    assert "rewrite" in str(opt.report) and "verify" in str(opt.report)


def test_a_failing_pass_after_passes_that_changed_nothing_is_rolled_back_to_their_graph():
    net, x = model(), torch.randn(2, 3, 8, 8)
    names = ["test_no_change_pass", "fold_conv_bn", "test_no_change_pass", "test_wrong_relu"]
    opt = fxopt.optimize(net, x, passes=names)
    assert [p.status for p in opt.report.passes] == [
        "no change",
        "applied",
        "no change",
        "rolled back",
    ]
    assert opt.report.after.op_counts.get("relu") == 1
    assert "batch_norm" not in opt.report.after.op_counts
    fxopt.testing.assert_equivalent(net, opt, (x,))
