"""What approximate passes (`exact=False`) share: the result that carries their own account of
what they gave up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .rewrite import PassResult


@dataclass(frozen=True)
class ApproximateResult(PassResult):
    """What an approximate pass returns: a `PassResult` plus its own summary of what it gave
    up (rank kept, energy, projection residual, ...), copied into the report."""

    summary: Mapping[str, object] = field(default_factory=dict)
