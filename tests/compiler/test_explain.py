"""Near-misses: `fxopt.decline` reasons in PassResult.declined, the report and `--explain`."""

import textwrap

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import Rule, register_pass, rewrite, wildcards
from fxopt.cli import main
from fxopt.ir.graph import constant_users
from fxopt.testing import graph_of

aten = torch.ops.aten


def test_decline_is_falsy_and_keeps_its_reason():
    verdict = fxopt.decline("weight is shared")
    assert not verdict and verdict.reason == "weight is shared"


class ReluChain(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(x))) + 1


DROP_RELU_RELU = Rule("relu-relu", pattern=(aten.relu, aten.relu), build=lambda m: m[0])


def test_each_near_miss_is_listed_once_although_the_driver_restarts_after_each_firing():
    never_add = Rule("no-add", pattern=(aten.add,), check=lambda m: fxopt.decline("not today"))
    result = rewrite(graph_of(ReluChain(), torch.randn(2, 3)), [DROP_RELU_RELU, never_add])
    assert result.applied == {"relu-relu": 2}
    assert result.declined == {"no-add": ["add: not today"]}


def test_near_misses_are_those_of_the_final_graph():
    def not_relu(match):
        return False

    # relu #2 and #3 decline first, then relu-relu removes them: only relu #1 is left to list
    probe = Rule("probe", pattern=(aten.relu,), check=not_relu)
    result = rewrite(graph_of(ReluChain(), torch.randn(2, 3)), [probe, DROP_RELU_RELU])
    assert result.declined == {"probe": ["relu: not_relu returned False"]}


def test_a_build_that_returns_none_is_a_near_miss_too():
    rule = Rule("relu-relu", pattern=(aten.relu, aten.relu), build=lambda m: None)
    result = rewrite(graph_of(ReluChain(), torch.randn(2, 3)), [rule])
    assert not result.modified
    assert result.declined == {
        "relu-relu": ["relu_1: build returned None", "relu_2: build returned None"]
    }


def conv_bn(x, w, b, mean, var, gamma, beta):
    y = F.conv2d(x, w, b)
    return F.batch_norm(
        y, mean, var, gamma, beta, False, wildcards.scalar(), wildcards.scalar("eps")
    )


def weight_not_shared(match):
    return constant_users(match.gm, match["w"]) == 1 or fxopt.decline("the conv weight is shared")


RULES = [Rule("conv-bn", pattern=fxopt.pattern(conv_bn), check=weight_not_shared)]


@register_pass("test_explain_conv_bn", exact=True)
def explain_conv_bn(gm):
    """test_explain_conv_bn: conv -> bn  =>  nothing; only says why not."""
    return rewrite(gm, RULES)


class SharedConv(nn.Module):
    """One conv weight read by two convs, each followed by a batch norm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        other = F.conv2d(x, self.conv.weight, self.conv.bias)
        return self.bn1(self.conv(x)) + self.bn2(other)


def test_the_report_keeps_near_misses_counts_them_in_the_table_and_lists_them_in_explain():
    opt = fxopt.optimize(
        SharedConv().eval(), torch.randn(2, 3, 8, 8), passes=["test_explain_conv_bn"]
    )
    (record,) = opt.report.passes
    assert record.declined == {
        "conv-bn": [
            "batch_norm (bn1): the conv weight is shared",
            "batch_norm_1 (bn2): the conv weight is shared",
        ]
    }
    assert opt.report.to_dict()["passes"][0]["declined"] == record.declined
    table = str(opt.report)
    assert "declined" in table and "weight is shared" not in table
    assert "conv-bn: the conv weight is shared  x2" in opt.report.explain()


MODEL_FILE = """
import torch
import torch.nn.functional as F
from torch import nn

{source}
model = SharedConv().eval()
example_inputs = (torch.randn(2, 3, 8, 8),)
"""


def test_optimize_explain_prints_which_rule_matched_and_why_its_check_declined(capsys, tmp_path):
    import inspect

    path = tmp_path / "shared_conv.py"
    path.write_text(MODEL_FILE.format(source=textwrap.dedent(inspect.getsource(SharedConv))))
    passes = "fold_conv_bn,test_explain_conv_bn"
    assert main(["optimize", str(path), "--passes", passes, "--static-batch"]) == 0
    assert "near-misses" not in capsys.readouterr().out
    assert main(["optimize", str(path), "--passes", passes, "--static-batch", "--explain"]) == 0
    out = capsys.readouterr().out
    explained = out[out.index("near-misses") :]
    assert (
        "fold_conv_bn\n    conv-bn: the conv's weight or bias is not a constant or is shared  x2"
        in explained
    )
    assert "test_explain_conv_bn\n    conv-bn: the conv weight is shared  x2" in explained
    assert "at batch_norm (bn1), batch_norm_1 (bn2)" in explained
