"""`fxopt tune`: MetaSchedule fills a database that builds reuse, at its shapes and target."""

import json

import pytest
import torch
from torch import nn

import fxopt
from fxopt.cli import main
from fxopt.codegen import lower
from fxopt.codegen import tvm_api as tv
from fxopt.codegen.tuning_db import DATABASE_FILE, apply_database
from fxopt.ir.errors import InputError
from fxopt.tune import tune

pytestmark = pytest.mark.tvm

TRIALS = 4


def tiny_conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    return model, torch.randn(1, 8, 16, 16)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, fast_llvm):
    model, x = tiny_conv()
    work_dir = tmp_path_factory.mktemp("tuning")
    summary = tune(model, (x,), fast_llvm, work_dir, trials=TRIALS, progress=False)
    return model, x, work_dir, summary


def with_fxopt_seconds(work_dir, to, seconds: float):
    """A copy of the database in `work_dir`, in `to`, as if fxopt's own schedules took
    `seconds`: the tuned ones then win (large) or lose (0) against them."""
    data = json.loads((work_dir / DATABASE_FILE).read_text())
    for record in data["records"]:
        record["fxopt_seconds"] = seconds
    to.mkdir(exist_ok=True)
    (to / DATABASE_FILE).write_text(json.dumps(data))
    return to


def relax_module(model, x):
    """The Relax module a static build of `model` lowers."""
    optimized = fxopt.optimize(model, (x,), passes=[*fxopt.DEFAULT_PIPELINE, "fuse_blocks"])
    exported, _, _ = lower.export(optimized.graph_module, (x,), dynamic_batch=False)
    return lower.import_program(exported)


def tuned_functions(model, x, target, work_dir) -> list[str]:
    """The functions of `model`'s static build for `target` that `work_dir` has schedules for."""
    mod = tv.run_passes(relax_module(model, x), tv.legalize_and_fuse_passes(), target)
    return apply_database(mod, target, work_dir)[1]


def test_tune_stores_a_record_per_tuned_function(tuned):
    _, _, work_dir, summary = tuned
    assert summary.trials == TRIALS and summary.budget == TRIALS
    assert [task.name for task in summary.tasks] == ["fused_conv2d_add_relu"]
    assert summary.tasks[0].best_seconds is not None and summary.tasks[0].best_seconds > 0
    records = json.loads((work_dir / DATABASE_FILE).read_text())["records"]
    assert len(records) == summary.records == 1
    assert records[0]["target"]["kind"] == "llvm"
    assert records[0]["trace"] and "conv2d" in records[0]["workload"]
    # fxopt's own schedule was timed the same way, to keep whichever is faster
    assert records[0]["fxopt_seconds"] > 0
    assert summary.tasks[0].fxopt_seconds == records[0]["fxopt_seconds"]
    assert records[0]["seconds"] == summary.tasks[0].best_seconds
    assert "fused_conv2d_add_relu" in str(summary) and "batch 1" in str(summary)


def test_a_build_with_the_database_uses_the_tuned_schedule(tuned, fast_llvm, tmp_path):
    model, x, tuned_dir, _ = tuned
    work_dir = with_fxopt_seconds(tuned_dir, tmp_path / "slow_fxopt", 1.0)
    artifact = fxopt.compile(model, x, target=fast_llvm, tuning_db=work_dir)
    notes = " ".join(artifact.report.notes)
    assert "1 tuned functions (fused_conv2d_add_relu)" in notes, notes
    torch.testing.assert_close(artifact.module(x), model(x), rtol=1e-5, atol=1e-5)

    # the tuned function replaces fxopt's own conv schedule
    target = tv.make_target(fast_llvm)
    mod = relax_module(model, x)
    notes = []
    own = lower.lower(mod, target)["fused_conv2d_add_relu"]
    with_db = lower.lower(mod, target, work_dir, notes)["fused_conv2d_add_relu"]
    assert notes == [f"tuning database {work_dir}: 1 tuned functions (fused_conv2d_add_relu)"]
    assert "tirx.is_scheduled" in with_db.attrs
    assert own.script() != with_db.script()


def test_a_tuned_schedule_slower_than_fxopts_is_not_used(tuned, fast_llvm, tmp_path):
    model, x, tuned_dir, _ = tuned
    llvm = tv.make_target(fast_llvm)
    work_dir = with_fxopt_seconds(tuned_dir, tmp_path / "fast_fxopt", 0.0)
    assert tuned_functions(model, x, llvm, work_dir) == []


def test_optimize_with_the_tvm_backend_uses_the_database(tuned, fast_llvm, tmp_path):
    model, x, tuned_dir, _ = tuned
    work_dir = with_fxopt_seconds(tuned_dir, tmp_path / "slow_fxopt", 1.0)
    opt = fxopt.optimize(model, x, backend="tvm", target=fast_llvm, tuning_db=work_dir)
    notes = " ".join(opt.report.notes)
    assert "tvm: tuning database" in notes and "1 tuned functions" in notes, notes
    assert "in PyTorch" not in notes, notes
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_other_targets_and_shapes_are_not_matched(tuned, fast_llvm, tmp_path):
    model, x, tuned_dir, _ = tuned
    work_dir = with_fxopt_seconds(tuned_dir, tmp_path / "slow_fxopt", 1.0)
    llvm = tv.make_target(fast_llvm)
    assert tuned_functions(model, x, llvm, work_dir) == ["fused_conv2d_add_relu"]
    assert tuned_functions(model, x, tv.make_target("cuda"), work_dir) == []
    other_cpu = tv.make_target({"kind": "llvm", "mcpu": "znver3", "opt-level": 0})
    assert tuned_functions(model, x, other_cpu, work_dir) == []
    bigger = torch.randn(2, 8, 16, 16)
    assert tuned_functions(model, bigger, llvm, work_dir) == []
    artifact = fxopt.compile(model, bigger, target=fast_llvm, tuning_db=work_dir)
    assert "0 tuned functions" in " ".join(artifact.report.notes)
    torch.testing.assert_close(artifact.module(bigger), model(bigger), rtol=1e-5, atol=1e-5)


def test_a_missing_database_raises_input_error(tmp_path, fast_llvm):
    model, x = tiny_conv()
    with pytest.raises(InputError, match="does not exist"):
        fxopt.compile(model, x, target=fast_llvm, tuning_db=tmp_path / "nowhere")
    with pytest.raises(InputError, match=f"has no {DATABASE_FILE}"):
        fxopt.optimize(model, x, backend="tvm", tuning_db=tmp_path)
    with pytest.raises(InputError, match="backend='tvm' only"):
        fxopt.optimize(model, x, tuning_db=tmp_path)
    (tmp_path / DATABASE_FILE).write_text("{}")
    with pytest.raises(InputError, match="not a tuning database"):
        fxopt.compile(model, x, target=fast_llvm, tuning_db=tmp_path)
    with pytest.raises(InputError, match="trials"):
        tune(model, x, fast_llvm, tmp_path, trials=0)


def test_cli_tune_prints_the_summary(tmp_path, capsys):
    source = tmp_path / "tiny.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).eval()\n"
        "example_inputs = (torch.randn(1, 4, 8, 8),)\n"
    )
    work_dir = tmp_path / "db"
    assert main(["tune", str(source), "--trials", "2", "--work-dir", str(work_dir)]) == 0
    out = capsys.readouterr().out
    assert "tuned 1 functions for llvm: 2 of 2 trials" in out and "fxopt ms" in out, out
    assert (work_dir / DATABASE_FILE).is_file()
    assert main(["tune", "no_such_model_anywhere", "--work-dir", str(work_dir)]) == 2
