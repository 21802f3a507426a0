"""What approximate passes (`exact=False`) share: the result that carries their own account of
what they gave up, and the settings helper behind each one's `configure(...)`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .rewrite import PassResult


def update_settings(config: dict, settings: dict) -> dict:
    """Update an approximate pass's module-level `config` with `settings` (names it already
    has only) and return the previous settings, so ``configure(**old)`` restores them."""
    unknown = set(settings) - set(config)
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(config)}")
    old = dict(config)
    config.update(settings)
    return old


@dataclass(frozen=True)
class ApproximateResult(PassResult):
    """What an approximate pass returns: a `PassResult` plus its own summary of what it gave
    up (rank kept, energy, projection residual, ...), copied into the report."""

    summary: Mapping[str, object] = field(default_factory=dict)
