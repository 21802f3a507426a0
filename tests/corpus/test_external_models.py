"""`fxopt.models` builds timm, torchvision and Hugging Face models by name: random weights,
eval mode, batch norms off the identity, the input the model expects."""

import pytest
import torch
from torch import nn

from fxopt import models
from fxopt.cli import main
from fxopt.ir.errors import InputError
from fxopt.models import hf

pytestmark = pytest.mark.corpus


def test_timm_model_is_in_eval_mode_with_batch_norms_off_the_identity():
    model = models.create("timm:repvgg_a0")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not model.training and norms
    assert all(not torch.allclose(n.running_var, torch.ones_like(n.running_var)) for n in norms)
    assert not torch.equal(
        models.create("timm:repvgg_a0", seed=1).state_dict()["stem.conv_kxk.conv.weight"],
        model.state_dict()["stem.conv_kxk.conv.weight"],
    )


def test_timm_input_size_comes_from_the_pretrained_config():
    assert models.info("timm:fastvit_t8").input_shape == (3, 256, 256)
    (x,) = models.example_inputs("timm:fastvit_t8", batch=2)
    assert x.shape == (2, 3, 256, 256)


def test_timm_deploy_form_is_timms_reparameterize_model_with_the_same_function():
    model = models.create("timm:repvgg_a0")
    deploy = models.create("timm:repvgg_a0", deploy=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    (x,) = models.example_inputs("timm:repvgg_a0")
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-4, atol=1e-4)


def test_torchvision_models_take_their_input_size_and_return_one_tensor():
    assert models.info("torchvision:inception_v3").input_shape == (3, 299, 299)
    model = models.create("torchvision:googlenet")  # auxiliary classifiers off
    with torch.no_grad():
        out = model(*models.example_inputs("torchvision:googlenet"))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1000)


@pytest.mark.parametrize("name", sorted(hf.MODELS))
def test_hf_model_takes_one_tensor_and_returns_one_finite_tensor(name):
    spec = hf.MODELS[name]
    model = models.create(f"hf:{name}")
    (x,) = models.example_inputs(f"hf:{name}", batch=2)
    assert x.shape == (2, *spec.input_shape)
    assert x.dtype == (torch.float32 if spec.vocab is None else torch.int64)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["timm:no_such_model", "torchvision:no_such_model", "hf:no_such_model"]
)
def test_an_unknown_name_raises_input_error_naming_it(name):
    with pytest.raises(InputError, match=name):
        models.create(name)


def test_cli_optimizes_a_model_by_library_name(capsys):
    assert main(["optimize", "hf:bert"]) == 0
    assert "canonicalize_attention" in capsys.readouterr().out
