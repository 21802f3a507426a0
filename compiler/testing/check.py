"""`check_pass`: test a pass for output equivalence on random models, with hypothesis.

Each example is a random model and inputs for it. The model is captured with a symbolic batch,
the pass runs on the graph, and the result is compared with the eager model (fxopt's
verification tolerance) on the example inputs, on fresh values and at another batch size. A
failure is shrunk to the smallest model that still fails and reported as a runnable script.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn

from .example import SKIP, Outcome, example_key, run_example
from .failure import failure_message
from .minimize import minimize
from .resolve import resolve_pass
from .source import build, parameter_count
from .spec import ModelSpec
from .strategies import inputs, inputs_for, specs

_max_examples_override: int | None = None


def set_max_examples(count: int | None) -> None:
    """Make every `check_pass` run `count` examples (the pytest option `--fxopt-examples`);
    None goes back to each call's own `max_examples`."""
    global _max_examples_override
    _max_examples_override = count


def max_examples_override() -> int | None:
    return _max_examples_override


@dataclass
class CheckSummary:
    """What a `check_pass` run saw: examples run, how many the pass changed, rule counts."""

    name: str
    examples: int = 0
    fired: int = 0
    skipped: int = 0  # ill-conditioned models: float32 rounding alone nears the tolerance
    applied: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        rules = ", ".join(f"{rule} x{n}" for rule, n in sorted(self.applied.items())) or "none"
        skipped = f", {self.skipped} ill-conditioned skipped" if self.skipped else ""
        return (
            f"{self.name}: {self.examples} examples, fired on {self.fired} "
            f"(rules: {rules}){skipped}, {self.seconds:.1f} s"
        )


class PassCheckError(AssertionError):
    """`check_pass` found a model the pass gets wrong, or a pass that never fires.

    `first` says when the first counterexample came up and how big it was; `spec`, `inputs`,
    `blocks`, `parameters` and `script` describe the smallest one.
    """

    first: FirstFailure | None = None
    spec: ModelSpec | None = None
    inputs: tuple | None = None
    blocks: int | None = None
    parameters: int | None = None
    script: str | None = None


def check_pass(
    pass_or_rule,
    strategy: st.SearchStrategy | None = None,
    max_examples: int = 200,
    rtol: float | None = None,
    atol: float | None = None,
    min_fired: int | None = None,
    seed: int | None = None,
    derandomize: bool = False,
    shrink_seconds: float = 20.0,
    **hypothesis_settings,
) -> CheckSummary:
    """Check that a pass keeps random models computing what they computed.

    Parameters
    ----------
    pass_or_rule : str, callable, Rule or list of Rule
        A registered pass name, a pass function ``gm -> PassResult``, or rules to run with
        ``fxopt.rewrite``.
    strategy : SearchStrategy, optional
        What to draw: model specs, models or ``(model, inputs)`` pairs (default:
        ``strategies.specs()``, every block kind). Models without a spec need inputs.
    max_examples : int
        Examples to run (the pytest option ``--fxopt-examples`` overrides it).
    rtol, atol : float, optional
        Tolerance; default: fxopt's, by dtype (``max|a-b| <= rtol * max|a| + atol``).
    min_fired : int, optional
        Fail unless the pass changed at least this many examples: proof that the strategy
        exercises it.
    seed, derandomize :
        Fix hypothesis's random choices.
    shrink_seconds : float
        Stop hypothesis's shrinking after this long (every step exports a model; hypothesis
        alone would go on for 5 minutes), then simplify the spec block by block for up to
        half as long (`fxopt.testing.minimize`).
    **hypothesis_settings :
        Passed on to ``hypothesis.settings`` (e.g. ``database=None``).

    Returns
    -------
    CheckSummary
        Examples run, how many the pass changed, and how often each rule fired.

    Raises
    ------
    PassCheckError
        With the smallest failing model as a script, the error and its bound, and the rules
        that fired; or when the pass fired on fewer than `min_fired` examples.
    """
    name, run_pass = resolve_pass(pass_or_rule)
    run = Run(name, run_pass, strategy, rtol, atol, shrink_seconds)

    def example(data) -> None:
        run.example(data)

    example._hypothesis_internal_add_digest = name.encode()  # a database key per pass
    options = {
        "max_examples": _max_examples_override or max_examples,
        "deadline": None,
        "derandomize": derandomize,
        "report_multiple_bugs": False,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        **hypothesis_settings,
    }
    test = settings(**options)(given(st.data())(example))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    try:
        test()
    except PassCheckError as error:
        raise run.minimized(error) from None
    finally:
        torch.set_num_threads(threads)
    summary = run.summary
    summary.seconds = time.perf_counter() - run.start
    if min_fired and summary.fired < min_fired:
        raise PassCheckError(
            f"check_pass({name}): the pass changed {summary.fired} of {summary.examples} "
            f"models, fewer than min_fired={min_fired}; the strategy does not exercise it. "
            "Draw models it applies to, e.g. strategies.specs(ops=[...])."
        )
    return summary


@dataclass
class FirstFailure:
    """When the first counterexample came up, and how big it was."""

    at: float
    seconds: float
    examples: int
    blocks: int | None
    parameters: int


class Run:
    """One `check_pass` run: its examples, their outcomes (by spec, so that shrinking never
    exports a model twice) and the first failure."""

    def __init__(self, name, run_pass, strategy, rtol, atol, shrink_seconds: float):
        self.name, self.run_pass, self.strategy = name, run_pass, strategy
        self.rtol, self.atol, self.shrink_seconds = rtol, atol, shrink_seconds
        self.summary, self.outcomes = CheckSummary(name), {}
        self.first: FirstFailure | None = None
        self.start = time.perf_counter()

    def out_of_shrinking_time(self) -> bool:
        return self.first is not None and time.perf_counter() - self.first.at > self.shrink_seconds

    def example(self, data) -> None:
        model, example_inputs = draw_case(data, self.strategy)
        key = example_key(model, example_inputs)
        if key not in self.outcomes:
            if key is not None and self.out_of_shrinking_time():
                return  # stop shrinking: only the failures already seen fail again
            self.summary.examples += 1
            self.outcomes[key] = run_example(
                self.run_pass, model, example_inputs, self.rtol, self.atol, self.summary
            )
        outcome = self.outcomes.pop(key) if key is None else self.outcomes[key]
        if outcome is SKIP:
            reject()
        if outcome is None:
            return
        if self.first is None:
            now, spec = time.perf_counter(), getattr(model, "fxopt_spec", None)
            blocks = spec.count_blocks() if spec is not None else None
            size, examples = parameter_count(model), self.summary.examples
            self.first = FirstFailure(now, now - self.start, examples, blocks, size)
        error = failure(self.name, model, example_inputs, outcome, self.first)
        raise error  # one raise site: hypothesis shrinks every failure as the same bug

    def fails(self, spec: ModelSpec, example_inputs) -> Outcome | None:
        """How the model `spec` fails, or None (also for a spec that is not a valid model)."""
        try:
            model = build(spec)
            outcome = run_example(
                self.run_pass, model, example_inputs, self.rtol, self.atol, CheckSummary("")
            )
        except Exception:
            return None
        return None if outcome is SKIP else outcome

    def minimized(self, error: PassCheckError) -> PassCheckError:
        """`error`, for the spec hypothesis shrank further by `minimize`."""
        if error.spec is None:
            return error
        seconds = self.shrink_seconds / 2
        spec, example_inputs = minimize(error.spec, error.inputs, self.fails, seconds)
        unchanged = spec == error.spec and example_inputs is error.inputs
        outcome = None if unchanged else self.fails(spec, example_inputs)
        if outcome is None:
            return error
        return failure(self.name, build(spec), example_inputs, outcome, self.first)


def draw_case(data, strategy) -> tuple[nn.Module, tuple]:
    """A model and its inputs, from a strategy of specs, models or (model, inputs, ...)."""
    value = data.draw(specs() if strategy is None else strategy, label="model")
    if isinstance(value, ModelSpec):
        return build(value), data.draw(inputs_for(value), label="inputs")
    if isinstance(value, nn.Module):
        return value, data.draw(inputs(value), label="inputs")
    model, example_inputs = value[0], value[1]
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return model, tuple(example_inputs) if type(example_inputs) is list else example_inputs


def failure(name: str, model, example_inputs, outcome: Outcome, first) -> PassCheckError:
    spec = getattr(model, "fxopt_spec", None)
    message, script = failure_message(name, model, example_inputs, outcome, first)
    error = PassCheckError(message)
    error.first, error.spec, error.inputs = first, spec, example_inputs
    error.blocks = spec.count_blocks() if spec is not None else None
    error.parameters, error.script = parameter_count(model), script
    return error
