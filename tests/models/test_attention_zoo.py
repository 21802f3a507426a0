"""The attention models optimize with the default pipeline (attention passes included), match
eager, and run at any sequence length."""

import pytest
import torch

import fxopt

aten = torch.ops.aten
# model -> (tokens for the check, the attention pass expected to fire, how often)
EXPECTED = {
    "vit_deit_like": (None, "canonicalize_attention", {"softmax-attention": 2}),
    "token_softmax_attention": (100, "canonicalize_attention", {"softmax-attention": 2}),
    "linear_attention_vit": (300, "reassociate_linear_attention", {"linear-attention": 2}),
    "gla_like_block": (400, "reassociate_linear_attention", {"linear-attention": 1}),
}


def applied(report, name):
    (record,) = [r for r in report.passes if r.name == name]
    return record.applied


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attention_model_optimizes_and_matches_eager(name):
    tokens, pass_name, fired = EXPECTED[name]
    shape = None if tokens is None else (tokens, 64)
    model = fxopt.models.create(name)
    example = fxopt.models.example_inputs(name, batch=2, shape=shape)
    opt = fxopt.optimize(model, example)  # the default pipeline has both attention passes
    assert not opt.report.rolled_back
    assert applied(opt.report, pass_name) == fired, str(opt.report)
    fxopt.testing.assert_equivalent(
        model, opt, fxopt.models.example_inputs(name, batch=3, seed=3, shape=shape)
    )


@pytest.mark.parametrize(
    "name", ["token_softmax_attention", "linear_attention_vit", "gla_like_block"]
)
def test_token_models_take_any_sequence_length(name):
    model = fxopt.models.create(name).eval()
    for tokens in (1, 37, 130):
        (x,) = fxopt.models.example_inputs(name, batch=2, shape=(tokens, 64))
        with torch.no_grad():
            assert model(x).shape == (2, tokens, 64)
