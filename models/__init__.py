"""The fxopt model zoo: train-form models, and their deploy forms where one exists.

Importing this package registers every model; see `list`, `create`, `example_inputs`, `info`.
They also take ``timm:NAME``, ``torchvision:NAME`` and ``hf:NAME`` for real models of those
libraries with random weights (`external`); the libraries are imported only then.
"""

import importlib
import pkgutil

from .randomize import randomize_
from .registry import ModelInfo, create, example_inputs, info, list, register_model

# Importing a model module registers its models; every other module of the package is one.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("external", "hf", "randomize", "registry", "reparam"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ModelInfo",
    "create",
    "example_inputs",
    "info",
    "list",
    "randomize_",
    "register_model",
]
