"""The `fxopt` command line: passes, models and optimize (bench is in test_bench.py)."""

import json
import subprocess
import sys
import textwrap

import pytest

import fxopt
from fxopt.cli import main

MODEL_FILE = """
import torch
from torch import nn

{model}
{inputs}

if __name__ == "__main__":
    raise SystemExit("the model file's main block must not run")
"""
MODULE = "model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()"
FACTORY = """
def model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
"""


def write_model_file(tmp_path, model=MODULE, inputs="example_inputs = torch.randn(2, 3, 16, 16)"):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_FILE.format(model=textwrap.dedent(model), inputs=inputs))
    return path


def test_passes_lists_every_registered_pass_with_exactness(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_conv_bn" in out and "exact" in out
    assert all(info.name in out for info in fxopt.list_passes())


def test_models_lists_the_zoo_with_input_shape(capsys):
    if "resnet18_like" not in fxopt.models.list():
        pytest.skip("the zoo has no resnet18_like yet")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_like" in out and "3x64x64" in out and "deploy form" in out


def test_optimize_zoo_model_prints_the_report_and_writes_json(capsys, tmp_path):
    if "resnet18_like" not in fxopt.models.list():
        pytest.skip("the zoo has no resnet18_like yet")
    out_json = tmp_path / "out.json"
    assert main(["optimize", "resnet18_like", "--json", str(out_json)]) == 0
    assert "fold_conv_bn" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert "fold_conv_bn" in [p["name"] for p in report["passes"]]
    assert report["after"]["op_counts"].get("batch_norm", 0) == 0


@pytest.mark.parametrize(
    "model, inputs",
    [
        (MODULE, "example_inputs = torch.randn(2, 3, 16, 16)"),
        (FACTORY, "def example_inputs():\n    return (torch.randn(2, 3, 16, 16),)"),
    ],
    ids=["values", "functions"],
)
def test_optimize_file_takes_model_and_example_inputs_as_values_or_functions(
    capsys, tmp_path, model, inputs
):
    path = write_model_file(tmp_path, model, inputs)
    assert main(["optimize", str(path), "--passes", "fold_conv_bn", "--static-batch"]) == 0
    out = capsys.readouterr().out
    assert "Sequential" in out and "conv-bn x1" in out


def test_optimize_file_without_example_inputs_is_an_error(capsys, tmp_path):
    path = write_model_file(tmp_path, inputs="")
    assert main(["optimize", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxopt: error:") and "example_inputs" in err


def test_optimize_file_rejects_batch(capsys, tmp_path):
    assert main(["optimize", str(write_model_file(tmp_path)), "--batch", "4"]) == 2
    assert "--batch applies to zoo models" in capsys.readouterr().err


def test_unknown_model_exits_2_with_a_message_and_no_traceback(capsys):
    assert main(["optimize", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxopt: error: unknown model 'no_such_model'")
    assert "Traceback" not in err


def test_unknown_pass_exits_2(capsys):
    name = fxopt.models.list()[0]
    assert main(["optimize", name, "--passes", "fold_everything"]) == 2
    assert "unknown pass 'fold_everything'" in capsys.readouterr().err


@pytest.mark.tvm
def test_optimize_with_the_tvm_backend_reports_the_build(capsys):
    assert main(["optimize", "espcn", "--backend", "tvm"]) == 0
    out = capsys.readouterr().out
    assert "tvm: built for" in out and "every op runs in TVM" in out


def test_a_command_is_required():
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_python_m_fxopt_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "fxopt", "passes"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fold_conv_bn" in result.stdout
