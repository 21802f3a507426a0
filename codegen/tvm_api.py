"""The one place fxopt imports Apache TVM (pinned: apache-tvm 0.27.0.post1).

TVM's Python API moves between 0.2x releases (targets are JSON dicts, scheduling lives in
`tvm.s_tir`, TIR in `tvm.tirx`), so every other codegen module reaches TVM through this
adapter: `from fxopt.codegen import tvm_api as tv`, then `tv.tvm`, `tv.relax`, `tv.te`,
`tv.tirx`, `tv.s_tir`, `tv.dlight`, `tv.topi`, or the small entry points below. Importing this
module does not import TVM either: TVM is imported on first use, so `import fxopt` and importing any
codegen module stay TVM-free.

With `TVM_USE_RUNTIME_LIB=1` (or a runtime-only install) `import tvm` loads `libtvm_runtime`
alone (`tvm.base` skips `libtvm_compiler`). The compiler packages (`relax`, `s_tir`, ...) are
then unusable, so they are imported on first use: loading and running an exported library
needs only `tvm.runtime`.

Threads: on x86, TVM's CPU thread pool defaults to half the hardware threads (to skip
hyper-threads), which is one thread on a 2-core machine, and no call can raise it past that.
Before TVM is first imported, fxopt sets `TVM_NUM_THREADS` to the CPUs this process may run on,
unless `TVM_NUM_THREADS` or `OMP_NUM_THREADS` is set already; each call of a compiled module
then runs on `torch.get_num_threads()` threads (`use_threads`), as PyTorch would.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import TYPE_CHECKING

import torch

from ..ir.errors import InputError, UnsupportedError

if TYPE_CHECKING:  # imported on first use, see `__getattr__`
    import tvm
    from tvm import relax, runtime, s_tir, te, tirx, topi
    from tvm.s_tir import dlight

__all__ = [
    "check_target",
    "compile_module",
    "device_for",
    "device_kind_of",
    "dlight",
    "export_library",
    "from_torch",
    "gpu_default_schedule",
    "import_exported_program",
    "load_library",
    "make_target",
    "relax",
    "run_passes",
    "runtime",
    "runtime_only",
    "s_tir",
    "source_of",
    "te",
    "tirx",
    "to_torch",
    "topi",
    "tvm",
    "virtual_machine",
]

_LAZY = {
    "tvm": "tvm",
    "runtime": "tvm.runtime",
    "relax": "tvm.relax",
    "s_tir": "tvm.s_tir",
    "te": "tvm.te",
    "tirx": "tvm.tirx",
    "topi": "tvm.topi",
    "dlight": "tvm.s_tir.dlight",
}

CUDA_DEFAULT = {"kind": "cuda", "arch": "sm_90"}


def __getattr__(name: str):
    if name in _LAZY:
        if not {"TVM_NUM_THREADS", "OMP_NUM_THREADS"} & set(os.environ):
            os.environ["TVM_NUM_THREADS"] = str(_usable_cpus())  # before TVM's pool exists
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tvm():
    return __getattr__("tvm")


def _usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def use_threads(count: int) -> int:
    """Run TVM's CPU kernels on `count` threads from now on (at most the pool's size); returns
    the number in use. Cheap when it is already so."""
    runtime = _tvm().runtime
    pool = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    count = max(1, min(count, int(pool))) if pool and pool.isdigit() else max(1, count)
    current = runtime.num_threads()
    if count != current:
        _tvm().get_global_func("runtime.config_threadpool")(1, count)  # 1: TVM's default mode
        current = runtime.num_threads()
    return current


def runtime_only() -> bool:
    """True when only `libtvm_runtime` is loaded: nothing can be compiled, only run."""
    return bool(_tvm().base._RUNTIME_ONLY)


# --- targets -------------------------------------------------------------------------------


def make_target(target) -> tvm.target.Target:
    """A TVM target from "llvm", "cuda", a target dict or a `Target`; InputError otherwise.

    "llvm" means this machine's CPU: TVM 0.27 leaves `mcpu` empty (generic x86-64) unless told,
    so the host CPU LLVM detects is filled in. "cuda" means `CUDA_DEFAULT` (sm_90); building
    for it needs `nvcc`, not a GPU.
    """
    tvm = _tvm()
    if isinstance(target, tvm.target.Target):
        return target
    if runtime_only():
        raise UnsupportedError(
            "only the TVM runtime is loaded (TVM_USE_RUNTIME_LIB=1 or a runtime-only install): "
            "exported libraries load and run, but nothing can be built; unset it to build"
        )
    if target == "llvm":
        target = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    elif target == "cuda":
        target = dict(CUDA_DEFAULT)
    try:
        if not isinstance(target, str | dict):
            raise TypeError(f"{type(target).__name__} is neither a name nor a dict")
        return tvm.target.Target(target)
    except Exception as error:  # TVM raises ValueError, TypeError or its own errors
        raise InputError(
            f"target {target!r} is not a TVM target ({str(error).splitlines()[0][:240]}); a "
            "target is 'llvm' (this CPU), 'cuda', a TVM target kind name such as 'c', or a dict "
            "such as {'kind': 'llvm', 'mcpu': 'znver3'} or {'kind': 'cuda', 'arch': 'sm_80'}"
        ) from None


def check_target(target) -> None:
    """InputError unless `make_target` accepts `target`. Where only the TVM runtime is loaded
    nothing is built, so there is nothing to check."""
    if not runtime_only():
        make_target(target)


def is_gpu(target: tvm.target.Target) -> bool:
    """True for targets whose kernels need thread bindings (cuda, rocm, metal, ...)."""
    return "gpu" in target.keys


def device_for(kind: str, index: int = 0):
    """The TVM device for a target kind name ("llvm" -> cpu, "cuda" -> cuda)."""
    tvm = _tvm()
    return tvm.cpu(index) if kind in ("llvm", "c", "cpu") else tvm.device(kind, index)


# --- import, passes, compile ---------------------------------------------------------------


def import_exported_program(exported, custom_convert_map: dict | None = None):
    """Relax IRModule of a `torch.export.ExportedProgram`; weights become bound constants."""
    from tvm.relax.frontend.torch import from_exported_program

    with warnings.catch_warnings():
        # torch's run_decompositions deep-copies its module call graph, whose tree specs warn
        # about their own deprecated LeafSpec check: torch's internals, nothing a user can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return from_exported_program(
            exported, keep_params_as_input=False, custom_convert_map=custom_convert_map or None
        )


def supported_aten_ops() -> set[str]:
    """ATen op names ("conv2d.default") the torch frontend converts."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return set(ExportedProgramImporter().create_convert_map())


def legalize_and_fuse_passes() -> list:
    """fxopt's lowering sequence before scheduling: library dispatch (sort/scan/sampling),
    legalization to TIR, and operator fusion."""
    relax = __getattr__("relax")
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def gpu_default_schedule():
    """dlight's default GPU rules; they schedule only functions not scheduled yet."""
    dl = __getattr__("dlight")
    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    )


def run_passes(mod, passes: list, target: tvm.target.Target):
    """Run a pass sequence on `mod` with `target` as the current target."""
    with target:
        return _tvm().transform.Sequential(passes)(mod)


def compile_module(mod, target: tvm.target.Target):
    """Compile a legalized, fused and scheduled Relax module to a VM executable.

    `tvm.compile`'s "default" pipeline would, for GPU targets, legalize, fuse and apply dlight
    again; fxopt already did that, so it asks for the generic build pipeline (dispatch and
    LegalizeOps find nothing left to do, then memory planning and VM lowering).
    """
    relax = __getattr__("relax")
    return _tvm().compile(mod, target, relax_pipeline=relax.get_pipeline("default"))


# --- running ----------------------------------------------------------------------------


def virtual_machine(module, device):
    """A Relax VM over an executable or a loaded library, on a TVM device."""
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(module, device)


def from_torch(tensor: torch.Tensor):
    """A TVM tensor sharing `tensor`'s memory (DLPack, no copy; `tensor` must be contiguous)."""
    return __getattr__("runtime").from_dlpack(tensor)


def to_torch(value):
    """Torch tensors sharing the memory of a VM result (a tensor or nested arrays of them)."""
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    if isinstance(value, str):
        return value
    return tuple(to_torch(item) for item in value)


# --- export ------------------------------------------------------------------------------


def export_library(executable, path: str) -> None:
    """Write an executable, its kernels and its bound weights into one shared library."""
    executable.export_library(str(path))


def load_library(path: str):
    """Load a library written by `export_library`; needs only the TVM runtime."""
    return __getattr__("runtime").load_module(str(path))


def device_kind_of(module) -> str:
    """ "cuda" (or another device kind) when `module` imports device code, else "llvm"."""
    pending = list(module.imports)
    while pending:
        item = pending.pop(0)
        if item.kind not in ("llvm", "c", "library", "static_library", "vm_executable"):
            return item.kind
        pending.extend(item.imports)
    return "llvm"


def source_of(executable) -> str:
    """The generated source of every imported (device and host) module, as text."""
    modules, pending = [], list(executable.mod.imports)
    while pending:
        module = pending.pop(0)
        modules.append(module)
        pending.extend(module.imports)
    modules.sort(key=lambda m: m.kind in ("llvm", "c"))  # device code first, host code last
    parts = []
    for module in modules:
        try:
            text = module.inspect_source("")
        except Exception:  # some module kinds keep no source
            continue
        if text:
            parts.append(f"// module kind: {module.kind}\n{text}")
    return "\n".join(parts)


# --- MetaSchedule tuning databases -----------------------------------------------------------
#
# TVM 0.27's JSON serializer (`tvm.ir.save_json`, which MetaSchedule's JSONDatabase uses) crashes on
# any TIR object, so fxopt keeps its own JSON file: per tuned function its structural hash, its
# TVMScript, the target and the schedule trace (`Trace.as_json`, plain lists and strings).


def meta_schedule():
    """`tvm.s_tir.meta_schedule`, made usable without psutil: MetaSchedule asks for the CPU
    count through a global function that needs psutil, so the count comes from `os` instead."""
    ms = importlib.import_module("tvm.s_tir.meta_schedule")
    cores = cpu_cores()
    _tvm().register_global_func(
        "s_tir.meta_schedule.cpu_count", lambda logical=True: cores, override=True
    )
    return ms


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def with_functions(mod, functions: dict):
    """`mod` with the functions in `functions` (global var -> function) replaced, as a copy:
    `mod` itself is left as it is, and comes back unchanged when there is nothing to replace."""
    if not functions:
        return mod
    mod = mod.clone()
    for gvar, func in functions.items():
        mod.update_func(gvar, func)
    return mod


def workload_of(func):
    """A PrimFunc as MetaSchedule tunes it: alone in a module, named "main"."""
    return _tvm().IRModule({"main": func.with_attr("global_symbol", "main")})


def workload_key(workload) -> str:
    """The structural hash of a workload module, as a hex string (independent of weights, since
    fxopt binds them as Relax constants outside the PrimFuncs)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(workload) & (2**64 - 1):016x}"


def target_key(target: tvm.target.Target) -> dict:
    """What a tuned schedule is specific to: the target kind and its CPU or GPU architecture
    (options such as opt-level or num-cores do not change which schedules are valid)."""
    return {
        "kind": target.kind.name,
        **{key: str(target.attrs[key]) for key in ("mcpu", "arch") if key in target.attrs},
    }


def plain(value):
    """A TVM container (trace JSON, target export) as plain Python lists, dicts and scalars."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "value"):  # IntImm, FloatImm, StringImm
        return value.value
    try:
        return [plain(item) for item in value]
    except TypeError:
        return str(value)


def apply_trace(func, trace_json):
    """`func` scheduled by replaying a MetaSchedule trace (`Trace.as_json` of a tuning record),
    keeping its own global symbol and marked `tirx.is_scheduled`."""
    s_tir = __getattr__("s_tir")
    sch = s_tir.Schedule(workload_of(func))
    s_tir.schedule.Trace.apply_json_to_schedule(trace_json, sch)
    scheduled = sch.mod["main"]
    symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
    scheduled = (
        scheduled.with_attr("global_symbol", symbol)
        if symbol is not None
        else scheduled.without_attr("global_symbol")
    )
    return scheduled.with_attr("tirx.is_scheduled", True)
