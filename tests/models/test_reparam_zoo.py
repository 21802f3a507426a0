"""Structural re-parameterization zoo: each train form and its hand-written deploy form compute the
same function, the deploy form is the smaller graph, and the kernel identities hold on their own."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.models import reparam
from fxopt.models.dbb import BNAndPad
from fxopt.testing import count_ops, graph_of

aten = torch.ops.aten
REPARAM_MODELS = [
    "acnet_resnet_like",
    "dbb_net",
    "fastvit_repmixer_net",
    "inceptionnext_atto_like",
    "mobileone_s0_like",
    "replknet_like",
    "repmlp_net",
    "repvgg_a0_like",
    "unireplknet_like",
    "vit_adapter_net",
]


@functools.cache
def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    return fxopt.models.create(name, seed=5), fxopt.models.create(name, deploy=True, seed=5)


@functools.cache
def _graph(name: str, deploy: bool) -> torch.fx.GraphModule:
    (x2,) = fxopt.models.example_inputs(name, batch=2)
    return graph_of(_pair(name)[deploy], x2, dynamic_batch=True)


def _conv_and_linear_ops(gm: torch.fx.GraphModule) -> int:
    return count_ops(gm, aten.conv2d, aten.linear)


def _batch_norm_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if "batch_norm" in str(n.target)]


def test_every_reparam_model_is_registered_with_a_deploy_form():
    assert set(REPARAM_MODELS) <= set(fxopt.models.list())
    assert all(fxopt.models.info(name).has_deploy for name in REPARAM_MODELS)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", REPARAM_MODELS)
def test_deploy_form_matches_train_form(name, batch):
    train, deploy = _pair(name)
    inputs = fxopt.models.example_inputs(name, batch=batch, seed=batch)
    fxopt.testing.assert_equivalent(train, deploy, inputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", REPARAM_MODELS)
def test_deploy_graph_has_no_batch_norm_and_fewer_convs_and_linears(name):
    train, deploy = _graph(name, False), _graph(name, True)
    assert not _batch_norm_ops(deploy)
    assert _conv_and_linear_ops(deploy) < _conv_and_linear_ops(train)


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("name", REPARAM_MODELS)
def test_both_forms_export_with_a_dynamic_batch(name, deploy):
    gm, model = _graph(name, deploy), _pair(name)[deploy]
    for batch in (1, 5):
        (x,) = fxopt.models.example_inputs(name, batch=batch, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_reparameterize_is_idempotent():
    deploy = fxopt.models.create("mobileone_s0_like", deploy=True)
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    again = reparam.reparameterize(deploy)
    assert again is deploy and before.keys() == deploy.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in deploy.state_dict().items())


def test_vit_adapter_deploy_form_keeps_only_the_host_linears():
    # Two linears per adapter fold away: 4 adapters in 2 blocks leave 8 fewer linears.
    train, deploy = _graph("vit_adapter_net", False), _graph("vit_adapter_net", True)
    assert count_ops(train, aten.linear) - count_ops(deploy, aten.linear) == 8


# The kernel identities behind the deploy forms, each against the op it stands for.


def _random_bn(channels: int, generator: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    fxopt.models.randomize_(bn, generator)
    return bn


def test_fuse_conv_bn_matches_conv_then_norm():
    g = torch.Generator().manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), _random_bn(4, g)
    x = torch.randn(2, 3, 6, 6, generator=g)
    weight, bias = reparam.fuse_conv_bn(conv.weight, conv.bias, bn)
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)))


def test_fuse_bn_conv_matches_norm_then_unpadded_conv():
    g = torch.Generator().manual_seed(1)
    bn, conv = _random_bn(3, g), nn.Conv2d(3, 4, 2, stride=2)
    x = torch.randn(2, 3, 6, 6, generator=g)
    weight, bias = reparam.fuse_bn_conv(conv.weight, conv.bias, bn)
    torch.testing.assert_close(F.conv2d(x, weight, bias, stride=2), conv(bn(x)))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_kernel_maps_the_input_to_itself(groups):
    x = torch.randn(2, 6, 5, 5)
    kernel = reparam.identity_kernel(6, groups, 3)
    torch.testing.assert_close(F.conv2d(x, kernel, padding=1, groups=groups), x)


@pytest.mark.parametrize("groups", [1, 4])
def test_avg_pool_kernel_is_the_pool(groups):
    x = torch.randn(2, 4, 7, 7)
    kernel = reparam.avg_pool_kernel(4, groups, 3)
    torch.testing.assert_close(F.conv2d(x, kernel, stride=2, groups=groups), F.avg_pool2d(x, 3, 2))


def test_pad_kernel_centres_a_band_kernel_and_rejects_an_off_centre_size():
    x, band = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 1, 5)
    padded = reparam.pad_kernel(band, 5)
    torch.testing.assert_close(F.conv2d(x, padded, padding=2), F.conv2d(x, band, padding=(0, 2)))
    with pytest.raises(ValueError, match="cannot centre"):
        reparam.pad_kernel(band, 4)


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (3, 4), (5, 2)])
def test_dilate_kernel_is_the_dilated_conv(kernel, dilation):
    x, weight = torch.randn(1, 4, 20, 20), torch.randn(4, 1, kernel, kernel)
    dense = reparam.dilate_kernel(weight, dilation)
    assert dense.shape[-1] == dilation * (kernel - 1) + 1
    pad = dense.shape[-1] // 2
    expected = F.conv2d(x, weight, padding=pad, dilation=dilation, groups=4)
    torch.testing.assert_close(F.conv2d(x, dense, padding=pad, groups=4), expected)


def test_merge_1x1_kxk_is_exact_when_the_border_carries_the_bias():
    g = torch.Generator().manual_seed(2)
    first = (torch.randn(5, 3, 1, 1, generator=g), torch.randn(5, generator=g))
    second = (torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, generator=g))
    x = torch.randn(2, 3, 6, 6, generator=g)
    # The 1x1 conv sees the zero-padded input, so its border is its bias (DBB's BNAndPad).
    middle = F.conv2d(F.pad(x, [1, 1, 1, 1]), *first)
    expected = F.conv2d(middle, *second)
    weight, bias = reparam.merge_1x1_kxk(first, second)
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected)


def test_bn_and_pad_in_eval_writes_the_norm_of_zero_on_the_border():
    layer = BNAndPad(3, 2).eval()
    fxopt.models.randomize_(layer, torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 4, 4)
    _, shift = reparam.batch_norm_affine(layer.bn)
    expected = F.pad(layer.bn(x) - shift[:, None, None], [2] * 4) + shift[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.testing.assert_close(layer(x)[..., 0, 0], shift.expand(2, 3))


def test_conv_as_linear_is_the_conv_on_a_fixed_input():
    weight, bias = torch.randn(5, 3, 3, 3), torch.randn(5)
    x = torch.randn(2, 3, 4, 4)
    matrix, vector = reparam.conv_as_linear(weight, bias, (3, 4, 4), padding=1)
    expected = F.conv2d(x, weight, bias, padding=1).flatten(1)
    torch.testing.assert_close(F.linear(x.flatten(1), matrix, vector), expected)


def test_merge_linears_composes_in_order():
    first, second = nn.Linear(4, 3), nn.Linear(3, 5)
    x = torch.randn(2, 4)
    merged = reparam.merge_linears((first.weight, first.bias), (second.weight, second.bias))
    torch.testing.assert_close(F.linear(x, *merged), second(first(x)))
