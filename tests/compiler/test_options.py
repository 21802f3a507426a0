"""Options per call: pass settings, the approximation limit and the tuning database are given to
each call and kept nowhere between calls (issue 12, DESIGN.md 5)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.cli import main
from fxopt.dynamo import make_backend
from fxopt.pipeline import plan
from fxopt.report import Report

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "compiler", ROOT / "passes", ROOT / "codegen"]
# The only module-level state a function rebinds: a custom op registered once per process, and
# the pytest option that sets every check_pass's example count for a test session.
GLOBAL_ALLOWED = {"rules/wildcards.py": {"_MARK"}, "testing/check.py": {"_max_examples_override"}}


class FloatMaskAttention(nn.Module):
    """Hand-written attention with an additive float mask: canonicalize_attention leaves it
    alone on CPU unless its ``always`` setting is on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.randn(10, 10))

    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * 8**-0.5 + self.mask, dim=-1) @ v


def qkv():
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 10, 8, generator=generator) for _ in range(3))


def test_fxopt_passes_lists_each_passs_settings_with_their_defaults(capsys):
    assert main(["passes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "energy=0.999" in lines["lowrank_linear"]
    assert "feature_map='elu'" in lines["linearize_attention"]
    assert "always=False" in lines["canonicalize_attention"]
    assert "max_residual=1.0" in lines["decompose_large_kernel"]


def test_every_pass_with_settings_takes_a_frozen_dataclass():
    with_settings = [info for info in fxopt.list_passes() if info.settings is not None]
    assert len(with_settings) >= 5
    for info in with_settings:
        defaults = info.settings()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, dataclasses.fields(defaults)[0].name, None)


def test_no_module_keeps_settings_between_calls():
    """No CONFIG dict or configure() anywhere, and no function rebinds module state beyond the
    two allowed ones."""
    found = []
    for source, path in ((root, p) for root in SOURCES for p in root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        relative = path.relative_to(source).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                allowed = GLOBAL_ALLOWED.get(relative, set())
                found += [f"{relative}: global {n}" for n in node.names if n not in allowed]
            if isinstance(node, ast.FunctionDef) and node.name in ("configure", "configured"):
                found.append(f"{relative}: def {node.name}")
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            found += [f"{relative}: {t.id} =" for t in targets if getattr(t, "id", "") == "CONFIG"]
    assert not found


def test_the_attention_setting_applies_to_its_call_only():
    model, inputs = FloatMaskAttention().eval(), qkv()

    def sdpa_calls(**options):
        opt = fxopt.optimize(model, inputs, passes=["canonicalize_attention"], **options)
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
        return opt.report.passes[0].applied.get("softmax-attention", 0)

    assert sdpa_calls() == 0  # an additive float mask: slower as SDPA on CPU
    assert sdpa_calls(options={"canonicalize_attention": {"always": True}}) == 1
    assert sdpa_calls() == 0


@torch.no_grad()
def test_the_dynamo_backend_takes_options():
    model, inputs = FloatMaskAttention().eval(), qkv()
    report = Report("dynamo graph", "eager")
    backend = make_backend(
        plan(options={"canonicalize_attention": {"always": True}}), report=report
    )
    torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs))
    applied = {p.name: p.applied for p in report.passes}
    assert applied["canonicalize_attention"] == {"softmax-attention": 1}
    torch.compiler.reset()
    options = {"canonicalize_attention": {"always": True}}
    compiled = torch.compile(model, backend="fxopt", options=options)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    torch.compiler.reset()
    with pytest.raises(Exception, match="no setting 'sometimes'"):
        torch.compile(model, backend="fxopt", options={"canonicalize_attention": {"sometimes": 1}})(
            *inputs
        )
    torch.compiler.reset()


MODEL_FILE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
example_inputs = torch.randn(8, 64)
"""


def test_the_cli_sets_a_pass_setting_for_its_run(tmp_path, capsys):
    path, out = tmp_path / "mlp.py", tmp_path / "report.json"
    path.write_text(MODEL_FILE)
    run = ["optimize", str(path), "--passes", "lowrank_linear", "--approximate"]
    assert main([*run, "--set", "lowrank_linear.energy=0.3", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["passes"]
    assert record["status"] == "applied" and record["summary"]["min energy kept"] >= 0.3
    assert "rank kept" in capsys.readouterr().out
    assert main([*run, "--set", "lowrank_linear.energy=7"]) == 2
    assert "error: options for pass 'lowrank_linear': energy must be in (0, 1]" in (
        capsys.readouterr().err
    )
    assert main([*run, "--set", "energy=0.3"]) == 2
    assert "--set takes PASS.SETTING=VALUE" in capsys.readouterr().err
