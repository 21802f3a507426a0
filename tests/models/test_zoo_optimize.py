"""Every zoo model optimizes with verification, matches eager at two batch sizes, and keeps no
batch norm where folding is exact."""

import pytest
import torch

import fxopt
from fxopt.testing import count_ops, graph_of

aten = torch.ops.aten


@pytest.mark.parametrize("name", fxopt.models.list())
def test_zoo_model_optimizes_and_matches_eager_at_two_batch_sizes(name):
    model = fxopt.models.create(name)
    example = fxopt.models.example_inputs(name, batch=2)
    opt = fxopt.optimize(model, example, verify=True)
    assert opt.report.dynamic_batch, opt.report.notes
    assert not opt.report.rolled_back
    for batch in (2, 5):
        inputs = fxopt.models.example_inputs(name, batch=batch, seed=batch)
        fxopt.testing.assert_equivalent(model, opt, inputs)
    assert "batch_norm" not in opt.report.after.op_counts, str(opt.report)


@pytest.mark.parametrize("name", ["resnet18_like", "mobilenetv2_like", "dncnn"])
def test_folding_shrinks_the_op_count_of_conv_bn_models(name):
    model = fxopt.models.create(name)
    opt = fxopt.optimize(model, fxopt.models.example_inputs(name))
    before, after = opt.report.before, opt.report.after
    assert sum(after.op_counts.values()) < sum(before.op_counts.values())
    assert after.params < before.params and after.flops < before.flops


def test_inductor_backend_compiles_the_optimized_graph():
    model = fxopt.models.create("espcn")
    (x,) = fxopt.models.example_inputs("espcn")
    opt = fxopt.optimize(model, x, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


LAYERS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.linear)
DEPLOYABLE = [name for name in fxopt.models.list() if fxopt.models.info(name).has_deploy]


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_optimize_reaches_the_hand_written_deploy_form_on_its_own(name):
    """fxopt never sees the deploy code: it gets the train form and must find the same layers."""
    model = fxopt.models.create(name)
    example = fxopt.models.example_inputs(name, batch=2)
    opt = fxopt.optimize(model, example)
    deploy = graph_of(fxopt.models.create(name, deploy=True), *example)
    assert count_ops(opt.graph_module, *LAYERS) == count_ops(deploy, *LAYERS)
    assert count_ops(opt.graph_module, aten.batch_norm) == 0
    fxopt.testing.assert_equivalent(model, opt, fxopt.models.example_inputs(name, batch=3))
