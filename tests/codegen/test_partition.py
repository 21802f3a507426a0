"""Ops TVM cannot take stay in PyTorch; optimize(..., backend="tvm") still succeeds."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt.codegen import partition
from fxopt.codegen.runtime import TVMModule

pytestmark = pytest.mark.tvm


class GammaNet(nn.Module):
    """conv -> bn -> relu -> lgamma (TVM's frontend has no lgamma) -> conv, and a sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.lgamma(torch.relu(self.bn(self.conv(x))) + 1.0)
        return self.conv2(y), y.sum()


def test_unsupported_op_stays_in_pytorch_and_the_report_names_it(fast_llvm):
    model, x = GammaNet().eval(), torch.randn(1, 3, 8, 8)
    opt = fxopt.optimize(model, x, backend="tvm", target=fast_llvm)
    assert any("kept in PyTorch: lgamma.default x1" in note for note in opt.report.notes)
    islands = [type(m).__name__ for _, m in opt._runner.named_children()]
    assert islands == ["TVMModule", "GraphModule", "TVMModule"]
    fxopt.testing.assert_equivalent(model, opt, x, n_random=1)
    fxopt.testing.assert_equivalent(model, opt, torch.randn(4, 3, 8, 8))  # islands keep batch B


def test_split_islands_alternates_and_moves_weights_into_islands():
    gm = fxopt.testing.graph_of(GammaNet(), torch.randn(2, 3, 8, 8))
    split, islands = partition.split_islands(gm, {"lgamma.default"})
    assert islands == {"submod_0": True, "submod_1": False, "submod_2": True}
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    assert [len(n.args) for n in calls] == [1, 1, 1]  # activations only; weights live inside
    assert sum(n.op == "get_attr" for n in split.submod_0.graph.nodes) == 6


def test_an_island_that_fails_to_build_stays_in_pytorch(fast_llvm, monkeypatch):
    real_build = partition.build

    def build_all_but_the_last(gm, inputs, target, dynamic_batch, database=None):
        if any(n.target == torch.ops.aten.sum.default for n in gm.graph.nodes):
            raise RuntimeError("simulated legalization gap")
        return real_build(gm, inputs, target, dynamic_batch, database)

    monkeypatch.setattr(partition, "build", build_all_but_the_last)
    model, x = GammaNet().eval(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(model, x, backend="tvm", target=fast_llvm)
    notes = " ".join(opt.report.notes)
    assert "submod_2 stays in PyTorch: RuntimeError: simulated legalization gap" in notes
    assert "sum.default x1" in notes and "conv2d.default x1" in notes
    assert isinstance(opt._runner.submod_0, TVMModule)
    fxopt.testing.assert_equivalent(model, opt, x)


def test_a_build_that_fails_verification_is_replaced_by_the_fx_graph(fast_llvm, monkeypatch):
    real_forward = TVMModule.forward
    monkeypatch.setattr(TVMModule, "forward", lambda self, *a: real_forward(self, *a) + 1e-3)
    model, x = nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="failed verification"):
        opt = fxopt.optimize(model, x, backend="tvm", target=fast_llvm)
    assert not isinstance(opt._runner, TVMModule)
    assert any("runs in PyTorch instead" in note for note in opt.report.notes)
    fxopt.testing.assert_equivalent(model, opt, x)


def test_a_build_that_raises_leaves_the_fx_graph_running(monkeypatch):
    def broken(*args):
        raise RuntimeError("simulated TVM crash")

    monkeypatch.setattr(partition, "lower_for_optimize", broken)
    model, x = nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="simulated TVM crash"):
        opt = fxopt.optimize(model, x, backend="tvm")
    assert any("the TVM build failed (RuntimeError" in note for note in opt.report.notes)
    fxopt.testing.assert_equivalent(model, opt, x)
