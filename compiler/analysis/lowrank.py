"""Low-rank factors by SVD truncation, and the budget both low-rank passes share.

`lowrank_linear` factors a linear's weight and `lowrank_conv` a conv's (read as a matrix), with
one setting, `CONFIG["energy"]` (``fxopt.passes.lowrank_linear.configure`` sets it). Constants
either pass creates carry `TAG`, so that neither factors them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

# Constants the low-rank passes create carry the tag (so they are not factored twice) and the
# prefix that `fxopt.calibrate` looks for.
TAG = "calib_lowrank"
CONFIG = {"energy": 0.999}


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
