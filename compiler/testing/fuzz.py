"""Differential fuzzing of fxopt itself: random models written with the idioms real code uses
(`fxopt.testing.idioms`), each run end to end through ``fxopt.optimize`` with verification on
and compared with eager PyTorch.

    from fxopt.testing.fuzz import fuzz

    print(fuzz(max_examples=25))  # examples, outcomes, idiom coverage, passes that fired

An example fails, and hypothesis shrinks it (then `simpler_specs`, one idiom or option at a
time), when the optimized model computes other numbers or another output structure than the
eager model (on the example inputs, fresh inputs, and another batch size, which only a static
capture may refuse with InputError), returns an output that aliases an input where eager does
not, writes into its inputs, leaves the caller's model or example tensors changed, or when
``optimize`` rolls a pass back (a pass verification caught being wrong), raises
VerificationError (except to refuse a model whose forward writes a buffer, which must then
keep and report the write under ``verify=False``), or raises an error that is not an
`fxopt.errors` error. Other typed errors (InputError for a documented unsupported case) are
allowed and counted. The failure message holds a script that rebuilds the model and its inputs
and checks them again (`check_model`); `KNOWN_BUGS` lists the idioms kept out of the default
strategy while the bugs they meet are fixed (none today: every switch in `SWITCHES` is drawn).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from .fuzz_check import Checked, Mismatch, check_model
from .fuzz_draw import KINDS, check_kinds, fuzz_specs, simpler_specs
from .fuzz_models import KNOWN_BUGS, FuzzSpec, build, script

__all__ = [
    "KINDS",
    "KNOWN_BUGS",
    "FuzzFailure",
    "FuzzSummary",
    "Mismatch",
    "check_model",
    "fuzz",
]


@dataclass
class FuzzSummary:
    """What a `fuzz` run saw: examples, outcomes (ok, or the typed error's name), idioms
    drawn, pass rules that fired, dynamic-batch captures, Dynamo fallbacks, time."""

    examples: int = 0
    outcomes: Counter = field(default_factory=Counter)
    idioms: Counter = field(default_factory=Counter)
    applied: Counter = field(default_factory=Counter)  # "pass: rule" -> examples it fired on
    dynamic_batch: int = 0
    dynamo_fallback: int = 0
    guarded: int = 0  # calls with other non-tensor arguments that met InputError
    seconds: float = 0.0

    def add(self, idioms: set[str], checked: Checked) -> None:
        self.outcomes[checked.outcome] += 1
        self.idioms.update(idioms)
        self.guarded += checked.guarded
        report = checked.report
        if report is None:
            return
        self.dynamic_batch += report.dynamic_batch
        self.dynamo_fallback += report.capture != "torch.export"
        self.applied.update(f"{p.name}: {rule}" for p in report.passes for rule in p.applied)

    def __str__(self) -> str:
        def listing(counter: Counter) -> str:
            return ", ".join(f"{key} x{n}" for key, n in sorted(counter.items())) or "none"

        return "\n".join(
            [
                f"fuzz: {self.examples} examples in {self.seconds:.1f} s; "
                f"outcomes: {listing(self.outcomes)}",
                f"  dynamic batch {self.dynamic_batch}, Dynamo fallback {self.dynamo_fallback}, "
                f"guarded calls {self.guarded}",
                f"  idioms: {listing(self.idioms)}",
                f"  rules fired: {listing(self.applied)}",
            ]
        )


class FuzzFailure(AssertionError):
    """`fuzz` found a model fxopt gets wrong; `spec` and `script` describe the smallest."""

    spec: FuzzSpec | None = None
    script: str = ""
    kind: str = ""  # what went wrong, without where (`Mismatch.kind`)


def fuzz(
    passes: Sequence[str] | None = None,
    max_examples: int = 25,
    kinds=None,
    known_bugs: Sequence[str] = (),
    depth: int = 4,
    allow_rollback: bool = False,
    seed: int | None = None,
    shrink_seconds: float = 30.0,
    **hypothesis_settings,
) -> FuzzSummary:
    """Optimize random models end to end and compare each with eager PyTorch.

    Parameters
    ----------
    passes : list of str, optional
        Passes to run (default: the default pipeline).
    max_examples : int
        Models to draw.
    kinds : iterable of str, optional
        Idiom kinds to draw from (default: all of `KINDS` but ``counter``).
    known_bugs : iterable of str
        Switches from `KNOWN_BUGS` that add the idioms fxopt is known to get wrong.
    depth : int
        Largest number of idioms in one model.
    allow_rollback : bool
        Accept a pass that verification rolled back (default: a failure).
    seed : int, optional
        Fix hypothesis's random choices.
    shrink_seconds : float
        Stop shrinking a failure after this long.
    **hypothesis_settings :
        Passed on to ``hypothesis.settings`` (e.g. ``database=None``).

    Returns
    -------
    FuzzSummary
        Examples, outcomes, idiom coverage and the pass rules that fired.

    Raises
    ------
    FuzzFailure
        With the smallest failing model as a script, what went wrong and the example's shapes.
    """
    switches = check_kinds(kinds, known_bugs)[1]
    run = Run(passes, "vary_arguments" in switches, allow_rollback, shrink_seconds)
    options = {
        "max_examples": max_examples,
        "deadline": None,
        "report_multiple_bugs": False,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        **hypothesis_settings,
    }

    def example(spec: FuzzSpec) -> None:
        run.example(spec)

    example._hypothesis_internal_add_digest = repr((passes, sorted(known_bugs))).encode()
    test = settings(**options)(given(fuzz_specs(kinds, known_bugs, depth))(example))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    threads, log = torch.get_num_threads(), logging.getLogger("fxopt")
    level = log.level
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    log.setLevel(logging.ERROR)  # rollbacks are failures here, reported with their model
    try:
        test()
    except FuzzFailure as failure:
        raise run.minimized(failure) from None
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)
    run.summary.seconds = time.perf_counter() - run.start
    return run.summary


class Run:
    """One `fuzz` run: outcomes by spec (shrinking never optimizes a model twice), and when
    the first failure came."""

    def __init__(self, passes, vary_arguments: bool, allow_rollback: bool, shrink_seconds):
        self.passes, self.vary_arguments = passes, vary_arguments
        self.allow_rollback, self.shrink_seconds = allow_rollback, shrink_seconds
        self.summary, self.outcomes = FuzzSummary(), {}
        self.start, self.first = time.perf_counter(), None

    def shrinking_ends(self, share: float = 1.0) -> bool:
        return self.first is not None and (
            time.perf_counter() - self.first[0] > self.shrink_seconds * share
        )

    def example(self, spec: FuzzSpec) -> None:
        key = repr(spec)
        if key not in self.outcomes:
            if self.shrinking_ends(0.5):
                return  # hypothesis's share of shrinking is over: only known failures fail
            self.summary.examples += 1
            self.outcomes[key] = self.check(spec, count=True)
        failure = self.outcomes[key]
        if failure is not None:
            raise failure

    def check(self, spec: FuzzSpec, count: bool = False) -> FuzzFailure | None:
        model, make_inputs, idioms = build(spec)
        try:
            checked = check_model(
                model,
                make_inputs,
                spec.batch,
                spec.input_seed,
                self.passes,
                self.vary_arguments,
                self.allow_rollback,
            )
        except Mismatch as mismatch:
            if self.first is None:
                self.first = (time.perf_counter(), self.summary.examples)
            return self.failure(spec, idioms, make_inputs, mismatch)
        if count:
            self.summary.add(idioms, checked)
        return None

    def fails(self, spec: FuzzSpec) -> FuzzFailure | None:
        """How `spec` fails, or None (also when it is not a valid model)."""
        key = repr(spec)
        if key not in self.outcomes:
            try:
                model, make_inputs, _ = build(spec)
                with torch.no_grad():
                    model(*make_inputs(spec.batch, spec.input_seed))
            except Exception:
                return None
            self.outcomes[key] = self.check(spec)
        return self.outcomes[key]

    def minimized(self, error: FuzzFailure) -> FuzzFailure:
        """`error` for the simplest spec that fails the same way, trying one simplification at
        a time (`simpler_specs`) after hypothesis's own shrinking, until the time is up."""
        improved = True
        while improved and not self.shrinking_ends():
            improved = False
            for candidate in simpler_specs(error.spec):
                if self.shrinking_ends():
                    break
                found = self.fails(candidate)
                if found is not None and found.kind == error.kind:
                    error, improved = found, True
                    break
        return error

    def failure(self, spec: FuzzSpec, idioms, make_inputs, mismatch: Mismatch) -> FuzzFailure:
        shapes = ", ".join(_shape(v) for v in make_inputs(spec.batch, spec.input_seed))
        passes = "the default pipeline" if self.passes is None else f"passes={self.passes!r}"
        text = script(spec, self.passes, self.vary_arguments)
        message = "\n".join(
            [
                f"fuzz: {mismatch}",
                f"  idioms: {', '.join(sorted(idioms))}",
                f"  optimize(model, inputs) with {passes}; inputs: ({shapes})",
                f"  first failure after {self.first[1]} examples; "
                f"smallest found: {len(spec.parts)} idioms",
                "  to reproduce, save the script below as repro.py and run python repro.py"
                + ("" if self.passes is None else " (with the passes registered)"),
                "",
                text,
            ]
        )
        error = FuzzFailure(message)
        error.spec, error.script, error.kind = spec, text, mismatch.kind
        return error


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{tuple(value.shape)}"
    return repr(value)
