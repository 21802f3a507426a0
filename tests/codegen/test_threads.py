"""A TVM module runs on as many CPU threads as PyTorch is set to use, and TVM's pool is not
capped at half the cores (its x86 default)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxopt
from fxopt.codegen import tvm_api as tv

pytestmark = pytest.mark.tvm


def test_a_compiled_module_follows_torch_get_num_threads(fast_llvm):
    if tv._usable_cpus() < 2:
        pytest.skip("needs two CPUs")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).eval(), torch.randn(1, 4, 16, 16)
    module = fxopt.compile(model, x, target=fast_llvm).module
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
            assert tv.tvm.runtime.num_threads() == threads
    finally:
        torch.set_num_threads(before)


def run(code: str, **env) -> str:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


POOL = (
    "from fxopt.codegen import tvm_api as tv; tv.use_threads(64); "
    "print(tv.tvm.runtime.num_threads())"
)


def test_the_pool_spans_the_usable_cpus_unless_the_user_sized_it():
    assert int(run(POOL)) == tv._usable_cpus()
    assert run(POOL, TVM_NUM_THREADS="1") == "1"
    assert run(POOL, OMP_NUM_THREADS="1") == "1"
