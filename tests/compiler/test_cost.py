import torch
from torch import nn

from fxopt.analysis import cost
from fxopt.ir.graph import mutated_nodes, unchanged
from fxopt.passes.fold_conv_bn import fold_conv_bn
from fxopt.testing import graph_of


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)).reshape(x.shape[0], -1))


def assert_recorded_stats_match_a_run(graph, x):
    recorded = cost.recorded_values(graph, x)
    assert recorded is not None
    assert cost.stats_from(graph, recorded) == cost.stats_from(
        graph, cost.concrete_values(graph, x)
    )


def test_stats_from_recorded_shapes_match_a_run_of_the_graph_at_another_batch():
    gm, x = (
        graph_of(ConvNet(), torch.randn(2, 3, 8, 8), dynamic_batch=True),
        torch.randn(5, 3, 8, 8),
    )
    assert_recorded_stats_match_a_run(gm, (x,))
    assert_recorded_stats_match_a_run(fold_conv_bn(gm).graph_module, (x,))  # new nodes too


def test_stats_run_the_graph_when_a_node_records_no_value():
    gm = graph_of(ConvNet(), torch.randn(2, 3, 8, 8))
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    del relu.meta["val"]
    x = (torch.randn(2, 3, 8, 8),)
    assert cost.recorded_values(gm, x) is None
    assert cost.stats(gm, x) == cost.stats_from(gm, cost.concrete_values(gm, x))


def test_an_analysis_is_computed_once_while_the_graph_is_unchanged():
    gm = graph_of(ConvNet(), torch.randn(2, 3, 8, 8))
    memo: dict = {}
    with unchanged(gm, memo):
        first = mutated_nodes(gm)
        assert mutated_nodes(gm) is first
    assert mutated_nodes(gm) is not first  # outside, each call analyses the graph afresh
