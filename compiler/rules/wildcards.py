"""Wildcards for patterns written as PyTorch code (`fxopt.pattern`).

A pattern function's parameters match any value but None. A parameter annotated with a wildcard
(`c: Constant`, `k: Scalar`) or defaulting to one (`c=any_constant()`, `k=any_scalar()`) is
constrained; inside the body, `scalar("eps")` stands for a float literal bound to a name and
`any_of(op, ...)(*args)` for one of several ops.

While `fxopt.pattern` traces a function, a float wildcard is a distinctive sentinel number that
fxopt finds again in the traced graph, and `any_of` marks its node with a pass-through op that
fxopt removes after tracing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir.errors import InputError

aten = torch.ops.aten

_SENTINEL = 0.012345678901  # while tracing, the k-th scalar wildcard is _SENTINEL + k * _STEP
_STEP = 1e-7


class Wildcard:
    """What a pattern parameter matches: any value but None. Subclasses constrain it; use a
    subclass as the parameter's annotation, or an instance as its default."""

    kind = "any"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"wildcards.{type(self).__name__}()"


class Constant(Wildcard):
    """A constant tensor: a weight or buffer (a ``get_attr`` node)."""

    kind = "constant"


class Scalar(Wildcard):
    """A Python int or float literal (traced as a float)."""

    kind = "scalar"


def any_constant() -> Constant:
    """A parameter default, like the annotation ``c: wildcards.Constant``: the argument must be
    a constant tensor (a weight or buffer)."""
    return Constant()


def any_scalar() -> Scalar:
    """A parameter default, like the annotation ``k: wildcards.Scalar``: the argument must be
    a Python number literal."""
    return Scalar()


def kind_of(annotation: Any, default: Any) -> str:
    """The wildcard kind a parameter declares by its default or annotation ("any" if none)."""
    for marker in (default, annotation):
        if isinstance(marker, Wildcard) or (
            isinstance(marker, type) and issubclass(marker, Wildcard)
        ):
            return marker.kind
    return "any"


def scalar(name: str | None = None) -> float:
    """A float literal in a pattern body that matches any number, bound to `name` if given.

    Examples
    --------
    >>> def conv_bn(x, w, b, mean, var, gamma, beta):
    ...     y = F.conv2d(x, w, b)
    ...     return F.batch_norm(y, mean, var, gamma, beta, False, wildcards.scalar(),
    ...                         wildcards.scalar("eps"))

    ``match["eps"]`` is then the model's eps; the momentum matches any number. While tracing, the
    value is a sentinel float, so it must reach an op unchanged (no Python arithmetic on it).
    """
    trace = _TRACE.get()
    return trace.scalar(name) if trace is not None else _SENTINEL


def any_of(*ops: Any) -> Callable[..., torch.Tensor]:
    """One node that may be any of `ops` (ATen ops, overload packets, or torch functions with
    an ATen namesake such as ``F.relu``). The first op is the one called while tracing.

    Examples
    --------
    >>> def conv_act(x, w, b):
    ...     return wildcards.any_of(F.relu, F.gelu, F.silu)(F.conv2d(x, w, b))
    """
    if not ops:
        raise InputError("any_of needs at least one op")
    alternatives = tuple(_aten_op(op) for op in ops)

    def call(*args, **kwargs):
        out = ops[0](*args, **kwargs)
        trace = _TRACE.get()
        if trace is None or not isinstance(out, torch.Tensor):
            return out
        return _mark_op()(out, trace.alternatives_key(alternatives))

    return call


def _aten_op(op: Any) -> Any:
    if isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return op
    packet = getattr(aten, getattr(op, "__name__", ""), None)
    if packet is None:
        raise InputError(f"any_of: {op!r} is not an ATen op and has no ATen namesake")
    return packet


@dataclass
class PatternTrace:
    """What one run of a pattern function produced: sentinel -> name (None when anonymous),
    and the op alternatives of each `any_of` call."""

    scalars: dict[float, str | None] = field(default_factory=dict)
    alternatives: list[tuple] = field(default_factory=list)

    def scalar(self, name: str | None) -> float:
        value = _SENTINEL + len(self.scalars) * _STEP
        self.scalars[value] = name
        return value

    def alternatives_key(self, ops: tuple) -> int:
        self.alternatives.append(ops)
        return len(self.alternatives) - 1


_TRACE: contextvars.ContextVar[PatternTrace | None] = contextvars.ContextVar(
    "fxopt_pattern_trace", default=None
)


@contextlib.contextmanager
def tracing(trace: PatternTrace) -> Iterator[PatternTrace]:
    """Context for one run of a pattern function: `scalar` and `any_of` record into `trace`."""
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)


_MARK = None


def _mark_op():
    """`fxopt::pattern_mark(x, key) -> x`: a custom op (kept by torch.export) that tells which
    traced node an `any_of` call produced."""
    global _MARK
    if _MARK is None:

        @torch.library.custom_op("fxopt::pattern_mark", mutates_args=())
        def mark(x: torch.Tensor, key: int) -> torch.Tensor:
            return x.clone()

        mark.register_fake(lambda x, key: torch.empty_like(x))
        _MARK = mark
    return _MARK


def is_mark(node: Any) -> bool:
    """Whether `node` is an `any_of` marker left by tracing."""
    if _MARK is None:
        return False
    return getattr(node, "target", None) is torch.ops.fxopt.pattern_mark.default
