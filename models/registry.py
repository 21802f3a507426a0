"""The model registry: models register by name with a one-line factory, as in timm.

Names of the form ``timm:NAME``, ``torchvision:NAME`` and ``hf:NAME`` build real models of
those libraries (see `fxopt.models.external`) through the same `create`, `example_inputs` and
`info`; `list` names the zoo only.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import external
from .external import InputDraw, normal_inputs
from .randomize import randomize_

Factory = Callable[[], nn.Module]
# A deploy form is reached from the randomized train form, so that both carry the same weights:
# either the name of a method on the train model (timm's `model.reparameterize()`) or a callable.
Deploy = str | Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    input_shape: tuple[int, ...]
    deploy: Deploy | None
    draw: InputDraw = normal_inputs
    description: str | None = None  # None: the factory's docstring


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about a model, without building it."""

    name: str
    input_shape: tuple[int, ...]
    has_deploy: bool
    description: str


_REGISTRY: dict[str, _Entry] = {}
# Enough samples for per-channel statistics even where a norm sees one value per sample.
_CALIBRATION_BATCH = 8


def register_model(
    name: str, input_shape: tuple[int, ...], deploy: Deploy | None = None
) -> Callable[[Factory], Factory]:
    """Register a model factory under `name`.

    Parameters
    ----------
    name
        Registry key, unique in the zoo.
    input_shape
        Shape of one sample, without the batch dimension, e.g. ``(3, 64, 64)``.
    deploy
        How to reach the hand-written deploy form from the train form: the name of a method of the
        train model, or a callable taking the train model. The result must compute the same
        function with the same weights. ``None`` when the model has no deploy form.

    Returns
    -------
    Callable
        A decorator that records the factory and returns it unchanged.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory, tuple(input_shape), deploy)
        return factory

    return decorate


def list() -> builtins.list[str]:
    """Names of all registered models, sorted.

    Returns
    -------
    list of str
        The registry keys in alphabetical order.
    """
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if external.is_external(name):
        model = external.lookup(name)
        return _Entry(model.factory, model.input_shape, model.deploy, model.draw, model.description)
    if name not in _REGISTRY:
        available = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"unknown model {name!r}; available models: {available}; "
            "or timm:NAME, torchvision:NAME, hf:NAME"
        )
    return _REGISTRY[name]


def create(name: str, deploy: bool = False, seed: int = 0) -> nn.Module:
    """Build a model in eval mode with deterministic random weights and batch-norm statistics.

    Every parameter is redrawn and every batch norm's running statistics are moved away from
    the identity (see `randomize_`), so that folding passes are tested on non-trivial values.

    Parameters
    ----------
    name
        A registered model name (see `list`), or ``timm:NAME``, ``torchvision:NAME`` or
        ``hf:NAME`` for a model of that library with random weights.
    deploy
        Return the hand-written deploy form, converted from the train form built with `seed`
        (for ``timm:`` names, timm's own ``reparameterize_model``).
    seed
        Seed for every parameter and running statistic; the same seed gives the same model.

    Returns
    -------
    nn.Module
        The model in eval mode.

    Raises
    ------
    ValueError
        If the name is unknown, or `deploy` is requested for a model without a deploy form.
    fxopt.errors.InputError
        If a ``timm:``, ``torchvision:`` or ``hf:`` model's library is not installed, or has
        no model of that name.
    """
    entry = _entry(name)
    if deploy and entry.deploy is None and external.is_external(name):
        raise ValueError(f"model {name!r} has no deploy form; timm: models have one")
    if deploy and entry.deploy is None:
        with_deploy = ", ".join(n for n in sorted(_REGISTRY) if _REGISTRY[n].deploy is not None)
        raise ValueError(
            f"model {name!r} has no deploy form; models with one: {with_deploy or 'none'}"
        )
    # Fork the global RNG: construction must neither depend on nor disturb the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory()
    generator = torch.Generator().manual_seed(seed)
    # Running statistics are drawn around what each norm sees on these inputs (see randomize_).
    calibration = entry.draw(_CALIBRATION_BATCH, entry.input_shape, generator)
    randomize_(model, generator, calibration)
    model.eval()
    if deploy:
        model = _to_deploy(model, entry.deploy).eval()
    return model


def _to_deploy(model: nn.Module, deploy: Deploy) -> nn.Module:
    with torch.no_grad():
        if isinstance(deploy, str):
            result = getattr(model, deploy)()
            # An in-place `reparameterize()` returns None; the model itself is then the deploy form.
            return model if result is None else result
        return deploy(model)


def example_inputs(
    name: str, batch: int = 1, seed: int = 0, shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, ...]:
    """Random normal inputs for a model, as ``model(*example_inputs(name))``.

    Parameters
    ----------
    name
        A registered model name, or a ``timm:``, ``torchvision:`` or ``hf:`` name.
    batch
        Size of the leading batch dimension.
    seed
        Seed of the draw.
    shape
        One sample's shape instead of the registered ``input_shape`` (e.g. a longer sequence
        for a token model); it must have as many dimensions.

    Returns
    -------
    tuple of torch.Tensor
        One tensor of shape ``(batch, *shape)``: float32, or int64 token ids for ``hf:`` text
        models.
    """
    entry = _entry(name)
    if shape is None:
        shape = entry.input_shape
    elif len(shape) != len(entry.input_shape):
        raise ValueError(
            f"{name} takes samples of shape {tuple(entry.input_shape)}; the shape "
            f"{tuple(shape)} has {len(shape)} dimensions instead of {len(entry.input_shape)}"
        )
    return entry.draw(batch, tuple(shape), torch.Generator().manual_seed(seed))


def info(name: str) -> ModelInfo:
    """Describe a registered model without building it.

    Parameters
    ----------
    name
        A registered model name, or a ``timm:``, ``torchvision:`` or ``hf:`` name (this
        imports the library, but builds no model).

    Returns
    -------
    ModelInfo
        Name, per-sample input shape, whether a deploy form exists, and the first docstring line.
    """
    entry = _entry(name)
    description = entry.description
    if description is None:
        doc = (entry.factory.__doc__ or "").strip()
        description = doc.splitlines()[0] if doc else ""
    return ModelInfo(name, entry.input_shape, entry.deploy is not None, description)
