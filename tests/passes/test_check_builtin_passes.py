"""Every built-in pass keeps random models computing what they computed (`check_pass`).

The passes are read from the registry when the tests are collected, so a new pass is checked
as soon as it lands. A pass listed in EXERCISED_BY runs on models made of the blocks it
rewrites and must fire, which proves the check is not vacuous; any other pass runs on models
of every kind. Run with `-s` to see how often each pass fired; the slow variant runs 1000
examples per pass (`pytest -m slow`, or any count with `--fxopt-examples N`).
"""

import pytest

import fxopt
from fxopt.testing import check_pass, strategies

EXERCISED_BY = {  # pass -> the ops of models it fires on
    "fold_conv_bn": ("conv", "pointwise", "depthwise", "transposed", "bn", "act", "residual"),
    "fold_linear_bn": ("linear", "bn", "act", "noop", "residual"),
    "fold_bn_into_next": ("conv", "pointwise", "depthwise", "bn", "act"),
    "fold_channel_affine": ("conv", "pointwise", "transposed", "linear", "scale"),
    "fold_constants": ("conv", "depthwise", "linear", "computed_weight"),
    "remove_noops": ("noop", "conv", "linear", "act", "residual"),
}
EXAMPLES, SLOW_EXAMPLES = 30, 1000


def builtin_passes() -> list[fxopt.PassInfo]:
    return [
        info
        for info in fxopt.list_passes()
        if info.fn.__module__.startswith("fxopt.passes.") and not info.name.startswith("test_")
    ]


def check(info: fxopt.PassInfo, examples: int, min_fired: int):
    if not info.exact:
        pytest.skip(f"{info.name} is approximate: its outputs are not meant to match")
    ops = EXERCISED_BY.get(info.name)
    strategy = strategies.specs(ops=ops) if ops else None
    summary = check_pass(
        info.name, strategy=strategy, max_examples=examples, min_fired=min_fired if ops else None
    )
    print(f"\n{summary}")
    return summary


@pytest.mark.parametrize("info", builtin_passes(), ids=lambda info: info.name)
def test_builtin_pass_keeps_random_models_equivalent(info):
    check(info, EXAMPLES, min_fired=1)


@pytest.mark.slow
@pytest.mark.parametrize("info", builtin_passes(), ids=lambda info: info.name)
def test_builtin_pass_keeps_random_models_equivalent_at_length(info):
    check(info, SLOW_EXAMPLES, min_fired=50)


def test_the_exercised_passes_are_registered():
    assert set(EXERCISED_BY) <= {info.name for info in builtin_passes()}
