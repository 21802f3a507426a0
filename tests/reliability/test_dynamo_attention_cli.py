"""Never silently wrong, clear errors: the `fxopt` Dynamo backend with several instances of one
class and with weights changed in place; hand-written attention whose mask hides a whole row;
the command line's one-line errors."""

import json
import logging
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import dynamo
from fxopt.ir.graph import is_op
from fxopt.passes.canonicalize_attention import AttentionSettings, canonicalize_attention
from fxopt.report import Report
from fxopt.testing import count_ops, graph_of

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention
AGAIN = "optimizing a graph again"


# A. torch.compile(model, backend="fxopt")


class ConvBn(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # Dynamo's cache outlives a test: start each from nothing
    yield
    torch._dynamo.reset()


def x_image():
    return torch.randn(2, 3, 8, 8)


@torch.no_grad()
def test_two_instances_of_one_class_each_get_their_own_outputs(caplog):
    a, b, x = ConvBn(0).eval(), ConvBn(1).eval(), x_image()
    compiled_a = torch.compile(a, backend="fxopt")
    compiled_b = torch.compile(b, backend="fxopt")
    with caplog.at_level(logging.INFO, logger="fxopt"):
        for _ in range(2):  # alternating calls reuse both optimized graphs
            torch.testing.assert_close(compiled_a(x), a(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled_b(x), b(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a(x), b(x))
    assert [r.message for r in caplog.records].count(
        f"fxopt backend: {AGAIN}, for weights it has not seen"
    ) == 1


@torch.no_grad()
def test_weights_changed_in_place_are_followed_not_stale(caplog):
    model, x = ConvBn(0).eval(), x_image()
    compiled = torch.compile(model, backend="fxopt")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.INFO, logger="fxopt"):
        model.conv.weight.mul_(2)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model.load_state_dict(ConvBn(2).state_dict())  # copy_ into the same tensors
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model.bn.running_var.data = torch.full((4,), 3.0)  # new storage, same buffer
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        compiled(x)  # nothing changed since: no further optimization
    assert sum(AGAIN in r.message for r in caplog.records) == 3


@torch.no_grad()
def test_the_backend_still_folds_each_graph_it_optimizes():
    report = Report("dynamo graph", "eager")
    model, x = ConvBn(0).eval(), x_image()
    compiled = torch.compile(model, backend=dynamo.make_backend(report=report))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    applied = {p.name: p.applied for p in report.passes}
    assert applied["fold_conv_bn"] == {"conv-bn": 1}


@torch.no_grad()
def test_past_the_optimization_limit_new_weights_run_unoptimized_but_right(monkeypatch, caplog):
    monkeypatch.setattr(dynamo, "MAX_OPTIMIZATIONS", 1)
    a, b, x = ConvBn(0).eval(), ConvBn(1).eval(), x_image()
    torch.compile(a, backend="fxopt")(x)
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        for _ in range(2):
            torch.testing.assert_close(torch.compile(b, backend="fxopt")(x), b(x))
    assert sum("run it unoptimized" in r.message for r in caplog.records) == 1


class DataDependent(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.net = ConvBn(seed)

    def forward(self, x):
        y = self.net(x)
        return y * 2 if y.sum() > 0 else -y  # torch.export cannot capture this


def test_optimize_through_the_dynamo_fallback_keeps_two_instances_apart():
    x = x_image()
    first, second = DataDependent(0).eval(), DataDependent(1).eval()
    opt_first, opt_second = fxopt.optimize(first, x), fxopt.optimize(second, x)
    assert opt_second.report.capture == "dynamo fallback"
    with torch.no_grad():
        torch.testing.assert_close(opt_first(x), first(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(opt_second(x), second(x), rtol=1e-5, atol=1e-5)


# B. canonicalize_attention and masks that hide a whole row


class MaskedAttention(nn.Module):
    """softmax(q kT / sqrt(d) + mask) v, the mask an input or a buffer, added or filled."""

    def __init__(self, fill: bool = False, buffer: torch.Tensor | None = None):
        super().__init__()
        self.fill = fill
        self.register_buffer("mask", buffer)

    def forward(self, q, k, v, mask=None):
        mask = self.mask if mask is None else mask
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.fill:
            scores = scores.masked_fill(mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        return scores.softmax(-1) @ v


def qkv(*shape):
    return tuple(torch.randn(*shape) for _ in range(3))


def rewritten(model, *inputs, dynamic_batch=False):
    """The pass's result on `model`, checked against eager on `inputs` (NaN where eager has it);
    float masks are rewritten too (``always``: the pass declines them on CPU by default)."""
    gm = graph_of(model, *inputs, dynamic_batch=dynamic_batch)
    result = canonicalize_attention(gm, AttentionSettings(always=True))
    torch.testing.assert_close(result.graph_module(*inputs), model(*inputs), equal_nan=True)
    return result


def key_padding(batch, keys, hidden_batch=0, boolean=False):
    """(B, 1, 1, M): True / -inf on padded keys; sequence `hidden_batch` is all padding."""
    padded = torch.zeros(batch, 1, 1, keys, dtype=torch.bool)
    padded[..., keys // 2 :] = True
    padded[hidden_batch] = True
    return padded if boolean else torch.zeros(padded.shape).masked_fill(padded, float("-inf"))


@pytest.mark.parametrize("boolean", [False, True], ids=["additive", "masked_fill"])
def test_an_input_mask_that_hides_a_whole_row_gives_nan_there_as_eager_does(boolean):
    q, k, v = qkv(3, 2, 5, 8)
    mask = key_padding(3, 5, hidden_batch=1, boolean=boolean)
    result = rewritten(MaskedAttention(fill=boolean), q, k, v, mask)
    assert result.applied == {"softmax-attention": 1}
    out = result.graph_module(q, k, v, mask)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    assert count_ops(result.graph_module, SDPA) == 1


def test_optimize_verifies_a_model_whose_mask_hides_a_whole_row_and_keeps_its_nan():
    q, k, v = qkv(3, 2, 5, 8)
    mask = key_padding(3, 5, hidden_batch=1, boolean=True)  # eager: NaN for sequence 1
    model = MaskedAttention(fill=True)
    fast = fxopt.optimize(model, (q, k, v, mask))
    assert fast.report.rolled_back == [] and count_ops(fast.graph_module, SDPA) == 1
    out = fast(q, k, v, mask)
    torch.testing.assert_close(out, model(q, k, v, mask), equal_nan=True)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


def test_an_input_mask_is_patched_with_a_symbolic_batch_too():
    q, k, v = qkv(3, 2, 5, 8)
    mask = key_padding(3, 5, hidden_batch=2)
    result = rewritten(MaskedAttention(), q, k, v, mask, dynamic_batch=True)
    q4, k4, v4 = qkv(4, 2, 5, 8)
    mask4 = key_padding(4, 5, hidden_batch=0)
    got, expected = result.graph_module(q4, k4, v4, mask4), MaskedAttention()(q4, k4, v4, mask4)
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_an_additive_mask_with_inf_or_nan_gives_nan_rows_as_eager_does():
    q, k, v = qkv(2, 4, 8)
    mask = torch.zeros(2, 4, 4)
    mask[0, 1, 2], mask[1, 3, 0] = float("inf"), float("nan")
    result = rewritten(MaskedAttention(), q, k, v, mask)
    assert result.applied == {"softmax-attention": 1}


def test_canonicalize_attention_declines_a_constant_mask_that_hides_a_whole_row():
    mask = torch.zeros(6, 6)
    mask[2] = float("-inf")
    q, k, v = qkv(2, 6, 4)
    result = rewritten(MaskedAttention(buffer=mask), q, k, v)
    assert not result.modified
    assert any("hides a whole row" in why for why in result.declined["softmax-attention"])


def test_canonicalize_attention_declines_a_constant_mask_it_cannot_evaluate():
    class InPlaceMask(nn.Module):
        def forward(self, q, k, v):
            mask = torch.zeros(q.shape[-2], q.shape[-2])
            mask[:, 0] = float("-inf")  # written in place: not evaluated at compile time
            return (q @ k.transpose(-2, -1) + mask).softmax(-1) @ v

    result = rewritten(InPlaceMask(), *qkv(2, 6, 4))
    assert not result.modified
    assert any("written in place" in why for why in result.declined["softmax-attention"])


def test_a_constant_causal_mask_needs_no_run_time_patch():
    causal = torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    result = rewritten(MaskedAttention(buffer=causal), *qkv(2, 2, 6, 4))
    assert result.applied == {"softmax-attention": 1}
    assert not any(is_op(n, aten.where) for n in result.graph_module.graph.nodes)
    boolean = torch.ones(6, 6, dtype=torch.bool).triu(1)
    result = rewritten(MaskedAttention(fill=True, buffer=boolean), *qkv(2, 2, 6, 4))
    assert [n.kwargs["is_causal"] for n in result.graph_module.graph.nodes if is_op(n, SDPA)] == [
        True
    ]


def test_a_mask_of_rank_one_reaches_sdpa_with_a_row_axis():
    q, k, v = qkv(2, 2, 5, 8)
    bias = torch.randn(5)  # one bias per key: SDPA itself takes masks of rank >= 2 only
    assert rewritten(MaskedAttention(), q, k, v, bias).applied == {"softmax-attention": 1}
    assert rewritten(MaskedAttention(buffer=bias), q, k, v).applied == {"softmax-attention": 1}


def test_the_patched_rewrite_is_idempotent():
    q, k, v = qkv(2, 5, 8)
    mask = key_padding(2, 5, boolean=True)[:, 0]
    gm = rewritten(MaskedAttention(fill=True), q, k, v, mask).graph_module
    code = gm.code
    again = canonicalize_attention(gm)
    assert not again.modified and again.graph_module.code == code


MASK_SHAPES = ["keys", "rows-keys", "batch-keys", "batch-rows-keys"]


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 7),
    keys=st.integers(1, 7),
    boolean=st.booleans(),
    shape=st.sampled_from(MASK_SHAPES),
    hidden=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_canonicalize_attention_matches_eager_for_any_mask(
    batch, tokens, keys, boolean, shape, hidden, seed
):
    """Random run-time masks, some hiding whole rows: the rewrite gives eager's output, NaN
    rows included."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 2, tokens, 8, generator=generator)
    k, v = (torch.randn(batch, 2, keys, 8, generator=generator) for _ in range(2))
    dims = {
        "keys": (keys,),
        "rows-keys": (tokens, keys),
        "batch-keys": (batch, 1, 1, keys),
        "batch-rows-keys": (batch, 1, tokens, keys),
    }[shape]
    hides = torch.rand(dims, generator=generator) < hidden
    mask = hides if boolean else torch.zeros(dims).masked_fill(hides, float("-inf"))
    result = rewritten(MaskedAttention(fill=boolean), q, k, v, mask)
    assert result.applied == {"softmax-attention": 1}


# C. the command line


def fxopt_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fxopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def model_file(tmp_path, body: str):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    example_inputs = torch.randn(2, 4)
"""
BROKEN = {
    "syntax-error": (
        "import torch\nmodel = torch.nn.Linear(4, 4\nexample_inputs = torch.randn(2, 4)\n",
        r"my_model\.py:2: syntax error: .*; fix the file",
    ),
    "import-error": (
        "import torch\nimport no_such_package_for_fxopt\nmodel = torch.nn.Linear(4, 4)\n",
        r"my_model\.py:2: ModuleNotFoundError: .*no_such_package_for_fxopt.*; install",
    ),
    "rejects-input": (
        "import torch\nmodel = torch.nn.Linear(4, 4)\nexample_inputs = torch.randn(2, 5)\n",
        r"the model raised RuntimeError: .* when called on its example_inputs",
    ),
    "factory-raises": (
        "import torch\nmodel = torch.nn.Linear(4, 4)\ndef example_inputs():\n"
        "    raise ValueError('no data here')\n",
        r"my_model\.py:4: `example_inputs\(\)` raised ValueError: no data here",
    ),
    "exits-while-loading": (
        "import sys\nsys.exit(3)\n",
        r"called exit\(3\) while loading",
    ),
}


def assert_one_error_line(result, pattern: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fxopt: error: "), result.stderr
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_model_file_is_one_error_line_and_exit_2(tmp_path, case):
    body, pattern = BROKEN[case]
    assert_one_error_line(fxopt_cli("optimize", model_file(tmp_path, body)), pattern)


@pytest.mark.parametrize(
    "where, pattern",
    [
        ("missing/report.json", r"--json .*: no directory .*missing; create it"),
        (".", r"--json .* is a directory; give a file name"),
        ("my_model.py/report.json", r"--json .*: no directory"),
    ],
    ids=["no-directory", "a-directory", "under-a-file"],
)
def test_an_unwritable_json_path_is_one_error_line_before_any_work(tmp_path, where, pattern):
    path = model_file(tmp_path, GOOD)
    result = fxopt_cli("optimize", path, "--json", tmp_path / where)
    assert_one_error_line(result, pattern)
    assert "Report" not in result.stdout and not result.stdout.strip()  # failed before optimizing


def test_debug_adds_the_traceback_before_the_error_line(tmp_path):
    path = model_file(tmp_path, BROKEN["import-error"][0])
    for args in (("--debug", "optimize", path), ("optimize", path, "--debug")):
        result = fxopt_cli(*args)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "import no_such_package_for_fxopt" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("fxopt: error: ")


def test_a_good_model_file_still_optimizes_and_writes_json(tmp_path):
    path = model_file(tmp_path, GOOD)
    result = fxopt_cli("optimize", path, "--json", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    assert "passes" in json.loads((tmp_path / "report.json").read_text())


def test_the_help_documents_the_exit_status_and_debug():
    result = fxopt_cli("optimize", "--help")
    assert "Exit status: 0 on success; 2 on any error" in result.stdout
    assert "--debug" in result.stdout
