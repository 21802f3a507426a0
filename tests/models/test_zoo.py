"""The model zoo: every registered model is deterministic, randomized, sane and exportable."""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fxopt import models
from fxopt.models import registry

NAMES = models.list()
ISSUE_MODELS = {
    "resnet18_like",
    "mobilenetv2_like",
    "convnext_atto_like",
    "espcn",
    "dncnn",
    "conv3d_bn_net",
    "vit_bn_like",
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS)]


def test_list_is_sorted_and_holds_the_issue_models():
    assert NAMES == sorted(NAMES)
    assert ISSUE_MODELS <= set(NAMES)


@pytest.mark.parametrize(
    "call", [models.create, models.example_inputs, models.info], ids=lambda f: f.__name__
)
def test_unknown_name_raises_value_error_listing_the_models(call):
    with pytest.raises(ValueError, match="no_such_model") as error:
        call("no_such_model")
    assert all(name in str(error.value) for name in NAMES)


def test_deploy_form_of_a_model_without_one_raises_value_error():
    with pytest.raises(ValueError, match="has no deploy form"):
        models.create("resnet18_like", deploy=True)


def test_register_model_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("espcn", input_shape=(1, 8, 8))(nn.Identity)


class _ConvBn(nn.Sequential):
    def fuse(self) -> nn.Module:
        return fuse_conv_bn_eval(self[0], self[1])


@pytest.mark.parametrize("deploy", ["fuse", lambda model: model.fuse()], ids=["method", "callable"])
def test_deploy_form_carries_the_train_form_weights(monkeypatch, deploy):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register_model("toy_conv_bn", input_shape=(2, 6, 6), deploy=deploy)
    def toy_conv_bn() -> nn.Module:
        """Conv and BN that fold into one conv."""
        return _ConvBn(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))

    train = models.create("toy_conv_bn", seed=4)
    fused = models.create("toy_conv_bn", deploy=True, seed=4)
    assert isinstance(fused, nn.Conv2d) and not fused.training
    assert models.info("toy_conv_bn").has_deploy
    (x,) = models.example_inputs("toy_conv_bn", batch=2)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), train(x), rtol=1e-5, atol=1e-5)


def test_create_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    models.create("espcn")
    assert torch.equal(torch.rand(4), expected)


def test_randomize_without_inputs_moves_batch_norm_off_the_identity():
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.LayerNorm(4))
    models.randomize_(model, torch.Generator().manual_seed(0))
    norm = model[1]
    assert norm.running_mean.abs().min() > 0 and (norm.running_var != 1).all()
    assert ((norm.running_var >= 0.5) & (norm.running_var <= 2)).all()
    assert ((model[2].weight >= 0.5) & (model[2].weight <= 1.5)).all()


@pytest.mark.parametrize("name", NAMES)
def test_info_describes_the_model(name):
    described = models.info(name)
    assert described.name == name and described.description
    assert described.has_deploy is (registry._REGISTRY[name].deploy is not None)


@pytest.mark.parametrize("name", NAMES)
def test_create_is_deterministic_for_a_seed(name):
    first, second = (
        models.create(name, seed=3).state_dict(),
        models.create(name, seed=3).state_dict(),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", NAMES)
def test_create_with_another_seed_draws_every_parameter_anew(name):
    first, second = models.create(name, seed=0), models.create(name, seed=1)
    for (key, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert not torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_create_returns_a_model_in_eval_mode(name):
    assert not any(module.training for module in models.create(name).modules())


@pytest.mark.parametrize("name", NAMES)
def test_create_leaves_no_parameter_at_a_constant_fill(name):
    # Catches BN weights left at 1, biases at 0 and layer-scale gammas at their 1e-6 init.
    for key, param in models.create(name).named_parameters():
        assert param.numel() == 1 or param.std() > 1e-3, key


@pytest.mark.parametrize("name", NAMES)
def test_batch_norm_running_stats_are_not_the_defaults(name):
    for norm in _batch_norms(models.create(name)):
        assert (norm.running_mean != 0).any() and (norm.running_var != 1).any()
        assert norm.running_var.std() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_have_the_registered_shape(name):
    (x,) = models.example_inputs(name, batch=3)
    assert x.shape == (3, *models.info(name).input_shape) and x.dtype == torch.float32
    assert torch.equal(x, models.example_inputs(name, batch=3)[0])


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_sane_and_per_sample(name):
    model = models.create(name)
    (x,) = models.example_inputs(name, batch=3)
    with torch.no_grad():
        batched, single = model(x), model(x[:1])
    assert torch.isfinite(batched).all()
    assert 1e-2 <= batched.std() <= 1e2
    # Eval-mode norms make each sample independent of the rest of its batch.
    torch.testing.assert_close(single, batched[:1], rtol=1e-4, atol=1e-5)
    # The output must depend on the input, or numerical checks of a rewrite would prove little.
    assert (batched[0] - batched[1]).abs().max() > 1e-2 * batched.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_export_with_a_dynamic_batch_dimension(name):
    model = models.create(name)
    (x2,) = models.example_inputs(name, batch=2)
    program = torch.export.export(
        model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False
    )
    (x3,) = models.example_inputs(name, batch=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3), model(x3))
