"""check_pass: what it accepts, what it returns, and how it fails."""

import functools

import pytest
import torch
from mutants import fold_conv_bn_without_eps, merge_conv_pair

from fxopt import PassResult, Rule, rewrite
from fxopt.ir.errors import VerificationError
from fxopt.passes import fold_conv_bn
from fxopt.testing import PassCheckError, check_pass, graph_of, strategies
from fxopt.testing.check import resolve_pass, set_max_examples
from fxopt.verify import check_equivalent, input_sets

pytest_plugins = ["pytester"]

aten = torch.ops.aten
CONV_BN = strategies.specs(ops=["conv", "bn"], depth=2)
DROP_RELU = Rule("drop-relu", pattern=(aten.relu,), build=lambda match: match.root.args[0])


def test_check_pass_takes_a_registered_name_and_counts_what_fired():
    summary = check_pass("fold_conv_bn", strategy=CONV_BN, max_examples=15, min_fired=1)
    assert summary.name == "fold_conv_bn" and 1 <= summary.fired <= summary.examples <= 15
    assert set(summary.applied) == {"conv-bn"} and summary.applied["conv-bn"] >= summary.fired
    assert "fired on" in str(summary)


@pytest.mark.parametrize(
    "rules", [fold_conv_bn.RULES, fold_conv_bn.RULES[0]], ids=["rule-list", "rule"]
)
def test_check_pass_takes_rules(rules):
    summary = check_pass(rules, strategy=CONV_BN, max_examples=10, min_fired=1)
    names = [rules.name] if hasattr(rules, "name") else [rule.name for rule in rules]
    assert summary.name == "rules " + ", ".join(names)
    assert "conv-bn" in names


@pytest.mark.parametrize(
    "strategy",
    [strategies.conv_bn(), strategies.models(ops=["conv", "bn"]), strategies.cases(ops=["bn"])],
    ids=["model-and-input", "models", "cases"],
)
def test_check_pass_takes_models_or_model_input_pairs(strategy):
    check_pass(fold_conv_bn.fold_conv_bn, strategy=strategy, max_examples=8)


def test_a_broken_rule_fails_with_a_small_runnable_model():
    strategy = strategies.specs(ops=["conv", "act", "bn"])
    with pytest.raises(PassCheckError) as caught:
        check_pass(DROP_RELU, strategy=strategy, database=None, shrink_seconds=5)
    error, message = caught.value, str(caught.value)
    assert "check_pass(rules drop-relu): the outputs differ" in message
    assert "max |difference|" in message and "bound" in message
    assert "rules fired: {'drop-relu': 1}" in message
    assert error.blocks <= 2 and "F.relu(x)" in error.script
    namespace = {}
    exec(compile(error.script, "repro.py", "exec"), namespace)  # noqa: S102
    model, inputs = namespace["model"], namespace["inputs"]
    rewritten = rewrite(graph_of(model, *inputs, dynamic_batch=True), [DROP_RELU]).graph_module
    sets = input_sets(inputs, n_random=1, other_batch=inputs[0].shape[0] + 2)
    with pytest.raises(VerificationError):  # as the message says to reproduce it
        check_equivalent(model, rewritten, sets)
    assert f"other_batch={inputs[0].shape[0] + 2}" in message


def test_a_model_without_a_spec_is_reported_by_its_repr():
    with pytest.raises(PassCheckError) as caught:
        check_pass(fold_conv_bn_without_eps, strategy=strategies.conv_bn(), shrink_seconds=2)
    assert "BatchNorm" in str(caught.value) and "input shapes" in str(caught.value)


def test_a_pass_that_raises_fails_the_check():
    def explode(gm):
        raise RuntimeError("boom")

    with pytest.raises(PassCheckError, match="(?s)the pass raised.*RuntimeError: boom.*in explode"):
        check_pass(explode, strategy=CONV_BN, shrink_seconds=1)


def test_min_fired_fails_a_pass_the_strategy_never_exercises():
    def decline(gm):
        return PassResult(gm, False, {})

    with pytest.raises(PassCheckError, match="changed 0 of .* fewer than min_fired=1"):
        check_pass(decline, strategy=CONV_BN, max_examples=5, min_fired=1)


def test_a_pass_is_named_after_its_registry_key_or_function_and_arguments():
    assert resolve_pass(fold_conv_bn.fold_conv_bn)[0] == "fold_conv_bn"
    name, _ = resolve_pass(functools.partial(merge_conv_pair, tap_offset=1))
    assert name == "merge_conv_pair(tap_offset=1)"
    with pytest.raises(TypeError, match="pass name, function or rules"):
        resolve_pass(42)


def test_set_max_examples_overrides_every_call():
    set_max_examples(3)
    try:
        summary = check_pass("fold_conv_bn", strategy=CONV_BN, max_examples=100)
    finally:
        set_max_examples(None)
    assert summary.examples <= 3


def test_the_plugin_adds_the_examples_option_and_the_fixture(pytester):
    pytester.makepyfile(
        """
        from fxopt.testing import strategies

        def test_pass(fxopt_check):
            ops = strategies.specs(ops=["noop"])
            summary = fxopt_check("remove_noops", strategy=ops, max_examples=50)
            assert summary.examples <= 4
        """
    )
    result = pytester.runpytest_inprocess("--fxopt-examples", "4", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
