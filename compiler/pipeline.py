"""The default pipeline, the loop that runs passes with verification and rollback, and
`optimize_graph`, which runs it on a captured graph for `optimize` and the Dynamo backend alike."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils import _pytree as pytree

from . import passes as builtin_passes  # noqa: F401  (importing it registers them)
from .analysis import cost
from .checkpoint import checkpoint, restore, written_in_place
from .ir.errors import InputError, VerificationError
from .ir.graph import clean
from .precision import Float64Reference
from .report import PassRecord, Report
from .rules.approximate import ApproximateResult  # noqa: F401  (its old home)
from .rules.registry import get_pass, settings_for
from .rules.rewrite import PassResult
from .verify import check_against, input_sets, outputs

log = logging.getLogger("fxopt")

DEFAULT_PIPELINE = (
    "remove_noops",  # dropout, identity, clone and no-op views hide patterns from later passes
    "fold_constants",  # weights computed from weights become plain constants
    "fold_conv_bn",  # eval batch norm after a conv becomes the conv's weight and bias
    "fold_linear_bn",  # the same for linear layers, on either side
    "fold_bn_into_next",  # a norm before a 1x1 or unpadded conv moves into that conv
    "merge_parallel_convs",  # a sum of linear branches of one input is one conv (RepVGG family)
    "merge_sequential_convs",  # conv -> conv, linear -> linear, adapters: one op, if not costlier
    "merge_conv_into_linear",  # conv branches on a fixed H x W input join the FC (RepMLP)
    "fold_channel_affine",  # layer scale and x*a+b after conv/linear join the weights
    "merge_channel_branches",  # split -> depthwise convs -> cat: one depthwise conv, if cheaper
    "split_channel_kernels",  # and back: channels with small kernels as smaller convs, if cheaper
    "swap_subpixel_conv",  # conv_transpose(stride r) <=> conv -> pixel_shuffle(r), the cheaper
    "fuse_horizontal",  # sibling linears/convs on one input become one wider op (q, k, v)
    "sparsify_dilated_kernels",  # a kernel that is zero off a grid: the smaller dilated conv
    "split_separable_kernels",  # a low-rank kh x kw conv: 1 x kw then kh x 1, if cheaper
    "canonicalize_attention",  # hand-written softmax(q kT s + mask) v: one SDPA call
    "reassociate_linear_attention",  # softmax-free (QK^T)V: Q(K^T V), chunked if causal, if cheaper
    "remove_noops",  # folding leaves inverse transposes and dead copies next to each other
)


def resolve(passes: Sequence[str] | None, approximate: bool) -> list[str]:
    """Pass names to run: the default pipeline or the user's list (or one name), exactness
    checked."""
    if isinstance(passes, str) or hasattr(passes, "pass_name"):
        passes = [passes]  # one pass: "fold_conv_bn", not the letters of its name
    elif passes is not None and not isinstance(passes, Sequence | Iterator):
        raise InputError(
            f"passes= takes a list of pass names in order (or one name), not "
            f"{type(passes).__name__}; fxopt.list_passes() names them"
        )
    names = list(DEFAULT_PIPELINE if passes is None else passes)
    for name in names:
        info = get_pass(name if isinstance(name, str) else getattr(name, "pass_name", ""))
        if not info.exact and not approximate:
            raise InputError(
                f"pass {info.name!r} is approximate (its result is not output-equivalent); "
                "pass approximate=True to run it"
            )
    return [n if isinstance(n, str) else n.pass_name for n in names]


# An approximate pass is rolled back when its relative L2 error on any verification input set
# exceeds this: 1.0 is no better than returning zeros, so only a broken rewrite trips it by
# default. Pass a lower one per call (``optimize(..., approximate_max_error=0.05)``) to keep
# only approximations you accept.
DEFAULT_APPROXIMATE_MAX_ERROR = 1.0


@dataclass(frozen=True)
class PassPlan:
    """What one call runs: pass names in order, each one's settings (pass name -> its settings
    object; the rest use their defaults) and the limit on an approximate pass's error."""

    names: tuple[str, ...]
    settings: Mapping[str, object] = field(default_factory=dict)
    approximate_max_error: float = DEFAULT_APPROXIMATE_MAX_ERROR


def plan(
    passes: Sequence[str] | None = None,
    approximate: bool = False,
    options: Mapping[str, object] | None = None,
    approximate_max_error: float = DEFAULT_APPROXIMATE_MAX_ERROR,
) -> PassPlan:
    """The `PassPlan` of one call, every argument checked (InputError saying what is wrong).

    `options` maps a pass name to its settings: a dict of setting names to values, or the
    pass's settings object (``{"lowrank_linear": {"energy": 0.99}}``); a pass must be among
    those the call runs."""
    names = resolve(passes, approximate)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InputError(
            f"options= takes a dict from pass name to its settings, not {type(options).__name__}"
        )
    for name in options:
        get_pass(name)  # InputError naming the registered passes
        if name not in names:
            raise InputError(
                f"options for pass {name!r}, which this call does not run; add it to passes= "
                f"(running: {', '.join(names)})"
            )
    settings = {name: settings_for(name, given) for name, given in options.items()}
    limit = approximate_max_error
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
        raise InputError(f"approximate_max_error must be a number above 0, got {limit!r}")
    return PassPlan(tuple(names), settings, float(limit))


def run_passes(
    gm: fx.GraphModule,
    names: Sequence[str],
    inputs: Sequence[tuple],
    report: Report,
    verify: bool = True,
    approximate_max_error: float = DEFAULT_APPROXIMATE_MAX_ERROR,
    expected: list | None = None,
    reference: Float64Reference | None = None,
    settings: Mapping[str, object] | None = None,
) -> fx.GraphModule:
    """Run each pass on `gm`; with `verify`, check it against the graph before it on `inputs`
    and roll it back when it fails. Returns the final graph module.

    The graph's outputs on `inputs` are computed once, before any pass runs (or given as
    `expected`, from `fxopt.verify.outputs`), and copied, so no pass can reach them; a pass that
    changes the graph is checked against the outputs of the graph before it, which the new
    graph's outputs then replace. A pass that reports no change is not run on the inputs; one
    that wrote into a tensor the graph before it reads raises VerificationError, since no
    rollback can undo that.

    An exact pass that misses the float32 tolerance is judged once more in float64 against the
    graph before any pass (`reference`, made from `gm` when not given; see fxopt.precision): it
    is kept when the miss is float32 rounding no worse than the original graph's own.

    An exact pass fails when it exceeds the floating-point tolerance. An approximate pass
    (``exact=False``) is not held to that tolerance: its error on the example inputs
    (``inputs[0]``) and on the other input sets is measured and recorded (max abs, relative
    L2), and it is rolled back only when the relative L2 error exceeds `approximate_max_error`
    or its output is not finite.

    `settings` maps a pass name to its settings object (checked ones: see `plan`); the other
    passes run with their defaults."""
    limit, settings = approximate_max_error, settings or {}
    if verify and expected is None:
        expected = outputs(gm, inputs)
    if verify and reference is None:
        reference = Float64Reference(gm)
    records, saved = [], None
    for name in names:
        record = PassRecord(name, "no change", exact=get_pass(name).exact)
        if verify and saved is None:  # a pass that changes nothing leaves the checkpoint valid
            start = time.perf_counter()
            saved = checkpoint(gm)
            record.verify_seconds = time.perf_counter() - start
        before = gm
        gm, expected = _run_pass(
            gm, record, inputs, expected, saved, limit, reference, settings.get(name)
        )
        if record.status != "no change" or gm is not before:  # changed, or `saved` restored
            saved = None
        records.append(record)
    report.add_run(records)
    seconds = report.seconds
    seconds["rewrite"] = seconds.get("rewrite", 0.0) + sum(r.seconds for r in records)
    seconds["verify"] = seconds.get("verify", 0.0) + sum(r.verify_seconds for r in records)
    return gm


def _run_pass(
    gm: fx.GraphModule, record: PassRecord, inputs, expected, saved, limit, reference, settings
):
    """Run one pass with `settings` (None: its defaults), filling `record`; verify it and roll
    it back to `saved` (a checkpoint of `gm`) unless `saved` is None. Returns the graph and the
    outputs the next pass is checked against."""
    info, original, written = get_pass(record.name), gm, None
    start, checking = time.perf_counter(), 0.0
    try:
        result = info.run(gm, settings)
        written = written_in_place(saved) if saved is not None else []
        gm = clean(result.graph_module) if result.modified else result.graph_module
        _describe(record, result)
        if written:  # the graph before it, and the float64 reference, read those tensors too
            change = "changed the graph and" if result.modified else "reports no change but"
            raise VerificationError(f"it {change} wrote into {_names(written)}")
        if saved is not None and result.modified:
            verified = time.perf_counter()
            expected = _verify(record, info.exact, gm, expected, inputs, limit, reference)
            checking += time.perf_counter() - verified
    except Exception as error:  # a failing pass is rolled back, never fatal
        record.status = "rolled back" if isinstance(error, VerificationError) else "failed"
        record.message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        log.warning("fxopt: pass %s %s: %s", record.name, record.status, record.message)
        if saved is None:
            raise
        rollback = time.perf_counter()
        _check_restorable(record, written_in_place(saved) if written is None else written)
        gm = restore(original, saved)
        checking += time.perf_counter() - rollback
    record.seconds = time.perf_counter() - start - checking
    record.verify_seconds += checking
    return gm, expected


def _describe(record: PassRecord, result: PassResult) -> None:
    record.applied = {k: v for k, v in result.applied.items() if v}
    declined = getattr(result, "declined", None) or {}
    record.declined = {rule: list(misses) for rule, misses in declined.items() if misses}
    record.summary = dict(getattr(result, "summary", None) or {})
    record.status = "applied" if result.modified else "no change"


def _verify(record: PassRecord, exact: bool, gm, expected: list, inputs, limit, reference) -> list:
    """Check `gm` against the outputs of the graph before the pass; return `gm`'s outputs."""
    if exact:
        try:
            record.max_error, found = check_against(expected, gm, inputs)
        except VerificationError as error:
            found = outputs(gm, inputs)
            record.message = str(_arbitrate(error, reference, gm, found, inputs))
            record.max_error = max(e["max_abs"] for e in _errors(expected, found).values())
        return found
    found = outputs(gm, inputs)
    record.error = _errors(expected, found)
    record.max_error = max(e["max_abs"] for e in record.error.values())
    _check_limit(record.error, limit)
    return found


def _arbitrate(error: VerificationError, reference, gm, found: list, inputs, ref32=None):
    """The float64 verdict on a float32 miss (a Rounding, or a sentence when the graph is within
    the float32 bound of `reference` after all), or `error` with the verdict added."""
    if reference is None:
        raise error
    try:
        verdict = reference.check(gm, found, inputs, ref32)
    except VerificationError as verdict:
        raise VerificationError(f"{error}; float64 check: {verdict}") from None
    except Exception as crash:  # a graph that cannot run in float64 has no verdict
        raise VerificationError(f"{error} (no float64 check: {crash})") from None
    return verdict or "within the float32 bound of the graph before any pass"


def _check_restorable(record: PassRecord, written: list[str]) -> None:
    if written:
        raise VerificationError(
            f"pass {record.name} failed ({record.message}) after writing into "
            f"{_names(written)} in place; the graph before it reads the same tensors, so it "
            "cannot be rolled back. A pass must leave the tensors it reads unchanged and add "
            "new ones (fxopt.graph.add_constant)"
        )


def _names(written: list[str]) -> str:
    more = f" and {len(written) - 3} more" if len(written) > 3 else ""
    return ", ".join(written[:3]) + more


def approximation_error(
    reference: Callable, candidate: Callable, inputs: Sequence[tuple]
) -> dict[str, dict[str, float]]:
    """Max abs and relative L2 error of `candidate` against `reference`: on ``inputs[0]`` (the
    example) and the worst over the remaining sets ("random"). Raises VerificationError when an
    output is not finite or its structure differs."""
    return _errors(outputs(reference, inputs), outputs(candidate, inputs))


def _errors(expected: list, actual: list) -> dict[str, dict[str, float]]:
    errors: dict[str, dict[str, float]] = {}
    for i, (reference, found) in enumerate(zip(expected, actual, strict=True)):
        key = "example" if i == 0 else "random"
        error = output_error(reference, found)
        old = errors.get(key, {"max_abs": 0.0, "rel_l2": 0.0})
        errors[key] = {k: max(old[k], error[k]) for k in old}
    return errors


def output_error(expected, actual) -> dict[str, float]:
    """Max abs and relative L2 (||a - b|| / ||a|| over every output tensor) of two outputs."""
    ref_leaves, ref_spec = pytree.tree_flatten(expected)
    leaves, spec = pytree.tree_flatten(actual)
    if ref_spec != spec:
        raise VerificationError(f"output structure differs: {ref_spec} vs {spec}")
    worst, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for i, (a, b) in enumerate(zip(ref_leaves, leaves, strict=True)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise VerificationError(f"output {i}: expected shape {tuple(a.shape)}")
        a, b = a.detach().double(), b.detach().to(a.device).double()
        if not torch.isfinite(b).all():
            raise VerificationError(f"output {i}: the approximate model's output has NaN or Inf")
        if a.numel():
            worst = max(worst, (a - b).abs().max().item())
            diff_sq += (a - b).square().sum().item()
            ref_sq += a.square().sum().item()
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return {"max_abs": worst, "rel_l2": rel}


def _check_limit(errors: dict[str, dict[str, float]], limit: float) -> None:
    for key, error in errors.items():
        if error["rel_l2"] > limit:
            raise VerificationError(
                f"relative L2 error {error['rel_l2']:.3g} on the {key} inputs exceeds the "
                f"approximate-pass limit {limit:g}; loosen the pass's budget (options=), or raise "
                "approximate_max_error= to keep it"
            )


def final_error(
    reference,
    candidate: Callable,
    inputs: Sequence[tuple],
    report: Report,
    float64: tuple[Float64Reference, fx.GraphModule] | None = None,
):
    """The end-to-end check of the optimized model against eager (`reference`, or its outputs
    from `fxopt.verify.outputs`): exact (raises on a mismatch) unless an approximate pass was
    applied; then the worst max abs error, with the relative L2 error noted in the report.

    With `float64` (the captured graph's Float64Reference and the optimized ATen graph), an
    exact miss is judged in float64 as the pipeline judges a pass, and a float32 rounding
    verdict is noted in the report."""
    expected = reference if isinstance(reference, list) else outputs(reference, inputs)
    if all(p.exact or p.status != "applied" for p in report.passes):
        try:
            return check_against(expected, candidate, inputs)[0]
        except VerificationError as error:
            if float64 is None:
                raise
            found = outputs(candidate, inputs)
            rounding = _arbitrate(error, float64[0], float64[1], found, inputs, expected)
            report.notes.append(f"end-to-end check passed in float64: {rounding}")
            return max(e["max_abs"] for e in _errors(expected, found).values())
    errors = _errors(expected, outputs(candidate, inputs))
    rel = max(e["rel_l2"] for e in errors.values())
    report.notes.append(f"approximate passes applied: end-to-end relative L2 error {rel:.2e}")
    return max(e["max_abs"] for e in errors.values())


def optimize_graph(
    gm: fx.GraphModule,
    inputs: tuple,
    steps: PassPlan,
    verify: bool,
    report: Report,
    other: int | None,
    reference: Float64Reference | None = None,
) -> fx.GraphModule:
    """Run the passes of `steps` on a captured graph, filling the report's statistics and times:
    "stats" (op counts and FLOPs before and after), "reference" (the captured graph's outputs
    on the verification inputs), "rewrite" and "verify" (the passes' own time, and checking
    them)."""
    t = time.perf_counter()
    report.before = _merge_stats(report.before, cost.stats(gm, inputs))
    _add_seconds(report, "stats", t)
    t = time.perf_counter()
    sets = input_sets(inputs, n_random=2, other_batch=other) if verify else []
    expected = outputs(gm, sets) if verify else None
    _add_seconds(report, "reference", t)
    gm = run_passes(
        gm,
        steps.names,
        sets,
        report,
        verify,
        steps.approximate_max_error,
        expected=expected,
        reference=reference,
        settings=steps.settings,
    )
    t = time.perf_counter()
    report.after = _merge_stats(report.after, cost.stats(gm, inputs))
    _add_seconds(report, "stats", t)
    return gm


def _add_seconds(report: Report, phase: str, since: float) -> None:
    report.seconds[phase] = report.seconds.get(phase, 0.0) + time.perf_counter() - since


def _merge_stats(old: cost.Stats | None, new: cost.Stats) -> cost.Stats:
    if old is None:
        return new
    counts = dict(old.op_counts)
    for op, n in new.op_counts.items():
        counts[op] = counts.get(op, 0) + n
    return cost.Stats(dict(sorted(counts.items())), old.params + new.params, old.flops + new.flops)
