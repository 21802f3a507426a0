"""The pass registry: `@register_pass(name, exact=...)` and `list_passes()`.

The built-in passes register themselves when `fxopt.passes` is imported, which `fxopt.pipeline`
does (so `import fxopt` does); this layer never imports the passes above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from ..ir.errors import InputError
from .rewrite import PassResult

PassFn = Callable[[fx.GraphModule], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    exact: bool
    description: str
    fn: PassFn


_PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, exact: bool) -> Callable[[PassFn], PassFn]:
    """Register `fn(gm) -> PassResult` under `name`.

    Parameters
    ----------
    name : str
        The registry key, `<verb>_<object>` (e.g. ``"fold_conv_bn"``).
    exact : bool
        True when the rewrite is output-equivalent up to rounding; passes with ``exact=False``
        run only under ``optimize(..., approximate=True)``.
    """

    def decorate(fn: PassFn) -> PassFn:
        doc = (fn.__doc__ or "").strip() or (_module_doc(fn) or "")
        _PASSES[name] = PassInfo(name, exact, doc.splitlines()[0] if doc else "", fn)
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return decorate


def _module_doc(fn: PassFn) -> str | None:
    import sys

    module = sys.modules.get(fn.__module__)
    return module.__doc__ if module else None


def list_passes() -> list[PassInfo]:
    """Every registered pass, built-in and user-defined, in registration order."""
    return list(_PASSES.values())


def get_pass(name: str) -> PassInfo:
    if name not in _PASSES:
        known = ", ".join(sorted(_PASSES))
        raise InputError(f"unknown pass {name!r}; registered passes: {known}")
    return _PASSES[name]
