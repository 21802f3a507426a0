"""Real models by name (timm:, torchvision:, hf:) when their library is missing: one clear
InputError, and one `error:` line from the command line. The models themselves are exercised
in tests/corpus, where the libraries are installed."""

import subprocess
import sys

import pytest

from fxopt import models
from fxopt.cli import main
from fxopt.ir.errors import InputError
from fxopt.models import external

NAMES = {
    "timm:repvgg_a0": "timm",
    "torchvision:resnet50": "torchvision",
    "hf:bert": "transformers",
}


@pytest.fixture
def missing(monkeypatch):
    """Make every optional library unimportable, as in an environment without them."""
    for package in NAMES.values():
        monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize("call", [models.create, models.example_inputs, models.info])
@pytest.mark.parametrize("name", NAMES)
def test_a_missing_library_raises_input_error_saying_how_to_install_it(missing, name, call):
    package = NAMES[name]
    with pytest.raises(InputError) as error:
        call(name)
    assert str(error.value) == f"{name} needs the {package!r} package: pip install {package}"


def test_an_unknown_hf_name_is_named_without_importing_transformers(missing):
    with pytest.raises(InputError, match="'hf:no_such_model'.*bert"):
        models.create("hf:no_such_model")


def test_only_known_prefixes_are_external_names():
    assert external.is_external("timm:resnet18") and external.is_external("hf:gpt2")
    assert not external.is_external("resnet18_like") and not external.is_external("foo:bar")
    assert not any(name.startswith(external.PREFIXES) for name in models.list())


def test_an_unknown_zoo_name_mentions_the_library_prefixes():
    with pytest.raises(ValueError, match="timm:NAME, torchvision:NAME, hf:NAME"):
        models.info("no_such_model")


@pytest.mark.parametrize(
    "argv",
    [
        ["optimize", "timm:repvgg_a0"],
        ["tune", "timm:repvgg_a0"],
        ["bench", "--models", "torchvision:resnet50,hf:bert"],
    ],
    ids=["optimize", "tune", "bench"],
)
def test_cli_prints_one_error_line_for_a_missing_library(missing, capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    package = NAMES[argv[-1].split(",")[0]]
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"fxopt: error: {argv[-1].split(',')[0]} needs the {package!r} package: "
        f"pip install {package}"
    ]


def test_importing_fxopt_imports_none_of_the_optional_libraries():
    script = (
        "import sys, fxopt\n"
        "loaded = [m for m in ('timm', 'torchvision', 'transformers') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
