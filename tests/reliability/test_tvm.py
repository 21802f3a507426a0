"""The TVM side never returns a silently wrong answer and never crashes the interpreter: damaged
libraries, threads, bad targets, unwritable paths and wrong calls end in a typed fxopt error.

Calls that could kill the interpreter (mapping a damaged library, racing a VM) run in a
subprocess, so a regression fails one test instead of the whole session.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir.errors import InputError

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

FAST_LLVM = {"kind": "llvm", "opt-level": 0}  # compiles faster, computes the same


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConvHead().eval()


@pytest.fixture(scope="module")
def artifact(model):
    return fxopt.compile(model, torch.randn(2, 3, 8, 8), target=FAST_LLVM)


@pytest.fixture(scope="module")
def library(artifact, tmp_path_factory):
    return artifact.export(tmp_path_factory.mktemp("export") / "model.so")


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_load_refuses_a_library_with_corrupted_bytes(library, tmp_path):
    data = bytearray(library.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = torch.randint(0, 256, (200,), dtype=torch.uint8).tolist()
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"damaged\.so.*damaged.*re-export"):
        fxopt.load(damaged)


def test_load_of_a_truncated_library_raises_instead_of_crashing(library, tmp_path):
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    result = run_python(
        f"""
        import fxopt
        try:
            fxopt.load({str(truncated)!r})
        except fxopt.errors.InputError as error:
            print("InputError:", error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]  # SIGBUS before: -7
    assert "InputError:" in result.stdout and "truncated.so" in result.stdout
    assert "re-export" in result.stdout


def test_a_loaded_module_called_from_four_threads_matches_one_thread(library):
    result = run_python(
        f"""
        import threading, torch, fxopt
        torch.manual_seed(0)
        module = fxopt.load({str(library)!r})
        inputs = [torch.randn(batch, 3, 8, 8) for batch in (1, 2, 3, 4)]
        expected = [module(x) for x in inputs]
        failures, calls = [], []

        def work(offset):
            for i in range(300):
                k = (i + offset) % len(inputs)
                try:
                    if not torch.equal(module(inputs[k]), expected[k]):
                        failures.append(f"call {{i}}: a different result")
                except Exception as error:
                    failures.append(f"call {{i}}: {{type(error).__name__}}: {{error}}")
                calls.append(k)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("calls", len(calls), "failures", len(failures), *failures[:3])
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]  # SIGSEGV before, or VM errors
    assert "calls 1200 failures 0" in result.stdout, result.stdout


def test_a_bogus_tvm_target_raises_input_error_saying_what_targets_look_like(model):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(InputError, match=r"'not-a-target' is not a TVM target.*'llvm'.*'kind'"):
        fxopt.compile(model, x, target="not-a-target")
    with pytest.raises(InputError, match=r"\{'kind': 'nope'\} is not a TVM target.*'cuda'"):
        fxopt.optimize(model, x, backend="tvm", target={"kind": "nope"})


def test_export_to_an_unwritable_path_raises_input_error_naming_it(artifact, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(InputError, match=r"a_file/model\.so.*a_file' is a file, not a directory"):
        artifact.export(a_file / "model.so")
    (tmp_path / "folder.so").mkdir()
    with pytest.raises(InputError, match=r"folder\.so.*it is a directory"):
        artifact.export(tmp_path / "folder.so")
    if os.geteuid() != 0:  # root writes into read-only directories
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(InputError, match=r"read_only/model\.so.*Permission denied"):
            artifact.export(read_only / "model.so")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial files


def test_a_tvm_module_rejects_arguments_it_was_not_compiled_with(model, artifact, library):
    x = torch.randn(2, 3, 8, 8)
    optimized = fxopt.optimize(model, x, backend="tvm", target=FAST_LLVM)
    assert any("every op runs in TVM" in note for note in optimized.report.notes)
    for module in (artifact.module, fxopt.load(library)):
        with pytest.raises(
            InputError, match=r"takes 1 tensor input\(s\) \(x: Tensor\(B, 3, 8, 8\)\).*int 3"
        ):
            module(x, 3)
        with pytest.raises(InputError, match=r"scale=float 2\.0.*unexpected keyword"):
            module(x, scale=2.0)
        with pytest.raises(InputError, match=r"got \(\[Tensor\(2, 3, 8, 8\)\]\)"):
            module([x])
    for args, kwargs in [((x, 3), {}), ((x,), {"scale": 2.0}), (([x],), {})]:
        with pytest.raises(InputError):
            optimized(*args, **kwargs)
    for module in (artifact.module, fxopt.load(library), optimized):
        torch.testing.assert_close(module(x=x), model(x), rtol=1e-4, atol=1e-5)
