import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.analysis.lowrank import LowRankSettings, truncate
from fxopt.ir.errors import InputError
from fxopt.passes.lowrank_conv import lowrank_conv
from fxopt.passes.lowrank_linear import lowrank_linear
from fxopt.pipeline import output_error, run_passes
from fxopt.report import Report
from fxopt.testing import apply_pass, count_ops, graph_of
from fxopt.verify import input_sets

aten = torch.ops.aten
APPROXIMATE = ("lowrank_linear", "lowrank_conv", "decompose_large_kernel", "linearize_attention")


def low_rank(out_features, in_features, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(out_features, rank, generator=generator)
    return left @ torch.randn(rank, in_features, generator=generator) / in_features


def mlp(rank=4, width=64, seed=0):
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).eval()
    with torch.no_grad():
        net[0].weight.copy_(low_rank(width, width, rank, seed))
    return net


def conv_net(rank=3, seed=0):
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        net[0].weight.copy_(low_rank(32, 16 * 9, rank, seed).reshape(32, 16, 3, 3))
    return net


def test_lowrank_linear_splits_a_low_rank_linear_into_two():
    net, x = mlp(rank=4), torch.randn(3, 64)
    result = apply_pass(lowrank_linear, net, x)
    assert result.applied == {"linear-lowrank": 1}
    assert count_ops(result.graph_module, aten.linear) == 3
    shapes = sorted(
        tuple(t.shape) for n, t in result.graph_module.named_buffers() if "lowrank" in n
    )
    assert shapes == [(4, 64), (64, 4)]
    assert result.summary["rank kept"] == "4/64"


def test_lowrank_conv_splits_a_low_rank_conv_into_conv_and_pointwise():
    net, x = conv_net(rank=3), torch.randn(2, 16, 8, 8)
    result = apply_pass(lowrank_conv, net, x)
    assert result.applied == {"conv-lowrank": 1}
    weights = [t.shape for n, t in result.graph_module.named_buffers() if "lowrank" in n]
    assert sorted(tuple(w) for w in weights) == [(3, 16, 3, 3), (32, 3, 1, 1)]
    assert count_ops(result.graph_module, aten.conv2d) == 2


def test_truncate_keeps_the_smallest_rank_with_the_energy():
    matrix = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(matrix.double())
    for energy in (0.5, 0.9, 0.99):
        f = truncate(matrix, energy)
        kept = s.square().cumsum(0) / s.square().sum()
        assert f.energy >= energy and (f.rank == 1 or kept[f.rank - 2] < energy)
        assert f.left.shape == (40, f.rank) and f.right.shape == (f.rank, 30)


def test_lowrank_error_decreases_as_the_energy_budget_grows():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(96, 96)).eval(), torch.randn(8, 96)
    errors, ranks = [], []
    for value in (0.3, 0.6, 0.8):
        result = lowrank_linear(graph_of(net, x), LowRankSettings(energy=value))
        ranks.append(int(result.summary["rank kept"].split("/")[0]))
        errors.append(output_error(net(x), result.graph_module(x))["rel_l2"])
    assert ranks == sorted(ranks) and len(set(ranks)) == 3
    assert errors[0] > errors[1] > errors[2] > 0


def test_reported_error_is_the_measured_error_on_a_zoo_model():
    budget = {"lowrank_linear": LowRankSettings(energy=0.9)}  # random weights have flat
    # spectra: 0.9 still factors 12 of the 17 linears
    model = fxopt.models.create("vit_bn_like").eval()
    (x,) = fxopt.models.example_inputs("vit_bn_like", batch=2)
    gm, report = graph_of(model, x), Report("vit", "eager")
    original = graph_of(model, x)
    sets = input_sets((x,), n_random=2)
    gm = run_passes(gm, ["lowrank_linear"], sets, report, settings=budget)
    (record,) = report.passes
    assert record.status == "applied" and not record.exact and record.applied["linear-lowrank"] > 0
    measured = output_error(original(x), gm(x))
    assert record.error["example"] == pytest.approx(measured, rel=1e-6)
    assert 0 < record.error["random"]["rel_l2"] <= 1
    assert record.max_error == max(e["max_abs"] for e in record.error.values())
    assert "approximate: example max abs" in str(report) and "rank kept" in str(report)
    assert report.to_dict()["passes"][0]["error"] == record.error


def test_an_approximate_pass_above_the_error_limit_is_rolled_back():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(64, 64)).eval(), torch.randn(4, 64)
    report, budget = Report("net", "eager"), {"lowrank_linear": LowRankSettings(energy=0.3)}
    gm = run_passes(
        graph_of(net, x),
        ["lowrank_linear"],
        [(x,)],
        report,
        approximate_max_error=0.1,
        settings=budget,
    )
    assert report.passes[0].status == "rolled back"
    assert "approximate-pass limit" in report.passes[0].message
    assert count_ops(gm, aten.linear) == 1


@settings(max_examples=12, deadline=None)
@given(
    out_features=st.integers(8, 48),
    in_features=st.integers(8, 48),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
)
def test_lowrank_linear_is_exact_on_genuinely_low_rank_weights(
    out_features, in_features, rank, seed, bias
):
    net = nn.Sequential(nn.Linear(in_features, out_features, bias=bias)).eval()
    with torch.no_grad():
        net[0].weight.copy_(low_rank(out_features, in_features, rank, seed))
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(seed))
    result = apply_pass(lowrank_linear, net, x, rtol=1e-4)  # SVD rounding, not truncation
    assert result.modified == (rank * (in_features + out_features) < in_features * out_features)


@settings(max_examples=8, deadline=None)
@given(
    channels=st.sampled_from([(8, 16), (16, 8), (12, 12)]),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    rank=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_lowrank_conv_is_exact_on_genuinely_low_rank_kernels(channels, kernel, stride, rank, seed):
    (c_in, c_out), taps = channels, channels[0] * kernel * kernel
    net = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(low_rank(c_out, taps, rank, seed).reshape(net[0].weight.shape))
    x = torch.randn(2, c_in, 9, 9, generator=torch.Generator().manual_seed(seed))
    result = apply_pass(lowrank_conv, net, x, rtol=1e-4)
    assert result.modified == (rank * (taps + c_out) < c_out * taps)


def test_lowrank_passes_are_idempotent():
    net, x = mlp(rank=4), torch.randn(3, 64)
    once = lowrank_linear(graph_of(net, x)).graph_module
    assert not lowrank_linear(once).modified
    net, x = conv_net(rank=2), torch.randn(2, 16, 8, 8)
    once = lowrank_conv(graph_of(net, x)).graph_module
    assert not lowrank_conv(once).modified


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        with torch.no_grad():
            self.fc.weight.copy_(low_rank(64, 64, 2))

    def forward(self, x):
        return self.fc(x) + self.fc(x.flip(-1))


@pytest.mark.parametrize(
    ("net", "x", "pass_fn", "reason"),
    [
        (Shared(), torch.randn(2, 64), lowrank_linear, "used only here"),
        (nn.Linear(64, 64), torch.randn(2, 64), lowrank_linear, "not cheaper"),
        (nn.Conv2d(8, 8, 3, groups=2), torch.randn(1, 8, 6, 6), lowrank_conv, "grouped"),
        (nn.Conv2d(8, 16, 3), torch.randn(1, 8, 6, 6), lowrank_conv, "not cheaper"),
    ],
)
def test_lowrank_declines(net, x, pass_fn, reason):
    gm = graph_of(net.eval(), x)
    before = str(gm.graph)
    result = pass_fn(gm)
    assert not result.modified and str(result.graph_module.graph) == before
    assert any(reason in miss for misses in result.declined.values() for miss in misses)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_passes_never_run_without_approximate_true(name):
    assert not fxopt.registry.get_pass(name).exact
    assert name not in fxopt.DEFAULT_PIPELINE
    with pytest.raises(InputError, match="approximate=True"):
        fxopt.optimize(mlp(), torch.randn(2, 64), passes=[name])


def test_approximate_true_alone_runs_only_the_exact_default_pipeline():
    opt = fxopt.optimize(mlp(), torch.randn(2, 64), approximate=True)
    ran = {p.name for p in opt.report.passes}
    assert ran == set(fxopt.DEFAULT_PIPELINE) and not ran & set(APPROXIMATE)


def test_options_reject_unknown_settings_and_bad_budgets():
    def run(**options):
        return fxopt.optimize(
            mlp(), torch.randn(2, 64), passes=["lowrank_linear"], approximate=True, **options
        )

    with pytest.raises(InputError, match="no setting 'rank'.*energy"):
        run(options={"lowrank_linear": {"rank": 3}})
    with pytest.raises(InputError, match=r"energy must be in \(0, 1\], got 1.5"):
        run(options={"lowrank_linear": {"energy": 1.5}})
    with pytest.raises(InputError, match="'lowrank_conv', which this call does not run"):
        run(options={"lowrank_conv": {"energy": 0.5}})
    with pytest.raises(InputError, match="unknown pass 'lowrank'"):
        run(options={"lowrank": {"energy": 0.5}})
    with pytest.raises(InputError, match="'fold_conv_bn' has no settings"):
        fxopt.optimize(mlp(), torch.randn(2, 64), options={"fold_conv_bn": {"x": 1}})
    with pytest.raises(InputError, match="a dict from pass name"):
        run(options=[("lowrank_linear", {"energy": 0.5})])
    with pytest.raises(InputError, match="approximate_max_error must be a number above 0"):
        run(approximate_max_error=0)


def test_settings_are_per_call_and_leave_the_next_call_at_the_defaults():
    net, x = mlp(rank=4), torch.randn(8, 64)  # the first linear has rank 4

    def ranks(**options):
        opt = fxopt.optimize(net, x, passes=["lowrank_linear"], approximate=True, **options)
        return opt.report.passes[0].summary["rank kept"]

    default = ranks()
    assert ranks(options={"lowrank_linear": {"energy": 0.3}}) != default
    assert ranks(options={"lowrank_linear": LowRankSettings(energy=0.3)}) != default
    assert ranks() == default  # nothing of the last call stayed behind


def test_the_error_limit_is_per_call():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(64, 64)).eval(), torch.randn(4, 64)
    budget = {"lowrank_linear": {"energy": 0.3}}

    def status(**limit):
        opt = fxopt.optimize(
            net, x, passes=["lowrank_linear"], approximate=True, options=budget, **limit
        )
        return opt.report.passes[0].status

    assert status(approximate_max_error=0.1) == "rolled back"
    assert status() == "applied"  # the default limit (1.0) keeps it
