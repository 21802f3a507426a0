import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassResult, Rule, register_pass, rewrite
from fxopt.errors import InputError
from fxopt.graph import call

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
