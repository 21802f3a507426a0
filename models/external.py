"""Real models by name: ``timm:NAME``, ``torchvision:NAME`` and ``hf:NAME``.

The library builds the model with random weights (never a download); the registry then redraws
its weights and batch-norm statistics like a zoo model's (see `randomize_`), so folding does
real work. The libraries are optional: each is imported only when one of its names is used,
and a missing one raises InputError saying how to install it.

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` at the input size of its
  pretrained config; the deploy form is ``timm.utils.model.reparameterize_model``.
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)`` at 224x224
  (inception_v3: 299x299), auxiliary classifiers off.
- ``hf:NAME``: a small Hugging Face transformers model built from a config in code (see
  `fxopt.models.hf`), called with one tensor and returning one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from ..ir.errors import InputError
from . import hf

PREFIXES = ("timm", "torchvision", "hf")
_PACKAGES = {"timm": "timm", "torchvision": "torchvision", "hf": "transformers"}
_IMAGE = (3, 224, 224)
# torchvision models that take another input size, or need arguments to build for inference.
_TORCHVISION_INPUT = {"inception_v3": (3, 299, 299)}
_TORCHVISION_ARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}

# (batch, one sample's shape, generator) -> the model's positional inputs
InputDraw = Callable[[int, tuple[int, ...], torch.Generator], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ExternalModel:
    """How to build a model of another library, and what it takes."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    deploy: Callable[[nn.Module], nn.Module] | None
    draw: InputDraw
    description: str


def is_external(name: str) -> bool:
    """Whether `name` is ``PREFIX:NAME`` for a library in `PREFIXES`."""
    prefix, colon, _ = name.partition(":")
    return bool(colon) and prefix in PREFIXES


def lookup(name: str) -> ExternalModel:
    """What `name` (``timm:...``, ``torchvision:...``, ``hf:...``) builds; builds nothing yet.

    Raises
    ------
    InputError
        If the library is not installed, or has no model of that name.
    """
    prefix, _, model_name = name.partition(":")
    if prefix == "hf":
        return _hf(name, model_name)
    library = _library(prefix, name)
    if prefix == "timm":
        return _timm(library, name, model_name)
    return _torchvision(library, name, model_name)


def normal_inputs(batch: int, shape: tuple[int, ...], generator: torch.Generator):
    """One float32 standard-normal tensor of shape ``(batch, *shape)``."""
    return (torch.randn((batch, *shape), generator=generator),)


def _library(prefix: str, name: str) -> ModuleType:
    package = _PACKAGES[prefix]
    try:
        return importlib.import_module(package)
    except ImportError as error:
        if error.name == package:
            raise InputError(
                f"{name} needs the {package!r} package: pip install {package}"
            ) from None
        raise InputError(f"{name}: importing {package} failed: {error}") from error


def _unknown(name: str, hint: str) -> InputError:
    return InputError(f"unknown model {name!r}; {hint}")


def _timm(timm: ModuleType, name: str, model_name: str) -> ExternalModel:
    if not timm.is_model(model_name):
        raise _unknown(name, f"timm.list_models('*{model_name}*') lists similar names")
    shape = timm.get_pretrained_cfg_value(model_name, "input_size") or _IMAGE
    return ExternalModel(
        factory=lambda: timm.create_model(model_name, pretrained=False),
        input_shape=tuple(shape),
        deploy=_timm_deploy,
        draw=normal_inputs,
        description=f"timm {model_name}, random weights; deploy: timm's reparameterize_model",
    )


def _timm_deploy(model: nn.Module) -> nn.Module:
    from timm.utils.model import reparameterize_model  # timm is optional: imported when used

    return reparameterize_model(model)  # on a copy: the train form stays as it is


def _torchvision(torchvision: ModuleType, name: str, model_name: str) -> ExternalModel:
    models = torchvision.models
    if model_name not in models.list_models():
        raise _unknown(name, "torchvision.models.list_models() lists the names")
    arguments = _TORCHVISION_ARGS.get(model_name, {})
    return ExternalModel(
        factory=lambda: models.get_model(model_name, weights=None, **arguments),
        input_shape=_TORCHVISION_INPUT.get(model_name, _IMAGE),
        deploy=None,
        draw=normal_inputs,
        description=f"torchvision {model_name}, random weights",
    )


def _hf(name: str, model_name: str) -> ExternalModel:
    if model_name not in hf.MODELS:
        raise _unknown(name, f"hf: names are {', '.join(sorted(hf.MODELS))}")
    _library("hf", name)
    spec = hf.MODELS[model_name]
    return ExternalModel(
        factory=spec.build,
        input_shape=spec.input_shape,
        deploy=None,
        draw=normal_inputs if spec.vocab is None else _token_draw(spec.vocab),
        description=f"transformers {spec.description}; small config, random weights",
    )


def _token_draw(vocab: int) -> InputDraw:
    def draw(batch: int, shape: tuple[int, ...], generator: torch.Generator):
        return (torch.randint(0, vocab, (batch, *shape), generator=generator),)

    return draw
