"""fxopt.compile / Artifact.export / fxopt.load, including a process with only the TVM runtime."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.errors import InputError

pytestmark = pytest.mark.tvm


class ConvBnHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean(dim=(2, 3))), y


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = ConvBnHead()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    return model.train()  # compile optimizes the eval-mode behaviour and leaves this alone


@pytest.fixture(scope="module")
def artifact(model, fast_llvm):
    before = ({k: v.clone() for k, v in model.state_dict().items()}, model.training)
    with pytest.warns(UserWarning, match="training mode"):
        artifact = fxopt.compile(model, torch.randn(1, 3, 8, 8), target=fast_llvm)
    state, training = before
    assert model.training == training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    return artifact


def test_compile_returns_a_verified_runnable_artifact(model, artifact):
    assert artifact.target.kind.name == "llvm"
    assert artifact.report.final_error is not None
    assert "tvm build" in artifact.report.seconds
    x = torch.randn(4, 3, 8, 8)
    fxopt.testing.assert_equivalent(model.eval(), artifact.module, (x,))
    model.train()
    assert "define" in artifact.source()  # the host code, as LLVM IR


def test_export_writes_one_library_that_load_runs(model, artifact, tmp_path):
    path = artifact.export(tmp_path / "model.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.so"
    ]  # weights inside, no side file
    loaded = fxopt.load(path)
    x = torch.randn(2, 3, 8, 8)
    fxopt.testing.assert_equivalent(model.eval(), loaded, (x,))
    model.train()


def test_a_process_with_only_the_tvm_runtime_loads_and_runs_the_export(model, artifact, tmp_path):
    path = artifact.export(tmp_path / "model.so")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, tvm, fxopt
        assert "tvm_compiler" not in tvm.base._LOADED_LIBS, tvm.base._LOADED_LIBS
        io = torch.load({str(tmp_path / "io.pt")!r})
        module = fxopt.load({str(path)!r})
        fxopt.testing.assert_equivalent(lambda x: io["expected"], module, (io["x"],))
        print("runtime-only ok")
        """
    )
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runtime-only ok" in result.stdout


def test_export_and_load_say_what_is_wrong_with_a_path(artifact, tmp_path):
    with pytest.raises(InputError, match=r"must end in \.so"):
        artifact.export(tmp_path / "model.tar")
    with pytest.raises(InputError, match="does not exist"):
        fxopt.load(tmp_path / "missing.so")
