"""The fxopt model zoo: train-form models, and their deploy forms where one exists.

Importing this package registers every model; see `list`, `create`, `example_inputs`, `info`.
"""

from . import conv3d, convnext, mobilenet, resnet, superres, vit  # noqa: F401  (registers models)
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
