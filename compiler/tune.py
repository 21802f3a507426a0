"""`tune`: search schedules for a model's kernels with TVM's MetaSchedule, for later builds.

The model is lowered as `fxopt.codegen.lower` lowers it, up to FuseTIR (optimized first as
`fxopt.compile` does, unless it is already an fx graph), with static shapes:
tuning measures kernels, so every shape must be known (a symbolic batch is tuned at the example's
batch). MetaSchedule then searches schedules for every fused function within one global budget
of measured trials, times fxopt's own schedule of every function the same way, and keeps the
best in a JSON database in `work_dir` (`fxopt.codegen.tuning_db`). A build given that directory
(`fxopt.compile(..., tuning_db=DIR)`, `fxopt.optimize(..., backend="tvm", tuning_db=DIR)`) uses a
tuned schedule for every function the database holds at that shape and target when it beat
fxopt's own, and fxopt's schedules for the rest.

Candidates are built and timed in this process (MetaSchedule's default builder and runner need
worker processes and the cloudpickle and psutil packages), one at a time, and a candidate has no
time limit. The search samples the default design space afresh for every trial ("replay-func"):
TVM 0.27 crashes in the trace-mutating strategies (evolutionary, replay-trace) and in the
compute-location and parallel mutators on this build.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

from .api import optimize
from .codegen import block_converters, schedules
from .codegen import tvm_api as tv
from .codegen.lower import export, import_program
from .codegen.tuning_db import save_records
from .ir.errors import InputError, UnsupportedError, first_line
from .ir.export import as_tuple, batch_size
from .pipeline import DEFAULT_PIPELINE
from .progress import Progress, table
from .remote import Remote
from .remote import parse as parse_rpc

DEFAULT_TRIALS = 64
EVALUATOR_REPEATS = 3  # timings per candidate (each at least MIN_REPEAT_MS long)
MIN_REPEAT_MS = 20


@dataclass
class TaskResult:
    """One tuned function: its name, how often the model calls it, the trials it got, the best
    measured latency (None when no candidate ran) and the latency of fxopt's own schedule."""

    name: str
    weight: int
    trials: int = 0
    best_seconds: float | None = None
    fxopt_seconds: float | None = None  # fxopt's own schedule of the function, same timing

    @property
    def tuned_wins(self) -> bool:
        """Whether builds will use the tuned schedule (it beat fxopt's, or fxopt has none)."""
        if self.best_seconds is None:
            return False
        return self.fxopt_seconds is None or self.best_seconds < self.fxopt_seconds


@dataclass
class TuneSummary:
    """What `tune` did: the tasks with their best latencies, the trials run, the time taken."""

    target: str
    work_dir: Path
    tasks: list[TaskResult]
    trials: int
    budget: int
    seconds: float
    batch: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Tasks with at least one measured candidate (a record in the database)."""
        return sum(task.best_seconds is not None for task in self.tasks)

    def __str__(self) -> str:
        rows = [
            [
                task.name,
                task.weight,
                task.trials,
                _ms(task.best_seconds),
                _ms(task.fxopt_seconds),
                "tuned" if task.tuned_wins else "fxopt",
            ]
            for task in self.tasks
        ]
        wins = sum(task.tuned_wins for task in self.tasks)
        headers = ["function", "calls", "trials", "best ms", "fxopt ms", "builds use"]
        lines = [
            f"tuned {len(self.tasks)} functions for {self.target}: {self.trials} of {self.budget} "
            f"trials in {self.seconds:.1f} s; database in {self.work_dir}",
            f"builds will use {wins} tuned schedules (those faster than fxopt's own)",
            *table(headers, rows, right=(1, 2, 3, 4)),
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.4f}"


def tune(
    gm_or_model,
    example_inputs,
    target="llvm",
    work_dir="fxopt_tuning",
    trials: int = DEFAULT_TRIALS,
    progress: bool = True,
    rpc: str | None = None,
) -> TuneSummary:
    """Tune the kernels of a model with MetaSchedule and store the best schedules in `work_dir`.

    Parameters
    ----------
    gm_or_model : nn.Module or fx.GraphModule
        A model (optimized first as `fxopt.compile` does: the default pipeline, then
        fuse_blocks) or an optimized ATen graph to tune as it is.
    example_inputs : Tensor or tuple
        Arguments as in ``model(*example_inputs)``; their shapes are the shapes tuned.
    target : str, dict or tvm.target.Target
        As in `fxopt.compile`; tuning measures on this machine, so "llvm" (this CPU), or a GPU
        target when a GPU of that kind is here, unless `rpc` names the device.
    work_dir : str or Path
        Directory for the JSON database (created; an existing database there is extended).
    trials : int
        Measured candidates in total, shared out among the functions by MetaSchedule in rounds
        of ``trials // functions`` (at least 1, at most 64) per function; the last round may
        run past the budget by less than a round.
    progress : bool
        Show the trials done and the best latencies so far on stderr.
    rpc : str, optional
        ``"TRACKER_HOST:PORT:KEY"``: measure every candidate (and fxopt's own schedules) on a
        device registered with that TVM RPC tracker instead of here (`fxopt.remote`); give
        the `target` of that device. Candidates are still compiled here.

    Returns
    -------
    TuneSummary
        Per function the trials and best latency; ``str()`` of it is a table.
    """
    if trials < 1:
        raise InputError(f"trials must be at least 1, got {trials}")
    start = time.perf_counter()
    inputs = as_tuple(example_inputs)
    tvm_target = tv.make_target(target)
    remote = parse_rpc(rpc)
    _check_can_measure(tvm_target, remote)
    if remote is not None:
        remote.connect()  # UnsupportedError now, not a failed measurement per candidate
    notes = []
    gm = gm_or_model
    if not isinstance(gm, fx.GraphModule):
        gm = _optimized_graph(gm, inputs)
    batch = batch_size(inputs)
    if batch is not None:
        notes.append(
            f"tuned at batch {batch} (static shapes); builds at other batch sizes and builds "
            "with a symbolic batch do not use these schedules"
        )
    exported, _, export_notes = export(gm, inputs, dynamic_batch=False)
    notes += export_notes
    mod = tv.run_passes(import_program(exported), tv.legalize_and_fuse_passes(), tvm_target)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = _search(mod, tvm_target, work_dir, trials, Progress(progress), remote)
    if remote is not None:
        notes.append(
            f"measured on the device under key {remote.key!r} at {remote.host}:{remote.port}"
        )
    return TuneSummary(
        target=str(tvm_target.kind.name),
        work_dir=work_dir,
        tasks=tasks,
        trials=sum(task.trials for task in tasks),
        budget=trials,
        seconds=time.perf_counter() - start,
        batch=batch,
        notes=notes,
    )


def _optimized_graph(model, inputs: tuple) -> fx.GraphModule:
    """The ATen graph `fxopt.compile` builds for `model`, with a static batch."""
    passes = [*DEFAULT_PIPELINE, "fuse_blocks"]  # as fxopt.compile and optimize(backend="tvm")
    optimized = optimize(model, inputs, passes=passes, dynamic_batch=False)
    if optimized.report.capture != "torch.export":
        raise UnsupportedError(
            f"tuning needs one whole-model graph, but torch.export could not capture "
            f"{type(model).__name__}; fxopt.optimize runs it without TVM"
        )
    return optimized.graph_module


def _check_can_measure(target, remote: Remote | None) -> None:
    import torch

    kind = target.kind.name
    if kind == "cuda" and remote is None and not torch.cuda.is_available():
        raise UnsupportedError(
            "tuning for cuda measures kernels on a GPU, and there is none here; tune on a "
            "machine with one, or tune for llvm"
        )
    if kind not in ("llvm", "cuda"):
        raise UnsupportedError(f"fxopt tunes for llvm and cuda, not {kind}")


def _search(
    mod, target, work_dir: Path, trials: int, progress: Progress, remote: Remote | None
) -> list[TaskResult]:
    """Run MetaSchedule on the fused functions of `mod`, measuring here or on `remote`; add the
    best schedules to the database in `work_dir`; the tasks with their results."""
    ms = tv.meta_schedule()
    cores = tv.cpu_cores()
    tuning_target = tv.tvm.target.Target({**target.export(), "num-cores": cores})
    extracted = ms.relax_integration.extract_tasks(mod, tuning_target)
    if not extracted:
        raise UnsupportedError("the model has no TVM functions to tune")
    results = [TaskResult(task.task_name, int(task.weight)) for task in extracted]
    database = ms.database.MemoryDatabase()
    callbacks = [
        ms.measure_callback.AddToDatabase(),
        ms.measure_callback.UpdateCostModel(),
        _progress_callback(ms, results, trials, progress),
    ]
    try:
        with _quiet_meta_schedule_logs(), _without_tensor_intrinsics(target):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted,
                work_dir=str(work_dir),
                space=_space(ms, target.kind.name),
                strategy="replay-func",
                num_threads=cores,
            )
            builder, runner = _in_process_builder_and_runner(ms, target, remote)
            ms.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work_dir),
                max_trials_global=trials,
                num_trials_per_iter=_trials_per_round(trials, len(extracted)),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=_cost_model(),
                measure_callbacks=callbacks,
            )
    finally:
        progress.close()
    baselines = {}
    with _without_tensor_intrinsics(target):
        for task, result in zip(extracted, results, strict=True):
            workload = task.dispatched[0]
            result.fxopt_seconds = _fxopt_seconds(ms, workload, target, remote)
            baselines[tv.workload_key(workload)] = result.fxopt_seconds
    save_records(work_dir, target, database.get_all_tuning_records(), baselines)
    return results


def _fxopt_seconds(ms, workload, target, remote: Remote | None) -> float | None:
    """The latency of `workload` as builds schedule it without a database (fxopt's schedules,
    dlight on GPU), timed like a tuning candidate; None when it cannot be built or run."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    try:
        with target:
            mod = schedules.apply(block_converters.schedule(workload, target), target)
        if tv.is_gpu(target):
            mod = tv.run_passes(mod, [tv.gpu_default_schedule()], target)
        module = default_build(mod, target, None)
        info = tuple(arg.as_json() for arg in ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        costs = _measure(module, target.kind.name, info, _evaluator_config(ms), remote)
    except Exception:  # noqa: BLE001 - no baseline: the tuned schedule is used
        return None
    return sum(costs) / len(costs) if costs else None


def _measure(module, device_type: str, info, config, remote: Remote | None) -> list[float]:
    """Seconds per run of a compiled kernel on random arguments, here or on `remote`."""
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    if remote is not None:
        return remote.time(module, device_type, info, config)
    device = tv.device_for(device_type)
    args = default_alloc_argument(device, info, 1)
    return [float(c) for c in run_evaluator_common(module, device, config, args)]


def _evaluator_config(ms):
    return ms.runner.EvaluatorConfig(
        number=1, repeat=EVALUATOR_REPEATS, min_repeat_ms=MIN_REPEAT_MS
    )


def _trials_per_round(trials: int, tasks: int) -> int:
    """Candidates measured per round of a task: small enough that every task gets a round
    before the budget runs out (the scheduler visits each task once first), at most 64."""
    return max(1, min(64, trials // max(1, tasks)))


@contextmanager
def _quiet_meta_schedule_logs():
    """MetaSchedule logs every round to stdout at its logger's level, which its own set-up
    raises to DEBUG after the first run: keep it at WARNING while tuning (the full log is
    written under `work_dir`/logs). Its set-up also fails on a handler without a name (pytest's
    log capture adds such handlers), so those are taken off for the run and put back."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level, unnamed = logger.level, [h for h in logger.handlers if h.get_name() is None]
    logger.setLevel(logging.WARNING)
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in unnamed:
            logger.addHandler(handler)


@contextmanager
def _without_tensor_intrinsics(target):
    """On llvm, skip the import of `tvm.s_tir.tensor_intrin` that every TuneContext does: it
    parses some 250 TVMScript intrinsics (about 30 s on a small CPU), and the default llvm rules
    use none of them. The placeholder is removed afterwards, so a later import is the real one."""
    name = "tvm.s_tir.tensor_intrin"
    if target.kind.name != "llvm" or name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def _space(ms, kind: str):
    """MetaSchedule's default search space for `kind`, without the mutators of compute
    location and parallel extent: initializing those crashes TVM 0.27 (segfault)."""
    broken = ("MutateComputeLocation", "MutateParallel")
    mutators = {
        mutator: probability
        for mutator, probability in ms.Mutator.create(kind).items()
        if type(mutator).__name__ not in broken
    }
    return ms.space_generator.PostOrderApply(sch_rules=kind, postprocs=kind, mutator_probs=mutators)


def _cost_model() -> str:
    """XGBoost's model when xgboost is installed, else random ranking (search still measures)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _in_process_builder_and_runner(ms, target, remote: Remote | None = None):
    """A MetaSchedule builder and runner that compile candidates in this process and time them
    here or on `remote`."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    built: dict[str, object] = {}
    names = (f"fxopt-candidate-{i}" for i in itertools.count())
    config = _evaluator_config(ms)

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    name = next(names)
                    built[name] = default_build(item.mod, item.target, None)
                    results.append(ms.builder.BuilderResult(name, None))
                except Exception as error:  # noqa: BLE001 - a failed candidate is a result
                    results.append(ms.builder.BuilderResult(None, first_line(error)))
            return results

    @derived_object
    class InProcessRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                module = built.pop(str(item.artifact_path), None)
                try:
                    info = tuple(arg.as_json() for arg in item.args_info)
                    costs = _measure(module, str(item.device_type), info, config, remote)
                    futures.append(LocalRunnerFuture(res=costs))
                except Exception as error:  # noqa: BLE001 - a failed candidate is a result
                    futures.append(LocalRunnerFuture(error_message=first_line(error)))
            return futures

    return InProcessBuilder(), InProcessRunner()


def _progress_callback(ms, results: list[TaskResult], budget: int, progress: Progress):
    """A measure callback that counts trials, keeps each task's best latency and shows them."""
    from tvm.ir.utils import derived_object

    @derived_object
    class ShowProgress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            task = results[task_id]
            task.trials += len(candidates)
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    seconds = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                    if task.best_seconds is None or seconds < task.best_seconds:
                        task.best_seconds = seconds
            done = sum(t.trials for t in results)
            measured = [t for t in results if t.best_seconds is not None]
            total = sum(t.weight * t.best_seconds for t in measured)
            progress.show(
                f"tuning: {done}/{budget} trials, {len(measured)}/{len(results)} functions "
                f"measured, best sum {total * 1e3:.3f} ms; {task.name}: "
                + ("-" if task.best_seconds is None else f"{task.best_seconds * 1e3:.4f} ms")
            )

    return ShowProgress()
