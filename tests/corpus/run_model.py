"""Optimize one real model and print one JSON line: what fxopt did to it and whether it holds.

    python tests/corpus/run_model.py timm:repvgg_a0 [--deploy]

Runs `fxopt.optimize` with its defaults (eager backend, verify on) on the model's example
batch, checks the result against eager PyTorch there and at another batch size (a miss at the
float32 tolerance judged in float64 as optimize judges one: `fxopt.precision`), and checks
that the caller's model (parameters, buffers, train/eval flags) is untouched. `--deploy` also
counts the ops of timm's own deploy form (`reparameterize_model`), captured the same way.
test_corpus.py runs this once per model, each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from configs only; never reach the hub

import torch  # noqa: E402

import fxopt  # noqa: E402
from fxopt.analysis.cost import op_counts  # noqa: E402
from fxopt.ir.errors import VerificationError, first_line  # noqa: E402
from fxopt.testing import assert_equivalent, graph_of  # noqa: E402

OTHER_BATCH = 3
# Batch-norm ops in any of the forms capture may give them; all fold.
BATCH_NORMS = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training")
CONVS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "convolution")
LINEARS = ("linear", "addmm")  # GPT-2's Conv1D is an addmm


def summarize(counts: dict[str, int]) -> dict[str, int]:
    """BN, conv, linear and total op counts of one graph's op counts."""
    return {
        "bn": sum(counts.get(op, 0) for op in BATCH_NORMS),
        "conv": sum(counts.get(op, 0) for op in CONVS),
        "linear": sum(counts.get(op, 0) for op in LINEARS),
        "ops": sum(counts.values()),
    }


def snapshot(model: torch.nn.Module) -> tuple[dict, list[bool]]:
    """A copy of the model's state and the train flag of every module."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def untouched(model: torch.nn.Module, before: tuple[dict, list[bool]]) -> bool:
    """Whether the model's state and train flags are what `snapshot` saw."""
    state, flags = snapshot(model)
    same = state.keys() == before[0].keys() and all(
        torch.equal(v, before[0][k]) for k, v in state.items()
    )
    return same and flags == before[1]


def check(model, optimized, inputs) -> tuple[float | None, str | None]:
    """Largest error of `optimized` against `model` on `inputs`, or the failure's first line."""
    try:
        return assert_equivalent(model, optimized, inputs, float64=True), None
    except VerificationError as error:
        return None, f"mismatch: {str(error).splitlines()[0]}"
    except Exception as error:  # e.g. InputError: the batch was captured static
        return None, f"exception: {first_line(error)}"


def run(name: str, deploy: bool) -> dict:
    """Build, optimize and check one model; the result row as a dict."""
    row: dict = {"model": name}
    model = fxopt.models.create(name)
    inputs = fxopt.models.example_inputs(name)
    other = fxopt.models.example_inputs(name, batch=OTHER_BATCH, seed=OTHER_BATCH)
    with torch.no_grad():
        row["eager_finite"] = bool(torch.isfinite(model(*inputs)).all())
    if deploy:
        row["deploy"] = deploy_counts(name, inputs)
    before = snapshot(model)
    start = time.perf_counter()
    try:
        optimized = fxopt.optimize(model, inputs)
    except Exception as error:
        row["status"] = f"exception: {first_line(error)}"
        return row
    row["optimize_s"] = round(time.perf_counter() - start, 2)
    row.update(describe(optimized.report))
    row["error"], failure = check(model, optimized, inputs)
    row["error_other_batch"], other_failure = check(model, optimized, other)
    row["untouched"] = untouched(model, before)
    row["status"] = failure or other_failure or ("ok" if row["untouched"] else "mutated")
    return row


def describe(report: fxopt.Report) -> dict:
    """The report's counts before and after, the passes that fired and those rolled back."""
    return {
        "before": summarize(report.before.op_counts),
        "after": summarize(report.after.op_counts),
        "fired": [p.name for p in report.passes if p.status == "applied"],
        "rolled_back": report.rolled_back,
        "rollback_messages": [p.message for p in report.passes if p.name in report.rolled_back],
        "capture": report.capture,
        "dynamic_batch": report.dynamic_batch,
        "notes": report.notes,
    }


def deploy_counts(name: str, inputs: tuple) -> dict[str, int]:
    """Op counts of the model's deploy form (timm's reparameterize_model), captured as
    `optimize` captures (its report's "before" counts)."""
    deployed = fxopt.models.create(name, deploy=True)
    return summarize(op_counts(graph_of(deployed, *inputs, dynamic_batch=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="timm:NAME, torchvision:NAME or hf:NAME")
    parser.add_argument("--deploy", action="store_true", help="also count timm's deploy form")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    row = run(args.model, args.deploy)
    row["total_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
