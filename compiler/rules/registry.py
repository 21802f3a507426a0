"""The pass registry: `@register_pass(name, exact=..., settings=...)` and `list_passes()`.

A pass with settings names their type, a frozen dataclass whose defaults are the pass's
defaults; the pass takes an instance as its second argument (``fn(gm, settings)``). Settings are
given per call (``optimize(..., options={"lowrank_linear": {"energy": 0.99}})``) and checked by
`settings_for` before any pass runs; no pass keeps settings of its own between calls.

The built-in passes register themselves when `fxopt.passes` is imported, which `fxopt.pipeline`
does (so `import fxopt` does); this layer never imports the passes above it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
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
    settings: type | None = None  # the frozen dataclass of its settings, if it has any

    def run(self, gm: fx.GraphModule, settings: object = None) -> PassResult:
        """The pass on `gm`, with `settings` (its defaults when None)."""
        return self.fn(gm) if settings is None else self.fn(gm, settings)


_PASSES: dict[str, PassInfo] = {}


def register_pass(
    name: str, exact: bool, settings: type | None = None
) -> Callable[[PassFn], PassFn]:
    """Register `fn(gm) -> PassResult` (or `fn(gm, settings) -> PassResult`) under `name`.

    Parameters
    ----------
    name : str
        The registry key, `<verb>_<object>` (e.g. ``"fold_conv_bn"``).
    exact : bool
        True when the rewrite is output-equivalent up to rounding; passes with ``exact=False``
        run only under ``optimize(..., approximate=True)``.
    settings : type, optional
        A frozen dataclass of the pass's settings, its defaults the pass's own (its
        ``__post_init__`` may reject values); `fn` then takes an instance as its second
        argument, given per call through ``optimize(..., options={name: {...}})``.
    """
    if settings is not None and not dataclasses.is_dataclass(settings):
        raise TypeError(f"settings of pass {name!r} must be a dataclass, not {settings!r}")

    def decorate(fn: PassFn) -> PassFn:
        doc = (fn.__doc__ or "").strip() or (_module_doc(fn) or "")
        _PASSES[name] = PassInfo(name, exact, doc.splitlines()[0] if doc else "", fn, settings)
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


def settings_for(name: str, given: object) -> object:
    """The settings object of pass `name` from `given`: an instance of its settings type, or a
    mapping of setting names to values (the rest keep their defaults). InputError when the
    pass has no settings, a name is unknown or a value is rejected."""
    info = get_pass(name)
    if info.settings is None:
        raise InputError(f"pass {name!r} has no settings; options were given for it")
    if isinstance(given, info.settings):
        return given
    if not isinstance(given, Mapping):
        raise InputError(
            f"options for {name!r} must be a dict of settings or a {info.settings.__name__}, "
            f"not {type(given).__name__}"
        )
    known = [f.name for f in dataclasses.fields(info.settings)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InputError(f"pass {name!r} has no setting {unknown[0]!r}; its settings: {known}")
    try:
        return info.settings(**given)
    except (TypeError, ValueError) as error:
        raise InputError(f"options for pass {name!r}: {error}") from None


def defaults(name: str) -> dict[str, object]:
    """Pass `name`'s settings and their defaults (empty when it has none)."""
    info = get_pass(name)
    return dataclasses.asdict(info.settings()) if info.settings is not None else {}
