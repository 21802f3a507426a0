"""The fxopt model zoo: train-form models, and their deploy forms where one exists.

Importing this package registers every model; see `list`, `create`, `example_inputs`, `info`.
"""

from . import (  # noqa: F401  (importing registers the models)
    acnet,
    conv3d,
    convnext,
    dbb,
    fastvit,
    inceptionnext,
    mobilenet,
    mobileone,
    replknet,
    repmlp,
    repvgg,
    resnet,
    superres,
    unireplknet,
    vit,
    vit_adapter,
)
from .randomize import randomize_
from .registry import ModelInfo, create, example_inputs, info, list, register_model

__all__ = [
    "ModelInfo",
    "create",
    "example_inputs",
    "info",
    "list",
    "randomize_",
    "register_model",
]
