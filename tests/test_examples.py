"""The examples a new user reads first run as they are."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_write_a_pass_example_proves_its_pass():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "write_a_pass.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fold_scale_into_linear: 100 examples" in result.stdout
    assert "mul-linear x" in result.stdout
