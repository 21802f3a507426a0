"""The differential fuzzer: random models written with real code's idioms, optimized end to end
and compared with eager; and proof that it fails when fxopt is wrong.

Run with `-s` to see each run's outcomes, idiom coverage and the pass rules that fired. The slow
run draws 1000 models (`pytest -m slow`; `FXOPT_FUZZ_EXAMPLES=N` for another count).
"""

import copy
import os

import pytest
import torch
from hypothesis.errors import InvalidArgument
from torch import nn

from fxopt import Rule, register_pass, rewrite
from fxopt.report import Report
from fxopt.testing import fuzz_check
from fxopt.testing.fuzz import FuzzFailure, Mismatch, check_model, fuzz
from fxopt.testing.fuzz_draw import check_kinds
from fxopt.testing.fuzz_models import KNOWN_BUGS, SWITCHES, FuzzSpec, Part, build, script

aten = torch.ops.aten
SLOW_EXAMPLES = int(os.environ.get("FXOPT_FUZZ_EXAMPLES", 1000))
IDIOMS = {  # every coverage label the default strategy can draw
    "additive mask argument",
    "attention",
    "batch norm over features",
    "bool mask argument",
    "buffer read",
    "conv-bn-act stack",
    "data-dependent branch",
    "default argument",
    "dict output",
    "in-place",
    "intermediate output",
    "layer norm",
    "linear stack",
    "list output",
    "masks",
    "nested output",
    "non-tensor argument",
    "optional argument None",
    "parallel branches",
    "shared module",
    "tied weights",
    "train-mode model",
    "tuple output",
    "views",
}

ACTIVATIONS_TO_IDENTITY = [
    Rule(f"drop-{op.__name__}", pattern=(op,), build=lambda m: m.root.args[0])
    for op in (aten.relu, aten.gelu, aten.silu)
]
MLP = {"hidden": 4, "norm": None, "act": "relu", "inplace": False}


@register_pass("test_fuzz_drop_activations", exact=True)
def drop_activations(gm):
    """test_fuzz_drop_activations: act(x) => x (deliberately wrong)."""
    return rewrite(gm, ACTIVATIONS_TO_IDENTITY)


def test_the_default_strategy_optimizes_random_models_like_eager():
    summary = fuzz(max_examples=25)
    print(f"\n{summary}")
    assert summary.examples >= 20 and summary.outcomes["ok"] >= 1
    assert summary.applied, "no pass fired on any drawn model"


@pytest.mark.slow
def test_the_default_strategy_holds_for_a_thousand_models():
    summary = fuzz(max_examples=SLOW_EXAMPLES)
    print(f"\n{summary}")
    assert summary.examples >= 0.9 * SLOW_EXAMPLES
    assert set(summary.idioms) == IDIOMS


def test_a_wrong_registered_pass_is_caught_and_shrunk_to_a_runnable_script():
    with pytest.raises(FuzzFailure) as caught:
        fuzz(
            passes=["test_fuzz_drop_activations"],
            max_examples=60,
            kinds=["conv", "mlp", "views"],
            database=None,
            seed=0,  # the same draws every run: how far it shrinks must not depend on luck
            shrink_seconds=30,
        )
    error, message = caught.value, str(caught.value)
    assert "optimize rolled a pass back: test_fuzz_drop_activations" in message
    assert "inputs: (float32(" in message and "class Model(nn.Module)" in message
    assert len(error.spec.parts) <= 2
    namespace = {}
    exec(compile(error.script, "repro.py", "exec"), namespace)  # noqa: S102
    with pytest.raises(Mismatch, match="rolled a pass back"):
        check_model(
            namespace["model"],
            namespace["make_inputs"],
            error.spec.batch,
            error.spec.input_seed,
            passes=["test_fuzz_drop_activations"],
        )


class Stub(nn.Module):
    """What a broken `optimize` might return: `forward` is given the eager model too."""

    def __init__(self, model, forward):
        super().__init__()
        self.model, self.run = copy.deepcopy(model), forward
        self.report = Report("Model", "eager", dynamic_batch=True)

    def forward(self, *args):
        return self.run(self.model, *args)


class CopyOfInput(nn.Module):
    def forward(self, x):
        return (x.clone(),)


def make_inputs(batch: int, seed: int, other_arguments: bool = False) -> tuple:
    return (torch.randn((batch, 4, 2), generator=torch.Generator().manual_seed(seed)),)


def returns_its_input(model, x):
    return (x,)


def writes_into_its_input(model, x):
    out = model(x.clone())
    x.add_(1.0)
    return out


def returns_a_tuple_as_a_list(model, x):
    return list(model(x))


@pytest.mark.parametrize(
    "forward, kind",
    [
        (returns_its_input, "an output aliases an input"),
        (writes_into_its_input, "the optimized model wrote into its inputs"),
        (returns_a_tuple_as_a_list, "output structure differs"),
    ],
)
def test_each_way_of_differing_from_eager_is_caught(monkeypatch, forward, kind):
    monkeypatch.setattr(fuzz_check, "optimize", lambda model, example, **kw: Stub(model, forward))
    with pytest.raises(Mismatch) as caught:
        check_model(CopyOfInput(), make_inputs, 2, 0)
    assert caught.value.kind == kind


def test_a_changed_caller_model_is_caught(monkeypatch):
    spec = FuzzSpec("tokens", 2, 2, 2, (Part("mlp", MLP),))
    model, make_inputs, _ = build(spec)

    def optimize_in_place(model, example, **kw):
        next(model.parameters()).data.add_(1.0)
        return Stub(model, lambda eager, *args: eager(*args))

    monkeypatch.setattr(fuzz_check, "optimize", optimize_in_place)
    with pytest.raises(Mismatch, match="optimize changed the caller's model"):
        check_model(model, make_inputs, 2, 0)


def test_a_drawn_model_records_its_idioms_and_prints_as_a_script_that_checks_it():
    spec = FuzzSpec(
        "spatial",
        4,
        3,
        3,
        (
            Part("repvgg", {"out": 4, "groups": 2, "inplace": True}),
            Part("to_tokens", {"flatten": True}, tap=True),
            Part(
                "attention",
                {"heads": 2, "fused": True, "sdpa": False, "mask": "arg", "fill": "min"},
            ),
        ),
        outputs="nested",
        mask="bool",
        scale=3,
    )
    model, make_inputs, idioms = build(spec)
    assert {"parallel branches", "in-place", "attention", "masks", "nested output"} <= idioms
    assert "bool mask argument" in idioms
    x, mask = make_inputs(1, 0)
    assert x.shape == (1, 4, 3, 3) and mask.shape == (1, 9) and mask[:, 0].all()
    text = script(spec)
    assert "def forward(self, x, mask=None):" in text and "out += " in text
    namespace = {}
    exec(compile(text, "repro.py", "exec"), namespace)  # noqa: S102
    assert check_model(namespace["model"], namespace["make_inputs"], 1, 0).outcome == "ok"


def test_every_fixed_switch_is_drawn_by_default_and_unknown_names_are_refused(monkeypatch):
    with pytest.raises(InvalidArgument, match="unknown"):
        check_kinds(None, ["no_such_bug"])
    with pytest.raises(InvalidArgument, match="unknown"):
        check_kinds(["no_such_kind"], ())
    kinds, switches = check_kinds(None, ())
    assert switches == set(SWITCHES) and "counter" in kinds
    monkeypatch.setitem(KNOWN_BUGS, "buffer_writes", "reopened")  # an open bug: drawn on demand
    kinds, switches = check_kinds(None, ())
    assert "buffer_writes" not in switches and "counter" not in kinds
    assert "counter" in check_kinds(None, ["buffer_writes"])[0]


def test_typed_errors_are_counted_not_failed():
    spec = FuzzSpec("tokens", 2, 2, 2, (Part("scalar", {"scale": True, "flag": False}),))
    model, make_inputs, idioms = build(spec)
    checked = check_model(model, make_inputs, 1, 0, passes=["no_such_pass"])
    assert checked.outcome == "InputError" and checked.report is None
