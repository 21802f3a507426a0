"""The `fxopt` command line (also `python -m fxopt`): passes, models, optimize, bench, tune."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import models as zoo
from .api import BACKENDS, optimize
from .bench import REPEATS, WARMUP, bench, format_rows
from .ir.errors import FxoptError, InputError
from .ir.export import as_tuple
from .plot import plot, require_matplotlib
from .progress import table
from .rules.registry import defaults, list_passes
from .tune import tune

DEBUG_HELP = "on an error, also print the Python traceback"
TARGET_HELP = "zoo model name, timm:NAME, torchvision:NAME, hf:NAME, or path to a .py file"
FILE_HELP = """\
TARGET is a zoo model name (see `fxopt models`), a real model of another library with
random weights (timm:NAME, torchvision:NAME, or hf:NAME for bert, distilbert, gpt2, llama,
t5_encoder, vit, clip_vision, whisper_encoder; the library must be installed), or a path to
a .py file that defines
  model           an nn.Module, or a function without arguments that returns one
  example_inputs  a tensor or a tuple of tensors (as model(*example_inputs)),
                  or a function without arguments that returns one
The file is run with __name__ set to "__fxopt_model__", so an `if __name__ == "__main__":`
block in it does not run, and the model is called once on example_inputs before optimizing.
Example file:

  import torch
  from torch import nn
  model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
  example_inputs = (torch.randn(1, 3, 32, 32),)
"""
EXIT_HELP = """\
Exit status: 0 on success; 2 on any error, which prints one line `fxopt: error: ...` on
stderr saying what went wrong and what to do (add --debug for the Python traceback); 130
when interrupted.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 any error, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for every failure; the traceback only on request
        if args.debug:
            traceback.print_exc()
        print(f"fxopt: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, FxoptError):
        return " ".join(lines)
    first = lines[0] if lines else "(no message)"
    return f"{type(error).__name__}: {first} (unexpected; run again with --debug for the traceback)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxopt",
        description="Make a trained PyTorch model faster without changing what "
        "it computes: capture it with torch.fx, rewrite the graph, verify every step.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    commands.add_parser("passes", help="list the registered passes").set_defaults(command=_passes)
    commands.add_parser("models", help="list the model zoo").set_defaults(command=_models)
    _add_optimize(commands)
    _add_bench(commands)
    _add_tune(commands)
    for command in commands.choices.values():  # `fxopt CMD ... --debug` works as well
        # SUPPRESS: a command's default must not reset `fxopt --debug CMD`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


def _add_tune(commands) -> None:
    tuning = commands.add_parser(
        "tune",
        help="search faster TVM schedules for a model's kernels (MetaSchedule)",
        description="Tune the TVM kernels of a model (optimized as fxopt.compile optimizes it)\n"
        "at the example inputs' shapes with MetaSchedule, and store the best schedules in\n"
        "--work-dir. fxopt.compile(..., tuning_db=DIR) and `fxopt optimize --backend tvm\n"
        "--tuning-db DIR` use those faster than fxopt's own schedules.",
        epilog=FILE_HELP + "\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tuning.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    tuning.add_argument(
        "--target",
        dest="tvm_target",
        choices=("llvm", "cuda"),
        default="llvm",
        help="llvm (this CPU) or cuda (needs a GPU here to measure); default llvm",
    )
    tuning.add_argument(
        "--trials", type=int, default=64, help="measured candidates in total (default 64)"
    )
    tuning.add_argument(
        "--work-dir",
        type=Path,
        default=Path("fxopt_tuning"),
        help="directory of the tuning database (default ./fxopt_tuning)",
    )
    tuning.add_argument(
        "--batch",
        type=int,
        help="batch size of a zoo model's example inputs (default 1); the shapes tuned",
    )
    tuning.add_argument(
        "--rpc",
        metavar="TRACKER_HOST:PORT:KEY",
        help="measure on a device registered with this TVM RPC tracker instead of here "
        "(give --target for that device)",
    )
    tuning.set_defaults(command=_tune)


def _tune(args: argparse.Namespace) -> int:
    model, inputs = load_target(args.target, args.batch)
    summary = tune(model, inputs, args.tvm_target, args.work_dir, trials=args.trials, rpc=args.rpc)
    print(summary)
    return 0


def _add_optimize(commands) -> None:
    opt = commands.add_parser(
        "optimize",
        help="optimize a zoo model or a model file and print the report",
        description="Optimize a model and print what each pass did.",
        epilog=FILE_HELP + "\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    opt.add_argument(
        "--backend",
        choices=BACKENDS,
        default="eager",
        help="run the rewritten graph as is (eager), through torch.compile "
        "(inductor), or through TVM (tvm, built for the CPU); default: eager",
    )
    opt.add_argument(
        "--batch",
        type=int,
        help="batch size of a zoo model's example inputs "
        "(default 1; a file brings its own example_inputs)",
    )
    opt.add_argument(
        "--passes",
        help="comma-separated pass names instead of the default pipeline (see `fxopt passes`)",
    )
    opt.add_argument(
        "--approximate",
        action="store_true",
        help="allow the approximate passes named in --passes (see `fxopt passes`)",
    )
    opt.add_argument(
        "--set",
        metavar="PASS.SETTING=VALUE",
        action="append",
        default=[],
        help="a pass setting for this run, e.g. lowrank_linear.energy=0.99 (repeatable; "
        "`fxopt passes` lists the settings)",
    )
    opt.add_argument(
        "--no-verify", action="store_true", help="do not check each pass against eager PyTorch"
    )
    opt.add_argument(
        "--static-batch",
        action="store_true",
        help="keep the batch dimension fixed instead of symbolic",
    )
    opt.add_argument(
        "--explain",
        action="store_true",
        help="also print each pass's near-misses: where a rule's pattern matched but its "
        "check declined, and why",
    )
    opt.add_argument(
        "--tuning-db",
        metavar="DIR",
        type=Path,
        help="with --backend tvm: use the tuned schedules `fxopt tune` stored in DIR "
        "(the batch is then kept static)",
    )
    opt.add_argument("--json", metavar="FILE", type=Path, help="also write the report as JSON")
    opt.set_defaults(command=_optimize)


def _add_bench(commands) -> None:
    timing = commands.add_parser(
        "bench",
        help="time eager, fxopt and torch.compile side by side",
        description="Time each candidate of each zoo model in one process: build, warm up, "
        "then time calls in turns so that machine noise hits all candidates alike. Reports "
        "median latency and speed-up = eager median / candidate median (> 1 is faster).",
        epilog=EXIT_HELP,
    )
    timing.add_argument(
        "--models",
        required=True,
        help="comma-separated zoo model names or timm:NAME, torchvision:NAME, hf:NAME",
    )
    timing.add_argument(
        "--backends",
        default="eager,optimized",
        help="comma-separated candidates out of eager, optimized, inductor, "
        "optimized+inductor, tvm, deploy (default: eager,optimized; eager is always "
        "timed as the baseline)",
    )
    timing.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)"
    )
    timing.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="precision of weights and inputs (default float32)",
    )
    timing.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    timing.add_argument(
        "--input-shape",
        help="one sample's shape instead of the model's own, e.g. 4096,64 for 4096 tokens "
        "of width 64 (default: the shape the model is registered with)",
    )
    timing.add_argument("--threads", type=int, help="torch threads (default: leave as is)")
    timing.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"timed calls per candidate (default {REPEATS})",
    )
    timing.add_argument(
        "--warmup", type=int, default=WARMUP, help=f"warm-up calls per candidate (default {WARMUP})"
    )
    timing.add_argument("--json", metavar="FILE", type=Path, help="also write the rows as JSON")
    timing.add_argument(
        "--rpc",
        metavar="TRACKER_HOST:PORT:KEY",
        help="time the tvm candidate on a device registered with this TVM RPC tracker "
        "(built here; the other candidates run here)",
    )
    timing.add_argument(
        "--target",
        dest="tvm_target",
        help="TVM target of the --rpc device (default llvm), e.g. cuda",
    )
    timing.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="also draw the speed-ups per model and candidate (needs matplotlib: "
        "pip install 'fxopt[plot]')",
    )
    timing.set_defaults(command=_bench)


def _passes(args: argparse.Namespace) -> int:
    rows = []
    for info in list_passes():
        description = info.description.removeprefix(f"{info.name}:").strip()
        settings = ", ".join(f"{k}={v!r}" for k, v in defaults(info.name).items())
        rows.append([info.name, "yes" if info.exact else "no", settings or "-", description])
    print("\n".join(table(["pass", "exact", "settings (defaults)", "description"], rows)))
    return 0


def _models(args: argparse.Namespace) -> int:
    rows = []
    for name in zoo.list():
        info = zoo.info(name)
        shape = "x".join(str(d) for d in info.input_shape)
        rows.append([name, shape, "yes" if info.has_deploy else "no", info.description])
    print("\n".join(table(["model", "input (one sample)", "deploy form", "description"], rows)))
    return 0


def _optimize(args: argparse.Namespace) -> int:
    _check_writable(args.json)  # before minutes of work, not after
    model, inputs = load_target(args.target, args.batch)
    passes = _split(args.passes) if args.passes is not None else None
    optimized = optimize(
        model,
        inputs,
        backend=args.backend,
        passes=passes,
        approximate=args.approximate,
        verify=not args.no_verify,
        dynamic_batch=not args.static_batch,
        tuning_db=args.tuning_db,
        options=_settings(args.set),
    )
    print(optimized.report)
    if args.explain:
        print()
        print(optimized.report.explain())
    if args.json:
        _write_json(args.json, optimized.report.to_dict())
    return 0


def _bench(args: argparse.Namespace) -> int:
    _check_writable(args.json)
    if args.plot is not None:  # before minutes of timing, not after
        require_matplotlib()
        _check_writable(args.plot, "--plot")
    rows = bench(
        _split(args.models),
        _split(args.backends),
        batch=args.batch,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        shape=_shape(args.input_shape),
        device=args.device,
        dtype=args.dtype,
        rpc=args.rpc,
        target=args.tvm_target,
    )
    print(format_rows(rows))
    if args.json:
        _write_json(args.json, {"torch": torch.__version__, "rows": [asdict(r) for r in rows]})
    if args.plot is not None:
        print(f"speed-ups drawn in {plot(rows, args.plot)}")
    return 0


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        message = f"--input-shape takes integers separated by commas, not {text!r}"
        raise InputError(message) from None
    if not shape or min(shape) < 1:
        raise InputError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def load_target(target: str, batch: int | None) -> tuple[nn.Module, tuple]:
    """The model and example inputs named by TARGET: a zoo model name, a ``timm:``,
    ``torchvision:`` or ``hf:`` name, or a .py file."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if batch is not None:
            raise InputError(
                "--batch applies to zoo models; a model file defines its own example_inputs"
            )
        return _load_file(path)
    try:
        zoo.info(target)
    except InputError:  # a library's model: its package is missing or has no such name
        raise
    except ValueError as error:
        raise InputError(f"{error}; or give the path of a .py file") from None
    return zoo.create(target), zoo.example_inputs(target, batch=batch or 1)


def _load_file(path: Path) -> tuple[nn.Module, tuple]:
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    namespace = _run_file(path)
    values = []
    for name in ("model", "example_inputs"):
        if name not in namespace:
            raise InputError(f"{path} defines no `{name}`; see `fxopt optimize --help`")
        value = namespace[name]
        # An nn.Module is callable too, but it is the model itself, not a factory.
        if callable(value) and not isinstance(value, nn.Module):
            try:
                value = value()
            except Exception as error:
                raise InputError(
                    f"{_where(path, error)}: `{name}()` raised {_brief(error)}"
                ) from error
        values.append(value)
    model, inputs = values
    if not isinstance(model, nn.Module):
        raise InputError(f"`model` in {path} is a {type(model).__name__}, not an nn.Module")
    _check_runs(path, model, inputs)
    return model, inputs


def _run_file(path: Path) -> dict:
    try:
        return runpy.run_path(str(path), run_name="__fxopt_model__")
    except SyntaxError as error:
        where = f"{path}:{error.lineno}" if error.lineno else str(path)
        raise InputError(f"{where}: syntax error: {error.msg}; fix the file") from error
    except ImportError as error:
        missing = f"install {error.name!r} or fix the import" if error.name else "fix the import"
        raise InputError(f"{_where(path, error)}: {_brief(error)}; {missing}") from error
    except SystemExit as error:
        raise InputError(
            f"{path} called exit({error.code}) while loading; put that code under "
            '`if __name__ == "__main__":`'
        ) from error
    except Exception as error:
        raise InputError(
            f"{_where(path, error)}: loading the file raised {_brief(error)}; "
            f"run `python {path}` to see why"
        ) from error


def _check_runs(path: Path, model: nn.Module, inputs) -> None:
    """Call the model once, so that inputs it rejects are named here, not deep in capture."""
    args = as_tuple(inputs)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*args)
    except Exception as error:
        raise InputError(
            f"{_where(path, error)}: the model raised {_brief(error)} when called on its "
            "example_inputs; make example_inputs what its forward takes"
        ) from error
    finally:
        model.train(training)


def _where(path: Path, error: BaseException) -> str:
    """`path:line` of the deepest frame of `error` in the model file, else `path`."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _brief(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _settings(assignments: list[str]) -> dict[str, dict[str, object]]:
    """``["lowrank_linear.energy=0.99"]`` as ``{"lowrank_linear": {"energy": 0.99}}``; a value
    is read as a Python literal (number, True, a quoted string) or else kept as text."""
    options: dict[str, dict[str, object]] = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        name, dot, setting = key.strip().partition(".")
        if not (sep and dot and name and setting):
            raise InputError(
                f"--set takes PASS.SETTING=VALUE, e.g. lowrank_linear.energy=0.99; got {text!r}"
            )
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        options.setdefault(name, {})[setting.strip()] = parsed
    return options


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_writable(path: Path | None, option: str = "--json") -> None:
    if path is None:
        return
    parent = path.parent
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(
            f"{option} {path}: no directory {parent}; create it or choose another path"
        )
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise InputError(f"{option} {path}: permission denied; choose a path you can write")


def _write_json(path: Path, data: object) -> None:
    try:
        path.write_text(json.dumps(_plain(data), indent=2) + "\n")
    except OSError as error:
        raise InputError(
            f"cannot write --json {path}: {error.strerror}; choose another path"
        ) from error
    print(f"wrote {path}", file=sys.stderr)


def _plain(value: object) -> object:
    """Strict JSON: NaN and infinities (an error can be either) become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
