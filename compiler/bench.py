"""`fxopt bench`: how fast a zoo model runs as eager PyTorch, after fxopt, under
`torch.compile` and through fxopt's TVM build, measured in one process, on the CPU or a GPU.

Every candidate is built, then warmed up, then timed call by call in turns (eager, optimized,
inductor, eager, optimized, ...), so that noise from the machine hits all of them alike. The
median is reported, with the speed-up versus eager. Speed is measured here, never asserted in a
test.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import models as zoo
from .api import optimize
from .deploy import compile_model
from .ir.errors import InputError, first_line
from .progress import Progress, table
from .remote import Remote
from .remote import parse as parse_rpc

Builder = Callable[[str, nn.Module, tuple], Callable]

# candidate -> how to build it from (model name, train-form model in eval mode, example inputs)
BUILDERS: dict[str, Builder] = {
    "eager": lambda name, model, inputs: model,
    "optimized": lambda name, model, inputs: optimize(model, inputs),
    # The baseline torch offers: torch.compile of the original model.
    "inductor": lambda name, model, inputs: torch.compile(model),
    "optimized+inductor": lambda name, model, inputs: optimize(model, inputs, backend="inductor"),
    # fxopt's rewrites lowered through TVM to generated code for where the inputs live.
    "tvm": lambda name, model, inputs: optimize(model, inputs, backend="tvm"),
    # The hand-written deploy form, with the same weights as the train form.
    "deploy": lambda name, model, inputs: zoo.create(name, deploy=True),
}
CANDIDATES = tuple(BUILDERS)
REPEATS, WARMUP = 30, 3


@dataclass
class Row:
    """One candidate of one model. Times are per call, in milliseconds."""

    model: str
    candidate: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = None  # eager median / this median: > 1 is faster than eager
    peak_mb: float | None = None  # most tensor memory live at once during one call, above start
    build_s: float | None = None  # optimize / compile time, including the first call
    note: str = ""
    # How it was measured, so that a row (or its JSON) stands on its own.
    batch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    repeats: int = 0
    warmup: int = 0


@dataclass
class _Candidate:
    name: str
    fn: Callable | None
    build_s: float | None = None
    note: str = ""
    seconds: list[float] = field(default_factory=list)


def bench(
    models: Sequence[str],
    backends: Sequence[str],
    batch: int = 1,
    threads: int | None = None,
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    progress: bool = True,
    shape: tuple[int, ...] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    rpc: str | None = None,
    target=None,
) -> list[Row]:
    """Time each model's candidates interleaved, after warm-up, on the CPU or a CUDA GPU.

    Parameters
    ----------
    models : list of str
        Zoo model names; each is built in its train form, in eval mode.
    backends : list of str
        Candidates, out of ``CANDIDATES``: "eager" (the model itself), "optimized"
        (``fxopt.optimize``), "inductor" (``torch.compile`` of the original model),
        "optimized+inductor", "tvm" (``fxopt.optimize(..., backend="tvm")``) and "deploy"
        (the zoo's hand-written deploy form). "eager" is always timed, as the baseline of the
        speed-up.
    batch : int
        Batch size of the example inputs.
    threads : int, optional
        ``torch.set_num_threads`` for the run (restored afterwards); None leaves it as it is.
    repeats, warmup : int
        Timed calls and warm-up calls per candidate.
    progress : bool
        Show what is running on stderr.
    shape : tuple of int, optional
        One sample's shape instead of the model's registered input shape (e.g. more tokens).
    device : {"cpu", "cuda"}
        Where the model and inputs live; on "cuda" every call is timed up to
        ``torch.cuda.synchronize()`` and peak memory is the CUDA allocator's.
    dtype : {"float32", "float16", "bfloat16"}
        Precision of the weights and inputs.
    rpc : str, optional
        ``"TRACKER_HOST:PORT:KEY"``: the "tvm" candidate is built here for `target` (``fxopt
        .compile``), and timed on a device registered with that TVM RPC tracker
        (`fxopt.remote`), `warmup` then `repeats` calls; the other candidates run here. Its
        speed-up is left out: eager ran on another machine.
    target : str or dict, optional
        The TVM target of the remote device (default "llvm"); only with `rpc`.

    Returns
    -------
    list of Row
        One row per model and candidate, in the order asked for.
    """
    models = [models] if isinstance(models, str) else list(models)
    backends = [backends] if isinstance(backends, str) else list(backends)
    names = _check(models, backends, batch, threads, repeats, warmup)
    remote = parse_rpc(rpc)
    if target is not None and remote is None:
        raise InputError("target= applies to the remote tvm candidate only; add rpc=")
    setting = _Setting(_device(device), _dtype(dtype), shape, remote, target or "llvm")
    previous = torch.get_num_threads()
    status = Progress(progress)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        rows = [
            row
            for model in models
            for row in _bench_model(model, names, batch, repeats, warmup, status, setting)
        ]
        for row in rows:
            row.batch, row.threads = batch, torch.get_num_threads()
            row.device, row.dtype = setting.device.type, dtype
            row.repeats, row.warmup = repeats, warmup
        return rows
    finally:
        status.close()
        torch.set_num_threads(previous)


def _check(
    models: Sequence[str],
    backends: Sequence[str],
    batch: int,
    threads: int | None,
    repeats: int,
    warmup: int,
) -> list[str]:
    if not models:
        raise InputError("no models to benchmark; name at least one zoo model")
    for name in models:
        try:
            zoo.info(name)
        except ValueError as error:
            raise InputError(str(error)) from None
    unknown = [b for b in backends if b not in BUILDERS]
    if unknown:
        raise InputError(f"unknown candidate {unknown[0]!r}; choose from {', '.join(CANDIDATES)}")
    if batch < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise InputError("batch, repeats and threads must be at least 1, warmup at least 0")
    return list(dict.fromkeys(["eager", *backends]))


@dataclass(frozen=True)
class _Setting:
    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...] | None
    remote: Remote | None = None  # where the "tvm" candidate is timed, if not here
    target: object = "llvm"  # the remote device's TVM target


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda needs a CUDA GPU and a CUDA build of PyTorch; this machine has "
            "neither, so benchmark on the CPU or run on a GPU host"
        )
    return torch.device(name)


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _bench_model(
    name: str,
    candidates: list[str],
    batch: int,
    repeats: int,
    warmup: int,
    status: Progress,
    setting: _Setting,
) -> list[Row]:
    model = zoo.create(name).eval().to(setting.device, setting.dtype)
    try:
        inputs = zoo.example_inputs(name, batch=batch, shape=setting.shape)
    except ValueError as error:
        raise InputError(str(error)) from None
    # Token ids (hf: text models) stay integers; only floating-point inputs take the dtype.
    inputs = tuple(
        t.to(setting.device, setting.dtype) if t.is_floating_point() else t.to(setting.device)
        for t in inputs
    )
    here = [c for c in candidates if not (c == "tvm" and setting.remote is not None)]
    built = [_build(name, c, model, inputs, status) for c in here]
    ready = [c for c in built if c.fn is not None]
    with torch.no_grad():
        for c in ready:
            status.show(f"{name} [{c.name}] warm-up ({warmup} calls)")
            for _ in range(warmup):
                c.fn(*inputs)
        status.show(f"{name}: timing {len(ready)} candidates x {repeats} runs, interleaved")
        for r in range(repeats):
            for c in ready:
                status.show(f"{name} [{c.name}] run {r + 1}/{repeats}", transient=True)
                c.seconds.append(_time_call(c.fn, inputs))
    peaks = {}
    for c in ready:
        if c.name == "tvm":  # TVM allocates through its own runtime, which torch does not see
            continue
        status.show(f"{name} [{c.name}] peak memory")
        peaks[c.name] = peak_memory_bytes(c.fn, inputs)
    if len(here) < len(candidates):
        remote = _remote_tvm(name, model, inputs, setting, status, repeats, warmup)
        built.insert(candidates.index("tvm"), remote)
    rows = _rows(name, built, peaks)
    for row in rows:
        if row.candidate == "tvm" and setting.remote is not None:
            row.speedup = None  # eager ran here, the tvm build on the remote device
    return rows


def _remote_tvm(
    name: str, model, inputs: tuple, setting: _Setting, status: Progress, repeats: int, warmup: int
) -> _Candidate:
    """The "tvm" candidate built here and timed on `setting.remote`."""
    remote = setting.remote
    status.show(f"{name} [tvm] build for {setting.target}, timing on {remote}")
    start = time.perf_counter()
    try:
        artifact = compile_model(model, inputs, setting.target, dynamic_batch=False)
        with tempfile.TemporaryDirectory() as folder:
            library = artifact.export(Path(folder) / "fxopt_bench_model.so")
            build_s = time.perf_counter() - start
            seconds = remote.time_model(library, artifact.target.kind.name, inputs, repeats, warmup)
    except Exception as error:  # a candidate that fails is reported; the others still run
        return _Candidate("tvm", None, note=f"remote build or run failed: {first_line(error, 120)}")
    note = f"timed on the device under key {remote.key!r} at {remote.host}:{remote.port}"
    return _Candidate("tvm", None, build_s, note=note, seconds=seconds)


def _build(
    name: str, candidate: str, model: nn.Module, inputs: tuple, status: Progress
) -> _Candidate:
    status.show(f"{name} [{candidate}] build")
    if candidate == "deploy" and not zoo.info(name).has_deploy:
        return _Candidate(candidate, None, note="skipped: the model has no deploy form")
    start = time.perf_counter()
    try:
        fn = BUILDERS[candidate](name, model, inputs)
        if candidate == "deploy":
            fn = fn.to(inputs[0].device, inputs[0].dtype)
        with torch.no_grad():
            fn(*inputs)  # torch.compile compiles on the first call
            _synchronize(inputs)
    except Exception as error:  # a candidate that fails is reported; the others still run
        message = (str(error).strip().splitlines() or [""])[0][:120]
        return _Candidate(candidate, None, note=f"build failed: {type(error).__name__}: {message}")
    build_s = None if candidate == "eager" else time.perf_counter() - start
    return _Candidate(candidate, fn, build_s)


def _time_call(fn: Callable, inputs: tuple) -> float:
    _synchronize(inputs)
    start = time.perf_counter()
    fn(*inputs)
    _synchronize(inputs)
    return time.perf_counter() - start


def _synchronize(inputs: tuple) -> None:
    """Wait for queued GPU work: a CUDA call returns before its kernels finish."""
    if inputs and inputs[0].is_cuda:
        torch.cuda.synchronize(inputs[0].device)


def _rows(name: str, built: list[_Candidate], peaks: dict[str, int | None]) -> list[Row]:
    medians = {c.name: statistics.median(c.seconds) for c in built if c.seconds}
    eager = medians.get("eager")
    rows = []
    for c in built:
        row = Row(name, c.name, build_s=c.build_s, note=c.note)
        if c.seconds:
            low, high = _spread(c.seconds)
            row.median_ms, row.p10_ms, row.p90_ms = medians[c.name] * 1e3, low * 1e3, high * 1e3
            row.speedup = eager / medians[c.name] if eager else None
            peak = peaks.get(c.name)
            row.peak_mb = None if peak is None else peak / 2**20
        rows.append(row)
    return rows


def _spread(seconds: list[float]) -> tuple[float, float]:
    """10th and 90th percentile."""
    if len(seconds) < 2:
        return seconds[0], seconds[0]
    cuts = statistics.quantiles(seconds, n=10, method="inclusive")
    return cuts[0], cuts[-1]


def peak_memory_bytes(fn: Callable, inputs: tuple) -> int | None:
    """Most tensor memory live at once during one call of `fn`, above what was live before.

    On CUDA inputs this is the CUDA caching allocator's peak (``torch.cuda.max_memory_allocated``
    after a reset) minus what was allocated before the call. Memory TVM allocates through its
    own runtime is not seen by PyTorch's allocators on either device.

    Every allocation and free that goes through PyTorch's CPU allocator (eager kernels and
    Inductor's buffers alike) is recorded by ``torch.profiler(profile_memory=True)``; the peak
    of their running sum is the call's working set, output included. The raw event list is
    not public API, so None ("-" in the table) is returned where it is missing.
    """
    from torch.profiler import ProfilerActivity, profile

    if inputs and inputs[0].is_cuda:
        device = inputs[0].device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn(*inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with torch.no_grad(), _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn(*inputs)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Kineto prints "profiler_start/stop" lines on file descriptor 2, with no switch to turn
    them off; they would break the progress line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as a table, with a header saying how they were measured and what they mean."""
    first = rows[0] if rows else Row("", "")
    lines = [
        f"fxopt bench: batch {first.batch}, {first.dtype}, {first.threads} threads, torch "
        f"{torch.__version__}, {_device_name(first.device)}; {first.repeats} timed calls per "
        f"candidate, interleaved, after {first.warmup} warm-up calls",
        "  speed-up = eager median / candidate median: > 1 is faster than eager, < 1 slower",
        "  peak MB  = most tensor memory live at once during one call (torch.profiler)",
        "  build s  = optimize or compile time, including the first call",
        "",
    ]
    headers = [
        "model",
        "candidate",
        "median ms",
        "p10-p90 ms",
        "speed-up",
        "peak MB",
        "build s",
        "note",
    ]
    cells = [
        [
            r.model,
            r.candidate,
            _number(r.median_ms, ".3f"),
            _spread_text(r),
            _number(r.speedup, ".2f", "x"),
            _number(r.peak_mb, ".2f"),
            _number(r.build_s, ".1f"),
            r.note,
        ]
        for r in rows
    ]
    return "\n".join(lines + table(headers, cells, right=(2, 3, 4, 5, 6)))


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name()})"
    return device.upper()


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _spread_text(row: Row) -> str:
    if row.p10_ms is None or row.p90_ms is None:
        return "-"
    return f"{row.p10_ms:.3f}-{row.p90_ms:.3f}"
