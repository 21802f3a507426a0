"""The random-model strategies: valid, small, deterministic, printable, and covering every
block kind they promise."""

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from fxopt.testing import graph_of, strategies
from fxopt.testing.source import build, script
from fxopt.testing.spec import MAX_CHANNELS, Block, ModelSpec, Shape

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def all_blocks(blocks):
    for block in blocks:
        yield block
        yield from all_blocks(block.body)


@FAST
@given(strategies.specs(), st.data())
def test_every_drawn_model_runs_and_stays_small(spec, data):
    model = build(spec)
    (x,) = data.draw(strategies.inputs(model))
    assert not model.training and model.fxopt_spec is spec
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all()
    assert 1 <= len(spec.blocks) <= 4 and 1 <= x.shape[0] <= 3
    assert x.shape[1:] == spec.input.per_example and y.shape[1:] == spec.output.per_example
    assert spec.output.channels <= MAX_CHANNELS
    assert spec.output.mode != "spatial" or max(spec.output.sizes) <= 18


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.cases())
def test_drawn_models_export_with_a_dynamic_batch(case):
    model, inputs = case
    gm = graph_of(model, *inputs, dynamic_batch=True)
    bigger = torch.cat([inputs[0]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
        torch.testing.assert_close(gm(bigger), model(bigger))


@FAST
@given(strategies.specs(ops=["conv", "bn"], depth=2))
def test_ops_and_depth_restrict_what_is_drawn(spec):
    assert len(spec.blocks) <= 2
    for block in all_blocks(spec.blocks):
        assert block.kind in ("conv", "bn")
        assert block["variant"] in (None, "conv") and not block["act"] and not block["scale"]


@FAST
@given(strategies.specs(ops=["branches"], branches=3))
def test_branches_bounds_the_branch_count_and_keeps_them_aligned(spec):
    for block in spec.blocks:
        assert block.kind == "branches" and 2 <= len(block["items"]) <= 3
        assert all(item["kind"] == "conv" for item in block["items"])
    assert build(spec)(torch.randn(2, *spec.input.per_example)).dim() == spec.input.dims + 2


@pytest.mark.parametrize("kind", strategies.OPS)
def test_every_op_can_be_drawn(kind):
    def uses(spec: ModelSpec) -> bool:
        for block in all_blocks(spec.blocks):
            values = [block.kind, block["variant"], block["weight_fn"] and "computed_weight"]
            items = block["items"] or block["parts"] or ()
            values += [item["kind"] for item in items]
            if kind in values or (kind == "transposed" and block["variant"] == kind):
                return True
        return False

    assert uses(find(strategies.specs(), uses, settings=settings(max_examples=2000, database=None)))


@FAST
@given(strategies.specs(), st.integers(1, 3))
def test_the_printed_script_rebuilds_the_model_exactly(spec, batch):
    x = torch.randn(batch, *spec.input.per_example)
    namespace = {}
    exec(compile(script(spec), "<script>", "exec"), namespace)  # noqa: S102
    with torch.no_grad():
        assert torch.equal(namespace["model"](x), build(spec)(x))


@FAST
@given(strategies.models(ops=["conv", "bn", "branches", "linear"]))
def test_weights_are_deterministic_and_norms_away_from_identity(model):
    again = build(model.fxopt_spec)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(module.running_var, torch.ones_like(module.running_var))
            assert module.running_mean.abs().sum() > 0
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            assert max(module.weight.shape[:2]) <= MAX_CHANNELS * 3


def test_inputs_come_with_the_code_that_makes_them():
    spec = ModelSpec(Shape("spatial", 3, (5, 5)), (Block("act", {"act": "relu"}),))
    made = find(strategies.inputs(build(spec)), lambda inputs: inputs[0].shape[0] == 2)
    namespace = {"torch": torch}
    exec(made.code, namespace)  # noqa: S102
    assert torch.equal(namespace["inputs"][0], made[0])
    assert made.with_batch(1)[0].shape == (1, 3, 5, 5)


def test_invalid_arguments_are_refused_with_the_valid_choices():
    with pytest.raises(InvalidArgument, match="unknown ops"):
        strategies.specs(ops=["conv", "nonsense"])
    with pytest.raises(InvalidArgument, match="no block kind"):
        strategies.specs(ops=["identity"])
    with pytest.raises(InvalidArgument, match="strategies"):
        strategies.inputs(nn.Linear(2, 2))


@settings(max_examples=20, deadline=None)
@given(strategies.conv_bn())
def test_conv_bn_still_draws_a_conv_and_its_norm(case):
    model, x = case
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm) and model(x).dim() == x.dim()
