import pytest
import torch
from torch import nn

from fxopt import PassResult, Rule, register_pass, rewrite
from fxopt.ir.errors import RewriteError
from fxopt.ir.graph import call
from fxopt.rules.registry import get_pass, list_passes
from fxopt.testing import count_ops, graph_of

aten = torch.ops.aten


class ReluRelu(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(x)) + 1


def test_rewrite_applies_a_chain_rule_until_fixed_point_and_counts_firings():
    gm = graph_of(ReluRelu(), torch.randn(2, 3))
    rule = Rule("relu-relu", pattern=(aten.relu, aten.relu), build=lambda m: m[0])
    result = rewrite(gm, [rule])
    assert result.modified and result.applied == {"relu-relu": 1}
    assert count_ops(result.graph_module, aten.relu) == 1
    x = torch.randn(2, 3)
    torch.testing.assert_close(result.graph_module(x), ReluRelu()(x))


def test_rewrite_reports_no_change_when_check_declines():
    gm = graph_of(ReluRelu(), torch.randn(2, 3))
    rule = Rule(
        "never", pattern=(aten.relu, aten.relu), check=lambda m: False, build=lambda m: m[0]
    )
    result = rewrite(gm, [rule])
    assert not result.modified and result.applied == {}


def test_rewrite_raises_on_a_rule_that_never_settles():
    gm = graph_of(ReluRelu(), torch.randn(2, 3))
    # relu(x) => relu(x) again: a fresh node every time, so the rule always matches
    rule = Rule(
        "loop",
        pattern=(aten.relu,),
        build=lambda m: call(m.gm, aten.relu.default, (m.root.args[0],)),
    )
    with pytest.raises(RewriteError, match="did not settle"):
        rewrite(gm, [rule])


def test_function_pattern_matches_what_it_returns():
    gm = graph_of(ReluRelu(), torch.randn(2, 3))

    def add_one(node):
        return (node,) if node.target is aten.add.Tensor and node.args[1] == 1 else None

    rule = Rule("drop-add-one", pattern=add_one, build=lambda m: m.root.args[0])
    result = rewrite(gm, [rule])
    assert result.applied == {"drop-add-one": 1}
    assert count_ops(result.graph_module, aten.add) == 0


def test_register_pass_makes_a_user_pass_listed_and_resolvable():
    @register_pass("test_identity_pass", exact=True)
    def test_identity_pass(gm):
        """test_identity_pass: anything => the same."""
        return PassResult(gm, False, {})

    info = get_pass("test_identity_pass")
    assert info.exact and info.description.startswith("test_identity_pass")
    assert "test_identity_pass" in [p.name for p in list_passes()]
    assert "fold_conv_bn" in [p.name for p in list_passes()]


class ReluChain(nn.Module):
    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, x):
        for _ in range(self.length):
            x = torch.relu(x) * 2
        return x


def test_rewrite_fires_every_match_of_one_walk_instead_of_rescanning_after_each():
    gm = graph_of(ReluChain(30), torch.randn(2, 3))
    checked = []

    def check(match):
        checked.append(match.root)
        return True

    rule = Rule(
        "relu-neg",
        pattern=(aten.relu,),
        check=check,
        build=lambda m: call(m.gm, aten.neg.default, (m.root.args[0],)),
    )
    result = rewrite(gm, [rule])
    assert result.applied == {"relu-neg": 30}
    assert len(checked) == 30  # one walk fires all 30; the second finds no relu to check
    assert count_ops(result.graph_module, aten.relu) == 0


def test_rewrite_reaches_matches_its_own_rewrites_create_on_a_later_walk():
    gm = graph_of(ReluChain(3), torch.randn(2, 3))
    rules = [
        # relu => neg, then mul(neg(x), 2) => neg(mul(x, 2)): each walk moves the negs on
        Rule(
            "relu-neg",
            pattern=(aten.relu,),
            build=lambda m: call(m.gm, aten.neg.default, (m.root.args[0],)),
        ),
        Rule(
            "neg-mul",
            pattern=(aten.neg, aten.mul),
            build=lambda m: call(
                m.gm, aten.neg.default, (call(m.gm, aten.mul.Tensor, (m[0].args[0], 2)),)
            ),
        ),
    ]
    result = rewrite(gm, rules)
    assert result.applied == {"relu-neg": 3, "neg-mul": 6}
    x = torch.randn(2, 3)
    torch.testing.assert_close(result.graph_module(x), -x * 8)


def test_check_hands_its_plan_to_build_as_match_plan():
    gm = graph_of(ReluRelu(), torch.randn(2, 3))
    plans = []

    def check(match):
        plans.append(object())
        return plans[-1]

    def build(match):
        assert match.plan is plans[-1]  # the check's own result, not recomputed
        return match[0]

    result = rewrite(gm, [Rule("relu-relu", (aten.relu, aten.relu), check, build)])
    assert result.applied == {"relu-relu": 1} and len(plans) == 1


def test_a_predicate_check_still_works_and_false_or_none_declines():
    for verdict in (False, None):
        gm = graph_of(ReluRelu(), torch.randn(2, 3))
        rule = Rule("r", (aten.relu, aten.relu), check=lambda m, v=verdict: v, build=lambda m: m[0])
        result = rewrite(gm, [rule])
        assert not result.modified and result.declined == {
            "r": [f"relu_1: check returned {verdict}"]
        }
    gm = graph_of(ReluRelu(), torch.randn(2, 3))
    rule = Rule("r", (aten.relu, aten.relu), check=lambda m: True, build=lambda m: m[0])
    assert rewrite(gm, [rule]).applied == {"r": 1}
