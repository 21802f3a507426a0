"""check_pass catches deliberately broken passes within its default budget of 200 examples,
shrinks each to a small model, and lets the correct versions of the same rewrites through.

Run with `-s` to see, per mutant, the time to the first counterexample and the size of the
model it was shrunk to.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from mutants import (
    fold_bn_into_padded_conv,
    fold_conv_bn_without_eps,
    merge_conv_pair,
    merge_kernels,
    reassociate_attention,
)

from fxopt.testing import PassCheckError, check_pass, strategies

CONV_BN = strategies.specs(ops=["conv", "bn"])
BRANCHES = strategies.specs(ops=["branches"])
ATTENTION = strategies.specs(ops=["attention", "linear_attention"])

MUTANTS = {
    "bn-fold-without-eps": (fold_conv_bn_without_eps, CONV_BN),
    "branch-merge-ignoring-dilation": (
        functools.partial(merge_conv_pair, ignore_dilation=True),
        BRANCHES,
    ),
    "branch-merge-one-tap-off": (functools.partial(merge_conv_pair, tap_offset=1), BRANCHES),
    "bn-fold-into-padded-conv": (fold_bn_into_padded_conv, CONV_BN),
    "softmax-attention-reassociated": (
        functools.partial(reassociate_attention, through_softmax=True),
        ATTENTION,
    ),
}


@pytest.fixture(scope="module")
def table():
    rows = {}
    yield rows
    print("\n\nmutant                          first counterexample              shrunk to")
    for name, (first, blocks, parameters) in rows.items():
        found = f"{first.seconds:5.1f} s, example {first.examples:3d} ({first.blocks} blocks)"
        print(f"{name:31s} {found:33s} {blocks} block(s), {parameters} parameters")


@pytest.mark.parametrize("name", list(MUTANTS))
def test_check_pass_catches_the_mutant_within_200_examples(name, table):
    mutant, strategy = MUTANTS[name]
    with pytest.raises(PassCheckError) as caught:
        check_pass(mutant, strategy=strategy, database=None, shrink_seconds=10)
    error = caught.value
    table[name] = (error.first, error.blocks, error.parameters)
    assert error.first.examples <= 200
    assert "class Model(nn.Module)" in str(error) and "rules fired: {" in str(error)
    assert error.blocks <= error.first.blocks


@pytest.mark.parametrize(
    "correct, strategy",
    [(merge_conv_pair, BRANCHES), (reassociate_attention, ATTENTION)],
    ids=["branch-merge", "linear-attention-reassociation"],
)
def test_the_correct_rewrites_pass_and_fire(correct, strategy):
    summary = check_pass(correct, strategy=strategy, max_examples=60, min_fired=10)
    assert summary.fired >= 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "correct, strategy",
    [(merge_conv_pair, BRANCHES), (reassociate_attention, ATTENTION)],
    ids=["branch-merge", "linear-attention-reassociation"],
)
def test_the_correct_rewrites_pass_the_full_budget(correct, strategy):
    check_pass(correct, strategy=strategy, max_examples=500, min_fired=100)


@pytest.mark.parametrize(
    "dilation, padding", [((1, 1), (1, 1)), ((2, 1), (2, 1)), ((3, 2), (3, 2))]
)
def test_merge_kernels_matches_the_sum_of_the_two_convs(dilation, padding):
    x = torch.randn(2, 3, 9, 8)
    big, small = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 1, 3)
    paddings = [padding, (0, 1)]
    expected = F.conv2d(x, big, padding=padding, dilation=dilation) + F.conv2d(
        x, small, padding=(0, 1)
    )
    kernel, pad = merge_kernels([big, small], paddings, [dilation, (1, 1)])
    torch.testing.assert_close(F.conv2d(x, kernel, padding=pad), expected, rtol=1e-5, atol=1e-5)
