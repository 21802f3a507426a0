"""`fxopt.testing.assert_declines`: a pass that declines reports no change and leaves the graph,
its constants included, as it was."""

import pytest
import torch
from torch import nn

from fxopt.ir.graph import constant, is_op
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.rules.rewrite import PassResult, Rule, decline
from fxopt.testing import assert_declines, graph_of

aten = torch.ops.aten
X = torch.randn(2, 3, 8, 8)


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()


def test_assert_declines_returns_the_result_of_a_pass_that_declines():
    result = assert_declines(fold_conv_bn, nn.Conv2d(3, 4, 3), X)
    assert not result.modified


def test_assert_declines_takes_a_graph_a_pass_name_or_rules():
    gm = graph_of(nn.Conv2d(3, 4, 3), X)
    assert_declines("fold_conv_bn", gm)
    never = Rule("never", pattern=(aten.conv2d,), check=lambda m: decline("not today"))
    assert_declines(never, gm, reason="not today")
    assert_declines([never], gm)


def test_assert_declines_fails_on_a_pass_that_changes_the_graph():
    with pytest.raises(AssertionError, match="reports a change"):
        assert_declines(fold_conv_bn, conv_bn(), X)


def test_assert_declines_fails_on_a_pass_that_writes_a_constant_and_reports_no_change():
    def scale_weights(gm):
        for node in gm.graph.nodes:
            if is_op(node, aten.conv2d):
                constant(gm, node.args[1]).data.mul_(2)
        return PassResult(gm, False)

    with pytest.raises(AssertionError, match="changed the constants"):
        assert_declines(scale_weights, nn.Conv2d(3, 4, 3), X)


def test_assert_declines_checks_the_reason_given():
    never = Rule("never", pattern=(aten.conv2d,), check=lambda m: decline("not today"))
    with pytest.raises(AssertionError, match="no near-miss says 'tomorrow'"):
        assert_declines(never, nn.Conv2d(3, 4, 3), X, reason="tomorrow")
