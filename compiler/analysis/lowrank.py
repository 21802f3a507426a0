"""Low-rank factors by SVD truncation, and the budget both low-rank passes share.

`lowrank_linear` factors a linear's weight and `lowrank_conv` a conv's (read as a matrix), with
one setting each, `LowRankSettings.energy`, given per call (``optimize(...,
options={"lowrank_linear": {"energy": 0.99}})``). Constants either pass creates carry `TAG`, so
that neither factors them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

# Constants the low-rank passes create carry the tag (so they are not factored twice) and the
# prefix that `fxopt.calibrate` looks for.
TAG = "calib_lowrank"


@dataclass(frozen=True)
class LowRankSettings:
    """A low-rank pass's budget: `energy`, the fraction of sum(s**2) the factors keep, in
    (0, 1]. The default 0.999 bounds the weight's relative Frobenius error by sqrt(1e-3)."""

    energy: float = 0.999

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")


DEFAULT = LowRankSettings()


@dataclass(frozen=True)
class Factors:
    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)
    energy: float  # fraction of sum(s**2) kept

    @property
    def rank(self) -> int:
        return self.right.shape[0]


def truncate(matrix: torch.Tensor, energy: float) -> Factors:
    """The smallest-rank factors L @ R of `matrix` keeping at least `energy` of sum(s**2)."""
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    squares = s.square()
    kept = squares.cumsum(0) / squares.sum()
    rank = min(int((kept < energy - 1e-12).sum()) + 1, len(s))
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
    return Factors(left.to(matrix.dtype), right.to(matrix.dtype), float(kept[rank - 1]))


def factored(weight: fx.Node) -> bool:
    """Whether `weight` is a factor a low-rank pass produced."""
    return isinstance(weight, fx.Node) and weight.op == "get_attr" and TAG in weight.target


def summarize(kept: list) -> dict:
    """The report's account of a low-rank pass: ranks kept, the least energy kept, weights."""
    if not kept:
        return {}
    return {
        "rank kept": ", ".join(rank for rank, *_ in kept),
        "min energy kept": min(energy for _, energy, *_ in kept),
        "weights": f"{sum(k[2] for k in kept):,} -> {sum(k[3] for k in kept):,}",
    }
