"""The `fxopt` command line (also `python -m fxopt`): passes, models, optimize, bench, tune."""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import models as zoo
from .api import BACKENDS, optimize
from .bench import REPEATS, WARMUP, bench, format_rows
from .errors import FxoptError, InputError
from .progress import table
from .registry import list_passes

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
block in it does not run. Example file:

  import torch
  from torch import nn
  model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
  example_inputs = (torch.randn(1, 3, 32, 32),)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or fxopt error)."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except FxoptError as error:
        print(f"fxopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxopt",
        description="Make a trained PyTorch model faster without changing what "
        "it computes: capture it with torch.fx, rewrite the graph, verify every step.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    commands.add_parser("passes", help="list the registered passes").set_defaults(command=_passes)
    commands.add_parser("models", help="list the model zoo").set_defaults(command=_models)
    _add_optimize(commands)
    _add_bench(commands)
    _add_tune(commands)
    return parser


def _add_tune(commands) -> None:
    tuning = commands.add_parser(
        "tune",
        help="search faster TVM schedules for a model's kernels (MetaSchedule)",
        description="Tune the TVM kernels of a model (optimized as fxopt.compile optimizes it)\n"
        "at the example inputs' shapes with MetaSchedule, and store the best schedules in\n"
        "--work-dir. fxopt.compile(..., tuning_db=DIR) and `fxopt optimize --backend tvm\n"
        "--tuning-db DIR` use those faster than fxopt's own schedules.",
        epilog=FILE_HELP,
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
    tuning.set_defaults(command=_tune)


def _tune(args: argparse.Namespace) -> int:
    from .codegen.tune import tune

    model, inputs = load_target(args.target, args.batch)
    summary = tune(model, inputs, args.tvm_target, args.work_dir, trials=args.trials)
    print(summary)
    return 0


def _add_optimize(commands) -> None:
    opt = commands.add_parser(
        "optimize",
        help="optimize a zoo model or a model file and print the report",
        description="Optimize a model and print what each pass did.",
        epilog=FILE_HELP,
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
    timing.set_defaults(command=_bench)


def _passes(args: argparse.Namespace) -> int:
    rows = []
    for info in list_passes():
        description = info.description.removeprefix(f"{info.name}:").strip()
        rows.append([info.name, "yes" if info.exact else "no", description])
    print("\n".join(table(["pass", "exact", "description"], rows)))
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
    model, inputs = load_target(args.target, args.batch)
    passes = _split(args.passes) if args.passes is not None else None
    optimized = optimize(
        model,
        inputs,
        backend=args.backend,
        passes=passes,
        verify=not args.no_verify,
        dynamic_batch=not args.static_batch,
        tuning_db=args.tuning_db,
    )
    print(optimized.report)
    if args.explain:
        print()
        print(optimized.report.explain())
    if args.json:
        _write_json(args.json, optimized.report.to_dict())
    return 0


def _bench(args: argparse.Namespace) -> int:
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
    )
    print(format_rows(rows))
    if args.json:
        _write_json(args.json, {"torch": torch.__version__, "rows": [asdict(r) for r in rows]})
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
    namespace = runpy.run_path(str(path), run_name="__fxopt_model__")
    values = []
    for name in ("model", "example_inputs"):
        if name not in namespace:
            raise InputError(f"{path} defines no `{name}`; see `fxopt optimize --help`")
        value = namespace[name]
        # An nn.Module is callable too, but it is the model itself, not a factory.
        values.append(value() if callable(value) and not isinstance(value, nn.Module) else value)
    model, inputs = values
    if not isinstance(model, nn.Module):
        raise InputError(f"`model` in {path} is a {type(model).__name__}, not an nn.Module")
    return model, inputs


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(_plain(data), indent=2) + "\n")
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
