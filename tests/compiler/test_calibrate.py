import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.ir.errors import InputError
from fxopt.pipeline import output_error


class AttentionBlock(nn.Module):
    """qkv projection, softmax attention, output projection."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def batches(count, n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 32, generator=generator) for _ in range(count)]


def linearized(net, x, feature_map="learnable"):
    return fxopt.optimize(
        net,
        x,
        passes=["linearize_attention"],
        approximate=True,
        verify=False,
        options={"linearize_attention": {"feature_map": feature_map}},
    )


@pytest.fixture
def net():
    torch.manual_seed(0)
    return AttentionBlock().eval()


def test_calibration_lowers_the_error_of_linearized_attention(net):
    train, (held,) = batches(4), batches(1, seed=1)
    opt = linearized(net, train[0])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    summary = fxopt.calibrate(net, opt, train, steps=60, lr=1e-2, held_out=held, progress=False)
    assert summary["parameters"] == 2 * 2 * 16 * 16  # q and k maps, two heads, d = 16
    assert summary["inputs"]["after"] < 0.7 * summary["inputs"]["before"]
    assert summary["held_out"]["after"] < summary["held_out"]["before"]
    # the module that runs was updated: its error is the reported one
    assert output_error(net(held), opt(held))["rel_l2"] == pytest.approx(
        summary["held_out"]["after"], rel=1e-5
    )
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert opt.report.calibration == [summary]
    assert "calibration: 60 steps" in str(opt.report)
    assert opt.report.to_dict()["calibration"][0]["inputs"] == summary["inputs"]


def test_calibration_fits_low_rank_factors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    x = torch.randn(32, 64)
    opt = fxopt.optimize(
        net,
        x,
        passes=["lowrank_linear"],
        approximate=True,
        verify=False,
        options={"lowrank_linear": {"energy": 0.6}},
    )
    summary = fxopt.calibrate(net, opt, x, steps=50, lr=3e-3, progress=False)
    assert summary["inputs"]["after"] < summary["inputs"]["before"]


def test_zero_steps_change_nothing(net):
    (x,) = batches(1)
    opt = linearized(net, x)
    before = opt(x)
    summary = fxopt.calibrate(net, opt, x, steps=0, progress=False)
    assert summary["inputs"]["before"] == summary["inputs"]["after"]
    assert torch.equal(opt(x), before)


def test_calibrate_needs_constants_to_fit(net):
    (x,) = batches(1)
    with pytest.raises(InputError, match="no constants to calibrate"):
        fxopt.calibrate(net, linearized(net, x, feature_map="elu"), x, progress=False)
    summary = fxopt.calibrate(
        net, linearized(net, x, feature_map="elu"), x, steps=5, fit_all=True, progress=False
    )
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())


def test_calibrate_expects_an_optimized_module(net):
    with pytest.raises(InputError, match="fxopt.optimize returned"):
        fxopt.calibrate(net, net, batches(1)[0])


def test_optimize_reports_approximate_errors_instead_of_failing(net):
    (x,) = batches(1)
    opt = fxopt.optimize(
        net,
        x,
        passes=["linearize_attention"],
        approximate=True,
        options={"linearize_attention": {"feature_map": "elu"}},
    )
    (record,) = opt.report.passes
    assert record.status == "applied" and record.error["example"]["rel_l2"] > 0
    assert opt.report.final_error == pytest.approx(output_error(net(x), opt(x))["max_abs"])
