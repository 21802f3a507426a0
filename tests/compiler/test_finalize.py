"""The runnable graph: activations run in place on temporaries nothing else reads, and never on
memory the caller, a weight or another op can see."""

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.finalize import in_place_activations
from fxopt.testing import graph_of

IN_PLACE = {torch.relu_, torch._C._nn.hardswish_, torch._C._nn.gelu_}


def in_place_count(gm) -> int:
    return sum(n.target in IN_PLACE for n in gm.graph.nodes)


class Shapes(nn.Module):
    """One activation per case: on a conv's output (in place), on the input, on a value read
    twice, on a view, on a weight and on a value the model returns (none in place)."""

    def __init__(self):
        super().__init__()
        self.conv, self.other = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        fresh = F.relu(self.conv(x))  # in place
        on_input = F.hardswish(x)
        shared = self.other(x)
        twice = F.gelu(shared) + shared
        view = F.relu(self.conv(x).flatten(2)).reshape(x.shape)
        on_weight = F.relu(self.other.weight).sum()
        returned = self.conv(x)
        return fresh + on_input + twice + view + on_weight, returned, F.relu(returned)


def test_only_the_activation_on_a_fresh_temporary_runs_in_place():
    model, x = Shapes().eval(), torch.randn(2, 3, 8, 8)
    gm = graph_of(model, x)
    assert in_place_activations(gm) == 1
    gm.recompile()
    relu_ = [n for n in gm.graph.nodes if n.target is torch.relu_]
    assert len(relu_) == 1 and "conv2d" in str(relu_[0].args[0].target)
    x_before = x.clone()
    for got, want in zip(gm(x), model(x), strict=True):
        torch.testing.assert_close(got, want)
    assert torch.equal(x, x_before)


@torch.no_grad()
def test_optimize_runs_relu_in_place_after_a_folded_conv_and_matches_eager():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Hardswish()
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    opt = fxopt.optimize(model, x)
    assert in_place_count(opt._runner) == 2  # the readable graph keeps the functional ops
    assert not any(n.target is torch.relu_ for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(opt(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_in_place_activations():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1)).eval(), None
    x = torch.randn(2, 3, 8, 8)
    gm = graph_of(model, x)
    in_place_activations(gm)
    gm.recompile()
    y = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gm(y).square().sum(), y)
    z = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(model(z).square().sum(), z)
    torch.testing.assert_close(grad, want)
