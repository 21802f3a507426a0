"""The zoo models with a second exact form: FSRCNN's transposed-conv upsampler and InceptionNeXt's
merged kernel on a large map."""

import pytest
import torch

import fxopt
from fxopt.models.superres_transposed import FSRCNN, support_masks
from fxopt.pipeline import DEFAULT_PIPELINE
from fxopt.testing import count_ops

aten = torch.ops.aten
NAMES = ("fsrcnn_like", "fsrcnn_x3_like", "inceptionnext_merged_large_map")


def test_models_are_registered():
    assert set(NAMES) <= set(fxopt.models.list())


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [5, 8])
def test_fsrcnn_upsamples_by_its_scale(scale, size):
    model = FSRCNN(scale=scale, features=8, shrink=4, mapping=1).eval()
    assert model(torch.randn(1, 1, size, size + 1)).shape == (
        1,
        1,
        scale * size,
        scale * (size + 1),
    )


def test_masked_inception_mixer_keeps_its_supports_and_identity_channels_after_randomizing():
    model = fxopt.models.create("inceptionnext_merged_large_map")
    mixer = model.mixer
    kernel = mixer.weight * mixer.mask + mixer.delta
    assert (kernel[mixer.mask == 0] == mixer.delta[mixer.mask == 0]).all()
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x)[:, :20], x[:, :20])
        assert (mixer(x)[:, 20:] - x[:, 20:]).abs().max() > 1e-2


def test_support_masks_lay_out_identity_square_and_bands():
    mask, delta, bias_mask = support_masks(16, 3, 7, 0.125)
    assert mask[:10].sum() == 0 and delta[:10].sum() == 10 and bias_mask[:10].sum() == 0
    assert mask[10, 0].sum() == 9 and mask[12, 0, 3].sum() == 7 and mask[14, 0, :, 3].sum() == 7


@pytest.mark.parametrize("name", NAMES)
def test_optimize_with_the_exact_kernel_passes_picks_the_cheaper_forms(name):
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name, batch=2)
    passes = [*DEFAULT_PIPELINE, "swap_subpixel_conv", "split_channel_kernels"]
    opt = fxopt.optimize(model, inputs, passes=passes)
    assert opt.report.rolled_back == []
    gm = opt.graph_module
    if name.startswith("fsrcnn"):
        assert count_ops(gm, aten.conv_transpose2d) == 0 and count_ops(gm, aten.pixel_shuffle) == 1
    else:
        assert count_ops(gm, aten.cat) == 1 and count_ops(gm, aten.split_with_sizes) == 1
    for batch in (1, 3):
        fxopt.testing.assert_equivalent(model, opt, fxopt.models.example_inputs(name, batch=batch))
