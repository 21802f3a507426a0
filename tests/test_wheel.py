"""The built wheel holds every module of the package-dir mapping and each one imports."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {
    "compiler": "fxopt",
    "passes": "fxopt.passes",
    "codegen": "fxopt.codegen",
    "models": "fxopt.models",
}


def source_modules() -> set[str]:
    names = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("fxopt-*.whl")
    return path


def test_wheel_contains_every_source_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = {n for n in archive.namelist() if n.endswith(".py")}
    in_wheel = {f[:-3].replace("/", ".").removesuffix(".__init__") for f in files}
    assert source_modules() <= in_wheel
    assert any(n.endswith("entry_points.txt") for n in zipfile.ZipFile(wheel).namelist())


def test_every_module_imports_from_the_wheel(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import fxopt\n"
        f"assert fxopt.__file__.startswith({str(tmp_path)!r}), fxopt.__file__\n"
        f"for name in {sorted(source_modules() - {'fxopt.__main__'})!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'tvm' not in sys.modules, 'importing fxopt must not import TVM'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
